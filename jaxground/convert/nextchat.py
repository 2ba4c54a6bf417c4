"""NExT-Chat checkpoints -> `jaxground.models.nextchat.NextChat`: the released layout, or a composition.

Released layout (official `NextChatForCausalLM` / `NextChatForSegLM`, an HF directory whose config.json is a
LlamaConfig with `model_type: nextchat`, `mm_depth`, `mm_hidden_size`, `mm_vision_select_layer`, ...):
  `model.embed_tokens.weight`, `model.layers.N.*`, `model.norm.weight`, `lm_head.weight`     -> `llm.*`
  `model.mm_projector.{0,2}.{weight,bias}` (mm_depth 2) or `model.mm_projector.{weight,bias}` -> `projector.fc1/fc2`
  `model.vision_tower.[vision_tower.]vision_model.*` (when saved; else pass a CLIP source)    -> `vision.*`
  `loc_encoder.{0,2}.*`, `loc_decoder.{0,2}.*` (top level, beside `lm_head`)                -> `loc_encoder/loc_decoder`
  `seg_prompt_mlp.{0,2}.*`, `sam.model.{prompt_encoder,mask_decoder}.*`                     -> `mask_head.*`
  `sam.model.image_encoder.*`                                                               -> `sam.image_encoder.*`
Vocabulary 32005 = base + `<im_patch> <im_start> <im_end> <at> <boxes>`.

Composition (`compose`): a LLaMA/Vicuna checkpoint + a CLIP checkpoint (+ an official SAM `.pth`) -> one NExT-Chat
model whose projector, box encoder/decoder and seg_prompt_mlp are fresh, and whose 5 new vocabulary rows (input
and output embeddings) are initialised as the official code does (`PadRows`). Its export layout is the released
NExT-Chat one, which `released_layout` also derives for models trained in JAX.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
from flax import nnx

from jaxground.convert import clip as clip_conv
from jaxground.convert import llama as llama_conv
from jaxground.convert import sam as sam_conv
from jaxground.convert.store import Part, config_from_json, place_into, plan, run, stored_variables
from jaxground.convert.table import Rule, transpose
from jaxground.models.clip import ClipVisionConfig
from jaxground.models.llama import LlamaConfig
from jaxground.tokens import SPECIAL_TOKENS, TokenIds

CLIP_HEAD_DIM = 64  # every OpenAI CLIP tower; heads are not visible in the weights' shapes


def detect(keys_and_shapes) -> bool:
    return "loc_encoder.0.weight" in keys_and_shapes and "model.embed_tokens.weight" in keys_and_shapes


# ---- configs ---------------------------------------------------------------------------------------------

def read_hf_config(source, config=None) -> dict:
    """The NExT-Chat config.json as a dict (AutoConfig does not know `model_type: nextchat`)."""
    if config is not None:
        return config if isinstance(config, dict) else config.to_dict()
    file = Path(source) / "config.json" if isinstance(source, (str, Path)) else None
    if file is None or not file.is_file():
        raise ValueError(f"no config: {source} holds no config.json (convert the released folder, the config.json "
                         "beside the weights; from Python, pass the NExT-Chat config as a dict)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not JSON: {e}") from None


def vision_config_from_shapes(shapes: dict, prefix: str, **overrides) -> ClipVisionConfig:
    """A CLIP tower's config read off its weights (`prefix` ends before `embeddings.`); heads assume
    head dim 64 (true of every OpenAI CLIP) unless `num_heads` is given."""
    width, _, patch, _ = shapes[prefix + "embeddings.patch_embedding.weight"]
    if prefix + "embeddings.position_embedding.weight" not in shapes:
        raise ValueError(f"the vision tower has no position table ({prefix}embeddings.position_embedding.weight), "
                         "so its image size cannot be read off its weights (a tower with sin-cos positions): its "
                         "config.json needs the `jaxground` entry that `jaxground export` writes")
    positions = shapes[prefix + "embeddings.position_embedding.weight"][0] - 1
    side = round(positions**0.5)
    layers = len({m.group(1) for k in shapes if (m := re.fullmatch(re.escape(prefix) + r"encoder\.layers\.(\d+)\..*", k))})
    fields = dict(image_size=side * patch, patch_size=patch, hidden_size=width, num_layers=layers,
                  intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
                  num_heads=max(1, width // CLIP_HEAD_DIM))
    return ClipVisionConfig(**(fields | overrides))


def _vision_prefix(shapes) -> str | None:
    """The key prefix before `embeddings.` of a saved vision tower under `model.vision_tower.`, if any."""
    for k in shapes:
        m = re.fullmatch(r"(model\.vision_tower\.(?:vision_tower\.)?(?:vision_model\.)?)embeddings\.patch_embedding\.weight", k)
        if m:
            return m.group(1)
    return None


def _tokens(vocab: int) -> TokenIds:
    return TokenIds.after(vocab - len(SPECIAL_TOKENS))


# ---- rules -----------------------------------------------------------------------------------------------

def projector_rules(kind: str, prefix: str = "model.mm_projector.", dst: str = "projector.") -> list[Rule]:
    p = re.escape(prefix)
    layers = [("0", "fc1"), ("2", "fc2")] if kind == "mlp2x_gelu" else [("", "fc1")]
    rules = []
    for src, fc in layers:
        s = p + (src + r"\." if src else "")
        rules += [Rule(s + "weight", dst + fc + ".kernel", transpose), Rule(s + "bias", dst + fc + ".bias")]
    return rules


def sequential_rules(name: str, dst: str | None = None) -> list[Rule]:
    """`name.{0,2}.{weight,bias}` (torch Sequential Linear-ReLU-Linear) -> `dst.fc1/fc2`."""
    dst = dst or name
    return [Rule(rf"{re.escape(name)}\.{i}\.weight", f"{dst}.{fc}.kernel", transpose) for i, fc in (("0", "fc1"), ("2", "fc2"))] + \
           [Rule(rf"{re.escape(name)}\.{i}\.bias", f"{dst}.{fc}.bias") for i, fc in (("0", "fc1"), ("2", "fc2"))]


def sam_part_rules(prefix: str, hf: bool, iou_head_depth: int) -> list[Rule]:
    """SAM under torch `prefix` -> NExT-Chat's frozen `sam.image_encoder` + `mask_head` (prompt encoder, decoder)."""
    return [
        *sam_conv.image_encoder_rules(prefix + ("vision_encoder." if hf else "image_encoder."), "sam.image_encoder."),
        *sam_conv.prompt_encoder_rules(prefix + "prompt_encoder.", "mask_head.prompt_encoder."),
        *sam_conv.mask_decoder_rules(prefix + "mask_decoder.", "mask_head.mask_decoder.", iou_head_depth, hf=hf),
        Rule(re.escape(prefix) + r"shared_image_embedding\.positional_embedding", None),
    ]


def released_rules(cfg, vision_prefix: str | None) -> list[Rule]:
    """The released NExT-Chat table for `cfg`; the vision tower's rules only with its key prefix (it may be absent)."""
    rules = llama_conv.llama_rules("model.", target_prefix="llm.", scan=cfg.llm.scan_layers,
                                   tied=cfg.llm.tie_embeddings)
    rules += projector_rules(cfg.projector) + sequential_rules("loc_encoder") + sequential_rules("loc_decoder")
    if vision_prefix is not None:
        rules += clip_conv.clip_rules(vision_prefix, target_prefix="vision.",
                                      learned_positions=cfg.vision.position_embedding == "learned")
    if cfg.sam is not None:
        rules += [*sequential_rules("seg_prompt_mlp", "mask_head.seg_prompt_mlp"),
                  *sam_part_rules("sam.model.", False, cfg.sam.iou_head_depth)]
    return rules


# NextChat's training aids (not in the release): the official model has no place for them, so they are not exported
TRAINING_AIDS = ("patch_head.", "attr_head.")


def released_layout(cfg, variables: dict[str, tuple[tuple, str]]) -> list[dict]:
    """torch_layout entries naming `variables` {NNX path: (shape, torch dtype)} of a NextChat in the released
    layout (the vision tower as `model.vision_tower.vision_model.*`, as composed), derived from the conversion
    table; training aids are left out. Raises when an array has no released name."""
    from jaxground.convert.layout import derive_layout

    entries, unnamed = derive_layout(released_rules(cfg, "model.vision_tower."), variables)
    unnamed = [p for p in unnamed if not p.startswith(TRAINING_AIDS)]
    if unnamed:
        raise ValueError(f"no released NExT-Chat name for {len(unnamed)} arrays: {', '.join(unnamed[:5])}")
    return entries


# ---- the released checkpoint -----------------------------------------------------------------------------

def released_config(shapes: dict, hf: dict, *, vision: ClipVisionConfig | None = None, dtype: str = "float32"):
    """NextChatConfig of a released checkpoint: LLM from config.json, vision from its weights (or `vision`),
    projector from `mm_depth` / the keys, SAM from its weights. A `jaxground export`'s config.json gives the
    vision tower's and SAM's configs in its `jaxground` entry (`official.jaxground_entry`): the
    weights do not give heads other than the official models' (CLIP's of width 64, SAM decoder's 8), nor a tower
    with sin-cos positions."""
    from jaxground.models.nextchat import NextChatConfig

    llm = LlamaConfig.from_hf(hf, dtype=dtype, param_dtype=dtype)
    select = hf.get("mm_vision_select_layer", -1)  # the official default (`getattr(config, ..., -1)`)
    entry = hf.get("jaxground", {})
    vprefix = _vision_prefix(shapes)
    if vision is None:
        if vprefix is None:
            raise ValueError("this NExT-Chat checkpoint holds no vision tower (model.vision_tower.*): add a CLIP "
                             "checkpoint as another source")
        vision = config_from_json(entry["vision"])[1] if "vision" in entry else vision_config_from_shapes(shapes, vprefix)
    vision = dataclasses.replace(vision, select_layer=select, dtype=dtype, param_dtype=dtype)  # config.json's, --dtype
    projector = "mlp2x_gelu" if "model.mm_projector.2.weight" in shapes else "linear"
    sam = None
    if any(k.startswith("sam.model.") for k in shapes):
        sam = config_from_json(entry["sam"])[1] if "sam" in entry else sam_conv.config_from_shapes(shapes)
    return NextChatConfig(llm=llm, vision=vision, projector=projector, tokens=_tokens(llm.vocab_size), sam=sam)


def released_parts(source, shapes: dict, cfg, clip_source=None) -> list[Part]:
    """Parts of a released checkpoint; a `clip_source` is read only when the checkpoint has no vision tower."""
    parts = [Part(source, tuple(released_rules(cfg, _vision_prefix(shapes))), label="NExT-Chat")]
    if _vision_prefix(shapes) is None:
        if clip_source is None:
            raise ValueError("this NExT-Chat checkpoint holds no vision tower: add a CLIP checkpoint as a source")
        parts.append(clip_part(clip_source, cfg.vision))
    return parts


# ---- composition -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PadRows:
    """Appends the `extra` NExT-Chat rows to a [V, D] torch table, then `base`, as the official code adds them:
    `<im_patch>` alone first (`resize_token_embeddings`: a N(0, std) row, std = the LLaMA `initializer_range`),
    then the other tokens, set to the mean of every row before them (the random `<im_patch>` row included)."""

    base: object
    extra: int
    seed: tuple[int, ...]  # one stream per table: the input and output rows are drawn independently
    std: float = 0.02

    def __call__(self, x: np.ndarray) -> np.ndarray:
        patch = np.random.default_rng(self.seed).normal(0.0, self.std, (1, *x.shape[1:])).astype(x.dtype)
        x = np.concatenate([x, patch], axis=0)
        mean = x.mean(axis=0, keepdims=True, dtype=np.float64).astype(x.dtype)
        x = np.concatenate([x, np.broadcast_to(mean, (self.extra - 1, *x.shape[1:]))], axis=0)
        return self.base(x)

    def torch_shape(self, shape):
        return (shape[0] + self.extra, *shape[1:])


def llm_part(source, cfg, base_vocab: int, *, seed: int = 0, init_std: float = 0.02) -> Part:
    """The LLaMA of a composition, its input and output tables grown by the NExT-Chat rows (`PadRows`)."""
    extra = cfg.llm.vocab_size - base_vocab
    tables = {"llm.embed_tokens.embedding": 0, "llm.lm_head.kernel": 1}
    rules = []
    for rule in llama_conv.llama_rules("model.", target_prefix="llm.", tied=cfg.llm.tie_embeddings):
        if rule.target in tables:
            pad = PadRows(rule.transform, extra, (seed, tables[rule.target]), init_std)
            rule = Rule(rule.pattern, rule.target, pad)
        rules.append(rule)
    return Part(source, tuple(rules), label="LLaMA")


def clip_part(source, vision: ClipVisionConfig) -> Part:
    def rename(key: str) -> str:
        return "model.vision_tower." + (key if key.startswith("vision_model.") else "vision_model." + key)

    rules = clip_conv.clip_rules(target_prefix="vision.", learned_positions=vision.position_embedding == "learned")
    return Part(source, tuple(rules + clip_conv.TEXT_SIDE), rename, label="CLIP")


def sam_part(source, shapes: dict, sam_cfg) -> Part:
    prefix, hf = sam_conv.find_prefix(shapes)
    if hf:
        raise ValueError("compose NExT-Chat from an official SAM checkpoint (segment_anything names, e.g. "
                         "sam_vit_h_4b8939.pth); HF SAM names have no NExT-Chat export layout")
    return Part(source, tuple(sam_part_rules(prefix, False, sam_cfg.iou_head_depth)),
                lambda key: "sam.model." + key[len(prefix):], label="SAM")


def compose_config(llm_hf, vision: ClipVisionConfig, sam_cfg=None, *, dtype: str = "float32",
                   select_layer: int = -2, projector: str = "mlp2x_gelu"):
    """(NextChatConfig, base vocabulary) for LLaMA + CLIP (+ SAM): the 5 NExT-Chat tokens are appended."""
    from jaxground.models.nextchat import NextChatConfig

    base = LlamaConfig.from_hf(llm_hf).vocab_size
    llm = LlamaConfig.from_hf(llm_hf, vocab_size=base + len(SPECIAL_TOKENS), dtype=dtype, param_dtype=dtype)
    vision = dataclasses.replace(vision, select_layer=select_layer, dtype=dtype, param_dtype=dtype)
    cfg = NextChatConfig(llm=llm, vision=vision, projector=projector, tokens=TokenIds.after(base), sam=sam_cfg)
    return cfg, base


def fresh_heads(cfg, seed: int = 0) -> dict[str, tuple[np.ndarray, dict]]:
    """Freshly initialised projector, box encoder/decoder (and seg_prompt_mlp) with their NExT-Chat torch names:
    path -> (array, torch_layout entry). Only these small modules are materialised."""
    import jax.numpy as jnp

    from jaxground.models.locator import BoxDecoder, BoxEncoder
    from jaxground.models.projector import Projector

    d, rngs = cfg.llm.hidden_size, nnx.Rngs(seed)
    kw = dict(dtype=jnp.dtype(cfg.llm.dtype), param_dtype=jnp.dtype(cfg.llm.param_dtype))
    modules = {
        "projector": Projector(cfg.projector, cfg.vision.hidden_size, d, rngs=rngs, dtype=cfg.llm.dtype,
                               param_dtype=cfg.llm.param_dtype),
        "loc_encoder": BoxEncoder(d, rngs=rngs, **kw),
        "loc_decoder": BoxDecoder(d, rngs=rngs, box_prior=cfg.box_prior, **kw),
    }
    if cfg.sam is not None:
        from jaxground.models.mask_head import SegPromptMLP

        modules["mask_head.seg_prompt_mlp"] = SegPromptMLP(d, cfg.sam.prompt_dim, rngs=rngs)
    arrays = {f"{prefix}.{path}": np.asarray(var.get_value())
              for prefix, module in modules.items() for path, var in stored_variables(module).items()}
    entries = released_layout(cfg, {path: (a.shape, "float32") for path, a in arrays.items()})
    return {e["path"]: (arrays[e["path"]], e) for e in entries}


# ---- in memory (`from_torch`) ----------------------------------------------------------------------------

def build(source, config=None, *, clip=None, vision: ClipVisionConfig | None = None, dtype: str = "float32"):
    """A `NextChat` filled from a released NExT-Chat checkpoint (directory or state dict; `config` is its
    config.json as dict or object). `clip` is a CLIP source for checkpoints saved without the vision tower."""
    from jaxground.convert.reader import keys_and_shapes
    from jaxground.convert.store import model_factory

    shapes = keys_and_shapes(source)
    if vision is None and _vision_prefix(shapes) is None and clip is not None:
        vision = ClipVisionConfig.from_hf(llama_conv.hf_config(clip, None))
    cfg = released_config(shapes, read_hf_config(source, config), vision=vision, dtype=dtype)
    model = nnx.eval_shape(model_factory("nextchat", cfg))
    variables = stored_variables(model)
    parts = released_parts(source, shapes, cfg, clip)
    run(variables, parts, plan(variables, parts, context="NExT-Chat"), place_into(variables))
    return model
