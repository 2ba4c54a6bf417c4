"""HF CLIP (`CLIPVisionModel`, or the vision half of a full `CLIPModel`) -> `jaxground.models.clip.ClipVision`.

`clip_rules(prefix, ...)` is the reusable table over keys `{prefix}[vision_model.]*`; the NExT-Chat converter
calls it with `prefix="model.vision_tower.vision_tower."`. The pooled-output LayerNorm (`post_layernorm`) and
the `position_ids` buffer are dropped; `build` also drops a full CLIPModel's text tower and projections.
"""

from __future__ import annotations

import re

from flax import nnx

from jaxground.convert.llama import hf_config
from jaxground.convert.reader import stream
from jaxground.convert.table import Rule, conv2d, load_into, transpose
from jaxground.models.clip import ClipVision, ClipVisionConfig

_LAYER = {
    r"self_attn\.q_proj": "q",
    r"self_attn\.k_proj": "k",
    r"self_attn\.v_proj": "v",
    r"self_attn\.out_proj": "o",
    r"mlp\.fc1": "fc1",
    r"mlp\.fc2": "fc2",
}

# a full CLIPModel's parts that the vision tower does not use
TEXT_SIDE = [
    Rule(r"text_model\..*", None),
    Rule(r"(visual|text)_projection\..*", None),
    Rule(r"logit_scale", None),
]


def clip_rules(prefix: str = "", *, target_prefix: str = "", learned_positions: bool = True) -> list[Rule]:
    """torch key -> `ClipVision` path rules for keys `{prefix}vision_model.*` (transformers 4 and CLIPModel) or
    `{prefix}*` (a transformers 5 CLIPVisionModel saves without `vision_model.`). With sin-cos positions
    (`learned_positions=False`) a checkpoint's position table is dropped."""
    p, t = re.escape(prefix) + r"(?:vision_model\.)?", target_prefix
    rules = [
        Rule(rf"{p}embeddings\.patch_embedding\.weight", f"{t}patch_embedding.kernel", conv2d),
        Rule(rf"{p}embeddings\.class_embedding", f"{t}class_embedding"),
        Rule(
            rf"{p}embeddings\.position_embedding\.weight",
            f"{t}position_embedding" if learned_positions else None,
        ),
        Rule(rf"{p}embeddings\.position_ids", None),
        Rule(rf"{p}pre_layrnorm\.weight", f"{t}pre_layrnorm.scale"),
        Rule(rf"{p}pre_layrnorm\.bias", f"{t}pre_layrnorm.bias"),
        Rule(rf"{p}post_layernorm\.(weight|bias)", None),
    ]
    layer = rf"{p}encoder\.layers\.(\d+)\."
    for pattern, target in _LAYER.items():
        rules.append(Rule(rf"{layer}{pattern}\.weight", rf"{t}layers.\1.{target}.kernel", transpose))
        rules.append(Rule(rf"{layer}{pattern}\.bias", rf"{t}layers.\1.{target}.bias"))
    for norm in ("layer_norm1", "layer_norm2"):
        rules.append(Rule(rf"{layer}{norm}\.weight", rf"{t}layers.\1.{norm}.scale"))
        rules.append(Rule(rf"{layer}{norm}\.bias", rf"{t}layers.\1.{norm}.bias"))
    return rules


def detect(keys_and_shapes: dict[str, tuple]) -> bool:
    return any(
        k in keys_and_shapes
        for k in ("vision_model.embeddings.patch_embedding.weight", "embeddings.patch_embedding.weight")
    )


def build(source, config=None, *, rngs_seed: int = 0, **overrides) -> ClipVision:
    """A `ClipVision` filled from `source` (HF directory, weight file or state dict); `overrides` go to
    `ClipVisionConfig.from_hf` (e.g. `select_layer=-1`); a `ClipVisionConfig` is used as is."""
    config = hf_config(source, config)
    cfg = config if isinstance(config, ClipVisionConfig) else ClipVisionConfig.from_hf(config, **overrides)
    model = nnx.eval_shape(lambda: ClipVision(cfg, rngs=nnx.Rngs(rngs_seed)))
    rules = clip_rules(learned_positions=cfg.position_embedding == "learned") + TEXT_SIDE
    return load_into(model, stream(source), rules, context="CLIP vision")
