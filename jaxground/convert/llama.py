"""HF `LlamaForCausalLM` -> `jaxground.models.llama.Llama`.

`llama_rules(prefix, ...)` is the reusable table: the NExT-Chat converter calls it with its own key prefix
(`model.`) and target prefix. Keys: `{prefix}embed_tokens.weight`, `{prefix}layers.N.self_attn.{q,k,v,o}_proj
.weight`, `{prefix}layers.N.mlp.{gate,up,down}_proj.weight`, `{prefix}layers.N.{input,post_attention}_layernorm
.weight`, `{prefix}norm.weight`, `lm_head.weight`; rotary `inv_freq` buffers are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

from flax import nnx

from jaxground.convert.reader import stream
from jaxground.convert.table import Rule, load_into, transpose
from jaxground.models.llama import Llama, LlamaConfig

_LAYER = {
    r"self_attn\.q_proj\.weight": ("q.kernel", transpose),
    r"self_attn\.k_proj\.weight": ("k.kernel", transpose),
    r"self_attn\.v_proj\.weight": ("v.kernel", transpose),
    r"self_attn\.o_proj\.weight": ("o.kernel", transpose),
    r"mlp\.gate_proj\.weight": ("gate.kernel", transpose),
    r"mlp\.up_proj\.weight": ("up.kernel", transpose),
    r"mlp\.down_proj\.weight": ("down.kernel", transpose),
    r"input_layernorm\.weight": ("input_norm.scale", None),
    r"post_attention_layernorm\.weight": ("post_norm.scale", None),
}


def llama_rules(
    prefix: str = "model.",
    *,
    head_key: str = "lm_head.weight",
    target_prefix: str = "",
    scan: bool = False,
    tied: bool = False,
) -> list[Rule]:
    """torch key -> `Llama` path rules. `scan=True` targets a `scan_layers=True` model (`layers.q.kernel[N]`);
    `tied=True` (tied embeddings, no `lm_head`) drops a saved head copy."""
    p, t = re.escape(prefix), target_prefix
    rules = [
        Rule(rf"{p}embed_tokens\.weight", f"{t}embed_tokens.embedding"),
        Rule(rf"{p}norm\.weight", f"{t}norm.scale"),
        Rule(re.escape(head_key), None if tied else f"{t}lm_head.kernel", transpose),
        Rule(rf"{p}(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", None),
    ]
    for pattern, (target, transform) in _LAYER.items():
        dest = rf"{t}layers.{target}[\1]" if scan else rf"{t}layers.\1.{target}"
        rules.append(Rule(rf"{p}layers\.(\d+)\.{pattern}", dest, *([transform] if transform else [])))
    return rules


def detect(keys_and_shapes: dict[str, tuple]) -> bool:
    return (
        "model.embed_tokens.weight" in keys_and_shapes
        and "model.layers.0.self_attn.q_proj.weight" in keys_and_shapes
    )


def hf_config(source, config):
    """The HF config as given, or read from `config.json` next to the weights (local files only)."""
    if config is not None:
        return config
    if isinstance(source, (str, Path)) and Path(source).is_dir() and (Path(source) / "config.json").exists():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(source), local_files_only=True)
    raise ValueError("no config: pass `config` (HF config object or dict) unless `source` is an HF directory")


def build(source, config=None, *, rngs_seed: int = 0, **overrides) -> Llama:
    """A `Llama` filled from `source` (HF directory, weight file or state dict). `overrides` go to
    `LlamaConfig.from_hf` (e.g. `dtype="bfloat16"`, `scan_layers=True`); a `LlamaConfig` is used as is."""
    config = hf_config(source, config)
    cfg = config if isinstance(config, LlamaConfig) else LlamaConfig.from_hf(config, **overrides)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(rngs_seed)))
    return load_into(
        model, stream(source), llama_rules(scan=cfg.scan_layers, tied=cfg.tie_embeddings), context="LLaMA"
    )
