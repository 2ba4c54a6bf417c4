"""SAM checkpoints -> `jaxground.models.sam.Sam`: the official `segment_anything` names and HF `SamModel` names.

Wrapper prefixes (`sam.model.` in NExT-Chat, `model.visual_model.` in LISA, or any other) are found and
stripped. vit_b / vit_l / vit_h (and any other size) are told apart by shapes: `config_from_shapes` reads every
size off the checkpoint except the decoder's head count (8 in every official model; pass a config to change it).
The rule tables are functions of (torch prefix, JAX prefix) so the NExT-Chat converter can reuse them, e.g.
`image_encoder_rules("sam.model.image_encoder.", "sam.image_encoder.")`.
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from jaxground.convert.table import Rule, conv2d, load_into, transpose
from jaxground.models.sam.common import Buffer
from jaxground.models.sam.config import SamConfig
from jaxground.models.sam.sam import Sam


def conv_transpose2d(x: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d weight [in, out, kh, kw] -> `UpConv2x` kernel [kh, kw, in, out]."""
    return x.transpose(2, 3, 0, 1)


def qkv_kernel(x: np.ndarray) -> np.ndarray:
    """Fused torch qkv weight [3D, D] -> kernel [D, 3, D] (q, k, v on the middle axis)."""
    return x.T.reshape(x.shape[1], 3, -1)


def qkv_bias(x: np.ndarray) -> np.ndarray:
    """Fused torch qkv bias [3D] -> [3, D]."""
    return x.reshape(3, -1)


def flatten(x: np.ndarray) -> np.ndarray:
    """[1, C] embedding table -> [C] vector (or one row of a stacked table)."""
    return x.reshape(-1)


def _alt(*names: str) -> str:
    # the official name first: exports of models trained in JAX take it (jaxground/convert/layout.py)
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".kernel", transpose), Rule(src + r"\.bias", dst + ".bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".scale"), Rule(src + r"\.bias", dst + ".bias")]


def _conv(src: str, dst: str, bias: bool = True) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".kernel", conv2d)] + (
        [Rule(src + r"\.bias", dst + ".bias")] if bias else []
    )


def image_encoder_rules(src: str, dst: str) -> list[Rule]:
    """`src` is the escaped-or-plain torch prefix ending in `image_encoder.` / `vision_encoder.`."""
    s, b = re.escape(src), re.escape(src) + r"(?:blocks|layers)\.(\d+)\."
    d, db = dst, dst + r"blocks.\1."
    return [
        *_conv(s + _alt("patch_embed.proj", "patch_embed.projection"), d + "patch_embed"),
        Rule(s + r"pos_embed", d + "pos_embed"),
        *_norm(b + _alt("norm1", "layer_norm1"), db + "norm1"),
        *_norm(b + _alt("norm2", "layer_norm2"), db + "norm2"),
        Rule(b + r"attn\.qkv\.weight", db + "attn.qkv.kernel", qkv_kernel),
        Rule(b + r"attn\.qkv\.bias", db + "attn.qkv.bias", qkv_bias),
        *_linear(b + r"attn\.proj", db + "attn.proj"),
        Rule(b + r"attn\.rel_pos_h", db + "attn.rel_pos_h"),
        Rule(b + r"attn\.rel_pos_w", db + "attn.rel_pos_w"),
        *_linear(b + r"mlp\.lin1", db + "lin1"),
        *_linear(b + r"mlp\.lin2", db + "lin2"),
        *_conv(s + _alt("neck.0", "neck.conv1"), d + "neck_conv1", bias=False),
        *_norm(s + _alt("neck.1", "neck.layer_norm1"), d + "neck_norm1"),
        *_conv(s + _alt("neck.2", "neck.conv2"), d + "neck_conv2", bias=False),
        *_norm(s + _alt("neck.3", "neck.layer_norm2"), d + "neck_norm2"),
    ]


def prompt_encoder_rules(src: str, dst: str) -> list[Rule]:
    """`src` ends in `prompt_encoder.`; the Gaussian matrix is a `Buffer` (load with kind=(Param, Buffer))."""
    s, d = re.escape(src), dst
    return [
        Rule(
            s + _alt("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
            d + "gaussian",
        ),
        Rule(
            s + _alt("point_embeddings.", "point_embed.") + r"(\d)\.weight", d + r"point_embed[\1]", flatten
        ),
        Rule(s + r"not_a_point_embed\.weight", d + "not_a_point_embed", flatten),
        Rule(s + r"no_mask_embed\.weight", d + "no_mask_embed", flatten),
        *_conv(s + _alt("mask_downscaling.0", "mask_embed.conv1"), d + "mask_conv1"),
        *_norm(s + _alt("mask_downscaling.1", "mask_embed.layer_norm1"), d + "mask_norm1"),
        *_conv(s + _alt("mask_downscaling.3", "mask_embed.conv2"), d + "mask_conv2"),
        *_norm(s + _alt("mask_downscaling.4", "mask_embed.layer_norm2"), d + "mask_norm2"),
        *_conv(s + _alt("mask_downscaling.6", "mask_embed.conv3"), d + "mask_conv3"),
    ]


def mask_decoder_rules(src: str, dst: str, iou_head_depth: int = 3, hf: bool = False) -> list[Rule]:
    """`src` ends in `mask_decoder.`. `hf` selects the HF MLP numbering (`proj_in`, `layers.{j-1}`, `proj_out`),
    whose middle-layer names would otherwise collide with the official `layers.{j}`."""
    s, d = re.escape(src), dst
    t, l = s + r"transformer\.", s + r"transformer\.layers\.(\d+)\."
    dt, dl = d + "transformer.", d + r"transformer.layers.\1."
    rules = [
        Rule(s + r"iou_token\.weight", d + "iou_token"),
        Rule(s + r"mask_tokens\.weight", d + "mask_tokens"),
        *[
            r
            for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
            for p in ("q_proj", "k_proj", "v_proj", "out_proj")
            for r in _linear(l + f"{name}\\.{p}", dl + f"{name}.{p}")
        ],
        *[r for i in (1, 2, 3, 4) for r in _norm(l + _alt(f"norm{i}", f"layer_norm{i}"), dl + f"norm{i}")],
        *_linear(l + r"mlp\.lin1", dl + "lin1"),
        *_linear(l + r"mlp\.lin2", dl + "lin2"),
        *[
            r
            for p in ("q_proj", "k_proj", "v_proj", "out_proj")
            for r in _linear(t + f"final_attn_token_to_image\\.{p}", dt + f"final_attn.{p}")
        ],
        *_norm(t + _alt("norm_final_attn", "layer_norm_final_attn"), dt + "norm_final"),
        Rule(
            s + _alt("output_upscaling.0", "upscale_conv1") + r"\.weight",
            d + "upscale_conv1.kernel",
            conv_transpose2d,
        ),
        Rule(s + _alt("output_upscaling.0", "upscale_conv1") + r"\.bias", d + "upscale_conv1.bias"),
        *_norm(s + _alt("output_upscaling.1", "upscale_layer_norm"), d + "upscale_norm"),
        Rule(
            s + _alt("output_upscaling.3", "upscale_conv2") + r"\.weight",
            d + "upscale_conv2.kernel",
            conv_transpose2d,
        ),
        Rule(s + _alt("output_upscaling.3", "upscale_conv2") + r"\.bias", d + "upscale_conv2.bias"),
    ]
    mlp = _mlp_hf if hf else _mlp_official
    rules += mlp(s + r"output_hypernetworks_mlps\.(\d+)\.", d + r"hypernet.\1.", 3)
    rules += mlp(s + r"iou_prediction_head\.", d + "iou_head.", iou_head_depth)
    return rules


def _mlp_official(src: str, dst: str, depth: int) -> list[Rule]:
    return [r for j in range(depth) for r in _linear(src + f"layers\\.{j}", dst + f"layers.{j}")]


def _mlp_hf(src: str, dst: str, depth: int) -> list[Rule]:
    rules = _linear(src + r"proj_in", dst + "layers.0") + _linear(
        src + r"proj_out", dst + f"layers.{depth - 1}"
    )
    return rules + [
        r for j in range(1, depth - 1) for r in _linear(src + f"layers\\.{j - 1}", dst + f"layers.{j}")
    ]


def sam_rules(prefix: str, dst: str = "", *, hf: bool, iou_head_depth: int = 3) -> list[Rule]:
    """Every rule of a whole SAM checkpoint under torch `prefix` (e.g. "" or "sam.model.") -> JAX `dst`."""
    encoder = "vision_encoder." if hf else "image_encoder."
    return [
        *image_encoder_rules(prefix + encoder, dst + "image_encoder."),
        *prompt_encoder_rules(prefix + "prompt_encoder.", dst + "prompt_encoder."),
        *mask_decoder_rules(prefix + "mask_decoder.", dst + "mask_decoder.", iou_head_depth, hf=hf),
        Rule(
            re.escape(prefix) + r"shared_image_embedding\.positional_embedding", None
        ),  # HF's tied duplicate
    ]


def find_prefix(keys) -> tuple[str, bool]:
    """(wrapper prefix, is_hf) from the key holding the patch embedding."""
    for key in keys:
        m = re.fullmatch(r"(.*?)(image_encoder|vision_encoder)\.patch_embed\.(proj|projection)\.weight", key)
        if m:
            return m.group(1), m.group(2) == "vision_encoder"
    raise ValueError("not a SAM checkpoint: no image_encoder/vision_encoder patch embedding found")


def detect(keys_and_shapes) -> bool:
    try:
        find_prefix(keys_and_shapes)
    except ValueError:
        return False
    return True


def _count(shapes, pattern: str) -> int:
    return len({m.group(1) for k in shapes if (m := re.fullmatch(pattern, k))})


def config_from_shapes(shapes, **overrides) -> SamConfig:
    """A `SamConfig` read off a checkpoint's `{key: shape}`; `overrides` win (e.g. decoder_heads)."""
    prefix, hf = find_prefix(shapes)
    p = re.escape(prefix)
    enc = p + ("vision_encoder." if hf else "image_encoder.")
    dec = p + "mask_decoder."
    get = lambda pattern: next(tuple(v) for k, v in shapes.items() if re.fullmatch(pattern, k))
    width, _, patch, _ = get(enc + r"patch_embed\.proj(?:ection)?\.weight")
    grid = get(enc + r"pos_embed")[1]
    depth = _count(shapes, enc + r"(?:blocks|layers)\.(\d+)\.attn\.qkv\.weight")
    rel = [get(enc + rf"(?:blocks|layers)\.{i}\.attn\.rel_pos_h")[0] for i in range(depth)]
    head_dim = get(enc + r"(?:blocks|layers)\.0\.attn\.rel_pos_h")[1]
    windows = sorted({(r + 1) // 2 for r in rel if (r + 1) // 2 != grid})
    prompt_dim = get(enc + r"neck\.(?:0|conv1)\.weight")[0]
    mlp_keys = _count(shapes, dec + r"iou_prediction_head\.((?:layers\.\d+|proj_in|proj_out))\.weight")
    cfg = {
        "img_size": grid * patch,
        "patch_size": patch,
        "width": width,
        "depth": depth,
        "num_heads": width // head_dim,
        "mlp_ratio": get(enc + r"(?:blocks|layers)\.0\.mlp\.lin1\.weight")[0] / width,
        "window_size": windows[0] if windows else grid,
        "global_attn_indexes": tuple(i for i, r in enumerate(rel) if (r + 1) // 2 == grid),
        "prompt_dim": prompt_dim,
        "mask_in_chans": get(p + r"prompt_encoder\.(?:mask_downscaling\.3|mask_embed\.conv2)\.weight")[0],
        "decoder_depth": _count(shapes, dec + r"transformer\.layers\.(\d+)\.self_attn\.q_proj\.weight"),
        "decoder_mlp_dim": get(dec + r"transformer\.layers\.0\.mlp\.lin1\.weight")[0],
        "num_multimask_outputs": get(dec + r"mask_tokens\.weight")[0] - 1,
        "iou_head_depth": mlp_keys,
        "iou_head_hidden_dim": get(dec + r"iou_prediction_head\.(?:layers\.0|proj_in)\.weight")[0],
    }
    return SamConfig(**{**cfg, **overrides})


def build(source, config: SamConfig | None = None, *, shardings=None, **overrides) -> Sam:
    """A `Sam` filled from `source` (path or state dict, official or HF names, any wrapper prefix)."""
    from jaxground.convert.reader import keys_and_shapes, stream

    shapes = keys_and_shapes(source)
    prefix, hf = find_prefix(shapes)
    cfg = config or config_from_shapes(shapes, **overrides)
    # abstract init: every variable is replaced by the checkpoint (a missing one is reported by load_into)
    model = nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0)))
    rules = sam_rules(prefix, hf=hf, iou_head_depth=cfg.iou_head_depth)
    return load_into(
        model,
        stream(source),
        rules,
        kind=(nnx.Param, Buffer),
        shardings=shardings,
        context=f"SAM ({'HF' if hf else 'official'} names, prefix {prefix!r})",
    )


__all__ = [
    "build",
    "config_from_shapes",
    "conv_transpose2d",
    "detect",
    "find_prefix",
    "image_encoder_rules",
    "mask_decoder_rules",
    "mask_head_rules",
    "prompt_encoder_rules",
    "sam_rules",
]


def mask_head_rules(prefix: str = "", dst: str = "mask_head.", *, hf: bool = False, iou_head_depth: int = 3):
    """NExT-Chat's `seg_prompt_mlp` + SAM prompt encoder + mask decoder -> `MaskHead` under `dst`.
    `prefix` is the torch prefix of the NExT-Chat model (its SAM lives under `prefix + "sam.model."`)."""
    p = re.escape(prefix)
    return [
        *_linear(p + r"seg_prompt_mlp\.0", dst + "seg_prompt_mlp.fc1"),
        *_linear(p + r"seg_prompt_mlp\.2", dst + "seg_prompt_mlp.fc2"),
        *prompt_encoder_rules(prefix + "sam.model.prompt_encoder.", dst + "prompt_encoder."),
        *mask_decoder_rules(prefix + "sam.model.mask_decoder.", dst + "mask_decoder.", iou_head_depth, hf=hf),
    ]
