"""CLIP vision tower parity against HF `CLIPVisionModel` (float32, random weights) at 224 and 336, patch 14."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPVisionConfig, CLIPVisionModel

from jaxground.convert.clip import build
from jaxground.models.clip import ClipVision, ClipVisionConfig

TOL = 1e-4


def hf_clip(image_size: int, seed: int = 0, layers: int = 3) -> CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        image_size=image_size,
        patch_size=14,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        attn_implementation="eager",
    )
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():  # LayerNorms away from identity, so that a wrong mapping shows
        for key, p in model.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn_like(p)
                if "norm" in key and key.endswith("weight")
                else 0.2 * torch.randn_like(p)
            )
    return model


@pytest.mark.parametrize("image_size", [224, 336])
def test_selected_layer_matches_hf(image_size):
    hf = hf_clip(image_size)
    model = build(hf.state_dict(), hf.config)
    pixels = np.random.default_rng(0).normal(size=(2, image_size, image_size, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    ref = out.hidden_states[-2][:, 1:].numpy()
    got = np.asarray(model(jnp.asarray(pixels)))
    assert got.shape == (2, (image_size // 14) ** 2, 32)
    assert np.abs(got - ref).max() <= TOL
    # the last layer is loaded but not run; selecting it gives the last hidden state
    last = build(hf.state_dict(), hf.config, select_layer=-1)
    assert np.abs(np.asarray(last(jnp.asarray(pixels))) - out.hidden_states[-1][:, 1:].numpy()).max() <= TOL


def test_sincos_positions_run_without_a_position_parameter():
    cfg = ClipVisionConfig(
        image_size=56,
        patch_size=14,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        position_embedding="sincos",
    )
    model = ClipVision(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(model, "position_embedding")
    assert not any("position" in str(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    pos = np.asarray(model.positions())
    assert pos.shape == (17, 16) and len({tuple(r) for r in pos.round(5)}) == 17  # CLS + 16 distinct patches
    out = model(jnp.ones((1, 56, 56, 3)))
    assert out.shape == (1, 16, 16) and bool(jnp.isfinite(out).all())


def test_bad_input_is_refused():
    cfg = ClipVisionConfig(
        image_size=28, patch_size=14, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2
    )
    model = nnx.eval_shape(lambda: ClipVision(cfg, rngs=nnx.Rngs(0)))  # errors come before any compute
    with pytest.raises(ValueError, match=r"pixels must be \[B,28,28,3\].*\(1, 42, 42, 3\)"):
        model(jnp.zeros((1, 42, 42, 3)))
    with pytest.raises(ValueError, match=r"channels last.*\(1, 3, 28, 28\)"):
        model(jnp.zeros((1, 3, 28, 28)))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ClipVisionConfig(image_size=30, patch_size=14)
    with pytest.raises(ValueError, match="select_layer"):
        ClipVisionConfig(num_layers=2, select_layer=-4)
