"""MaskHead vs the NExT-Chat torch computation (seg_prompt_mlp -> 4 tokens + SAM box prompt -> single mask),
tiny SAM with perturbed weights loaded through `mask_head_rules` from NExT-Chat key names."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxground.convert.sam import mask_head_rules
from jaxground.convert.table import load_into
from jaxground.models.mask_head import MaskHead
from jaxground.models.sam import SamConfig
from jaxground.models.sam.common import Buffer

_spec = importlib.util.spec_from_file_location(
    "_sam_reference", Path(__file__).parents[2] / "_sam_reference.py"
)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def test_mask_head_matches_nextchat_torch():
    cfg, hidden = SamConfig.tiny(), 32
    torch.manual_seed(0)
    tsam = ref.official_sam(cfg)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4 * cfg.prompt_dim)
    )
    ref.perturb(tsam, scale=0.1)
    state = {
        f"sam.model.{k}": v.numpy() for k, v in tsam.state_dict().items() if not k.startswith("image_encoder")
    }
    state |= {f"seg_prompt_mlp.{k}": v.detach().numpy() for k, v in mlp.state_dict().items()}
    head = MaskHead(hidden, cfg, rngs=nnx.Rngs(0))
    load_into(
        head,
        ((k, lambda v=v: v) for k, v in state.items()),
        mask_head_rules("", ""),
        kind=(nnx.Param, Buffer),
    )

    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 3, hidden)).astype(np.float32)
    boxes = np.sort(rng.random((2, 3, 2, 2)), axis=2).reshape(2, 3, 4).astype(np.float32)
    emb = rng.normal(size=(2, cfg.grid, cfg.grid, cfg.prompt_dim)).astype(np.float32)
    masks, iou = nnx.jit(lambda m, *a: m(*a))(head, jnp.asarray(h), jnp.asarray(boxes), jnp.asarray(emb))
    assert masks.shape == (2, 3, 32, 32) and iou.shape == (2, 3)
    with torch.no_grad():
        for b in range(2):
            prompts = mlp(torch.from_numpy(h[b])).view(3, 4, cfg.prompt_dim)
            box_emb, dense = tsam.prompt_encoder(
                points=None, boxes=torch.from_numpy(boxes[b]) * cfg.img_size, masks=None
            )
            m, i = tsam.mask_decoder(
                torch.from_numpy(emb[b : b + 1].transpose(0, 3, 1, 2)),
                tsam.prompt_encoder.get_dense_pe(),
                torch.cat([prompts, box_emb], 1),
                dense,
                False,
            )
            assert np.abs(m.numpy()).max() > 0.1
            np.testing.assert_allclose(np.asarray(masks[b]), m[:, 0].numpy(), atol=1e-5, rtol=0)  # measured 4e-7
            np.testing.assert_allclose(np.asarray(iou[b]), i[:, 0].numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="pred_boxes"):
        head(jnp.asarray(h), jnp.zeros((2, 2, 4)), jnp.asarray(emb))
