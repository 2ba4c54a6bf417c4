"""The official `segment_anything` SAM in torch, built with the layout of a jaxground `SamConfig`: the reference
for parity tests and `jaxground bench sam` (torch only; never imported by the JAX model code).

`segment_anything/__init__.py` imports torchvision (via its automatic mask generator), which does not load
beside the CPU torch here; registering a bare package module first lets `segment_anything.modeling` import.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import partial


def segment_anything():
    """The `segment_anything.modeling` package, imported without running the package `__init__`."""
    if "segment_anything.modeling" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("segment_anything", pkg)
    from segment_anything import modeling

    return modeling


def official_sam(cfg):
    """A torch `Sam` with the layout of a jaxground `SamConfig`, random init, eval mode."""
    import torch

    m = segment_anything()
    g = cfg.grid
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            out_chans=cfg.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=cfg.window_size,
            global_attn_indexes=cfg.global_attn_indexes,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=cfg.prompt_dim,
            image_embedding_size=(g, g),
            input_image_size=(cfg.img_size,) * 2,
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=m.TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_heads,
            ),
            transformer_dim=cfg.prompt_dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
    )
    return sam.eval()
