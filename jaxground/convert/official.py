"""What the official NExT-Chat loader reads besides the weights: `config.json` and the tokenizer.

Facts from the official code (`mllm/models/nextchat`, `mllm/models/builder/build_nextchat.py`):
- `NextChatForCausalLM` / `NextChatForSegLM.from_pretrained(dir)` builds the model from config.json (a
  `LlamaConfig` with `model_type: nextchat`) before it loads the weights. `NextChatLlamaModel.__init__` builds
  `mm_projector` only when the config has `use_mm_proj` (depth `mm_depth`: 1 a Linear, 2 Linear-GELU-Linear;
  input width `mm_hidden_size`); without it the saved projector is dropped and `initialize_vision_modules` adds a
  random one.
- The image features are CLIP hidden state `mm_vision_select_layer`, -1 when the config lacks it.
- The vision tower is not built from the config: the loader takes it from its own `vision_tower` argument
  (`mm_vision_tower` records it). `NextChatForSegLM` builds SAM vit_h from `sam_path` (None: random, then the
  checkpoint's `sam.model.*` weights).
- The tokenizer is `AutoTokenizer.from_pretrained(dir, use_fast=False)`; `initialize_vision_tokenizer` then adds
  `<im_patch> <im_start> <im_end> <at> <boxes>`, and when any is new it resizes the embeddings and overwrites the
  new rows. So the tokenizer must already hold them at the model's ids: transformers 4.31, which the official
  code pins, reads them from `added_tokens.json` (as LLaVA-lineage checkpoints ship them).

config.json also carries a `jaxground` entry, which the official code ignores: what the weights alone do not give
back to `jaxground convert` (`nextchat.released_config`): the vision tower's config (its heads, sin-cos positions,
which leave no table) and SAM's (its mask decoder's heads).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxground.convert.store import config_to_json

# the OpenAI towers of jaxground's released-size configs, by image size (recorded in config.json only)
CLIP_L14 = {224: "openai/clip-vit-large-patch14", 336: "openai/clip-vit-large-patch14-336"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_config(cfg, torch_dtype: str) -> dict:
    """config.json of a NextChatConfig for the official classes (LlamaConfig fields, then what NExT-Chat reads)."""
    llm, vision = cfg.llm, cfg.vision
    l14 = (vision.hidden_size, vision.num_layers, vision.patch_size) == (1024, 24, 14)
    return {
        "architectures": ["NextChatForSegLM" if cfg.sam is not None else "NextChatForCausalLM"],
        "model_type": "nextchat",
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "head_dim": llm.head_dim,  # None: hidden_size / num_attention_heads
        "hidden_act": "silu",
        "max_position_embeddings": llm.max_position,
        "rms_norm_eps": llm.rms_eps,
        "rope_theta": llm.rope_theta,
        "tie_word_embeddings": llm.tie_embeddings,
        "bos_token_id": cfg.tokens.bos,
        "eos_token_id": cfg.tokens.eos,
        "pad_token_id": cfg.tokens.pad,
        "torch_dtype": torch_dtype,
        "use_mm_proj": True,
        "mm_depth": 2 if cfg.projector == "mlp2x_gelu" else 1,
        "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": vision.select_layer,
        "mm_use_im_start_end": True,
        "mm_vision_tower": CLIP_L14.get(vision.image_size) if l14 else None,
        "sam_path": None,
        "jaxground": jaxground_entry(cfg),
    }


def jaxground_entry(cfg) -> dict:
    """config.json's `jaxground` entry of a NextChatConfig (the module docstring says why), in the converted
    store's config format (`store.config_from_json` reads it back)."""
    entry = {"vision": config_to_json("clip", cfg.vision)}
    if cfg.sam is not None:
        entry["sam"] = config_to_json("sam", cfg.sam)
    return entry


def tokenizer_files(directory: Path, cfg, extra_tokens=()) -> dict[str, bytes]:
    """{file name: content}: the tokenizer in `directory` as the official loader reads it, its added tokens (the
    NExT-Chat tokens, then a location format's `extra_tokens`) in `added_tokens.json`. Refused unless it has the
    model's vocabulary and token ids: the loader would resize the embeddings to the tokenizer."""
    from jaxground.data.tokenizer import load_tokenizer

    directory = Path(directory)
    tok, ids = load_tokenizer(directory, extra_tokens)
    if len(tok) != cfg.llm.vocab_size or ids != cfg.tokens:
        raise ValueError(f"the tokenizer {directory} ({len(tok)} tokens, ids {ids}) does not fit the model "
                         f"(vocabulary {cfg.llm.vocab_size}, ids {cfg.tokens})")
    files = {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}
    added = sorted((i, t) for t, i in tok.get_added_vocab().items() if i >= tok.vocab_size)
    files["added_tokens.json"] = json.dumps({t: i for i, t in added}, indent=2).encode()
    if "tokenizer_config.json" not in files:  # AutoTokenizer cannot tell the class from model_type nextchat
        kind = "LlamaTokenizer" if "tokenizer.model" in files else "PreTrainedTokenizerFast"
        files["tokenizer_config.json"] = json.dumps({"tokenizer_class": kind, "bos_token": "<s>", "eos_token": "</s>",
                                                     "unk_token": "<unk>"}, indent=2).encode()
    return files
