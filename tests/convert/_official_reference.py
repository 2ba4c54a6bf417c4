"""A minimal torch reference of how the official NExT-Chat classes (`mllm/models/nextchat` in the official repo)
build themselves from a checkpoint directory's config.json, i.e. which saved weights they keep:
- `NextChatConfig(LlamaConfig)`: `model_type` "nextchat", class defaults `sam_path = None`, `mm_depth = 2`;
- `NextChatLlamaModel.__init__`: HF's LlamaModel, plus `mm_projector` only when the config has `use_mm_proj`
  (`_build_mm_projector(mm_depth, mm_hidden_size, hidden_size)`: depth <= 1 a Linear, else Linear, (GELU, Linear)
  x depth-1); no vision tower (the loader adds it from its own `vision_tower` argument);
- `NextChatForCausalLM.__init__`: `lm_head`, `loc_encoder` and `loc_decoder` (Linear-ReLU-Linear), `post_init()`;
- `NextChatForSegLM`: adds `sam = SamForLMSeg("vit_h", config.sam_path)` (`sam.model` an official SAM; here of the
  test's tiny size, as the auditors' comparison patched the vit_h registry) and `seg_prompt_mlp`.
The forward passes are not needed: tests/convert/test_nextchat_convert.py checks the computation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

_spec = importlib.util.spec_from_file_location("_sam_reference", Path(__file__).parents[1] / "_sam_reference.py")
_sam = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sam)


class NextChatConfig(LlamaConfig):
    model_type = "nextchat"
    sam_path = None
    mm_depth = 2


def _build_mm_projector(depth, in_size, out_size):
    if depth is None or depth <= 1:
        return nn.Linear(in_size, out_size)
    modules = [nn.Linear(in_size, out_size)]
    for _ in range(1, depth):
        modules += [nn.GELU(), nn.Linear(out_size, out_size)]
    return nn.Sequential(*modules)


class NextChatLlamaModel(LlamaModel):
    config_class = NextChatConfig

    def __init__(self, config):
        super().__init__(config)
        if hasattr(config, "use_mm_proj"):
            self.mm_projector = _build_mm_projector(config.mm_depth, config.mm_hidden_size, config.hidden_size)


class NextChatForCausalLM(LlamaForCausalLM):
    config_class = NextChatConfig

    def __init__(self, config):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = NextChatLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        h = config.hidden_size
        self.loc_encoder = nn.Sequential(nn.Linear(4, h // 2), nn.ReLU(), nn.Linear(h // 2, h))
        self.loc_decoder = nn.Sequential(nn.Linear(h, h // 2), nn.ReLU(), nn.Linear(h // 2, 4))
        self.post_init()


def seg_class(sam_cfg):
    """`NextChatForSegLM` whose SAM has the size of the jaxground `SamConfig` `sam_cfg` (official: vit_h)."""

    class NextChatForSegLM(NextChatForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.sam = nn.Module()
            self.sam.model = _sam.official_sam(sam_cfg)
            prompt_dim = self.sam.model.prompt_encoder.embed_dim
            h = config.hidden_size
            self.seg_prompt_mlp = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, prompt_dim * 4))

    return NextChatForSegLM


def load(directory, sam_cfg=None):
    """(model, loading info) of `from_pretrained(directory)`: NextChatForSegLM with `sam_cfg`, else
    NextChatForCausalLM."""
    from transformers.utils import logging

    # without a config.json, from_pretrained would build LlamaConfig's default: a 7B model
    assert (Path(directory) / "config.json").is_file(), f"{directory} has no config.json"
    cls = seg_class(sam_cfg) if sam_cfg is not None else NextChatForCausalLM
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the report of unexpected keys (the vision tower) is checked by the caller
    try:
        with torch.no_grad():
            return cls.from_pretrained(str(directory), output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
