"""Projector parity against the torch modules LLaVA builds (`nn.Linear`, `nn.Sequential(Linear, GELU, Linear)`)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxground.models.projector import Projector


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_matches_torch(kind):
    torch.manual_seed(0)
    ref = (
        torch.nn.Linear(12, 20)
        if kind == "linear"
        else torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 20))
    )
    torch_linears = [m for m in ref.modules() if isinstance(m, torch.nn.Linear)]
    proj = Projector(kind, 12, 20, rngs=nnx.Rngs(0))
    for fc, t in zip([proj.fc1, getattr(proj, "fc2", None)], torch_linears):
        fc.kernel.set_value(jnp.asarray(t.weight.detach().numpy().T))
        fc.bias.set_value(jnp.asarray(t.bias.detach().numpy()))
    x = np.random.default_rng(0).normal(size=(2, 5, 12)).astype(np.float32) * 3
    got = np.asarray(proj(jnp.asarray(x)))
    assert got.shape == (2, 5, 20)
    assert np.abs(got - ref(torch.tensor(x)).detach().numpy()).max() <= 1e-5


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="mlp3x"):
        Projector("mlp3x", 4, 4, rngs=nnx.Rngs(0))
