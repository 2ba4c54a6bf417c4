"""Box encoder G and decoder F: shapes, torch nn.Sequential parity through the documented name mapping,
the optional centred prior, logical axis annotations."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from jaxground.models.locator import PRIOR_BOX, BoxDecoder, BoxEncoder


def _load(module, seq: torch.nn.Sequential):
    """loc_*.0 -> fc1, loc_*.2 -> fc2, weights transposed (the mapping the converter uses)."""
    for name, idx in (("fc1", 0), ("fc2", 2)):
        layer = getattr(module, name)
        layer.kernel.set_value(jnp.asarray(seq[idx].weight.detach().numpy().T))
        layer.bias.set_value(jnp.asarray(seq[idx].bias.detach().numpy()))


def test_parity_with_torch_sequential():
    torch.manual_seed(0)
    dim = 16
    enc_t = torch.nn.Sequential(torch.nn.Linear(4, dim // 2), torch.nn.ReLU(), torch.nn.Linear(dim // 2, dim))
    dec_t = torch.nn.Sequential(torch.nn.Linear(dim, dim // 2), torch.nn.ReLU(), torch.nn.Linear(dim // 2, 4))
    # abstract modules (no initialiser runs): every parameter comes from torch
    enc = nnx.eval_shape(lambda: BoxEncoder(dim, rngs=nnx.Rngs(0)))
    dec = nnx.eval_shape(lambda: BoxDecoder(dim, rngs=nnx.Rngs(1)))
    _load(enc, enc_t)
    _load(dec, dec_t)
    boxes = torch.rand(2, 3, 4)
    states = torch.randn(2, 3, dim)
    with torch.no_grad():
        np.testing.assert_allclose(enc(jnp.asarray(boxes.numpy())), enc_t(boxes).numpy(), atol=1e-6)
        np.testing.assert_allclose(dec(jnp.asarray(states.numpy())), dec_t(states).numpy(), atol=1e-6)


def test_prior_box_and_default_init():
    states = jax.random.normal(jax.random.key(0), (3, 32))
    prior = BoxDecoder(32, rngs=nnx.Rngs(0), box_prior=True)
    np.testing.assert_allclose(prior(states), np.tile(PRIOR_BOX, (3, 1)), atol=0)
    plain = BoxDecoder(32, rngs=nnx.Rngs(0))
    assert float(jnp.abs(plain.fc2.kernel[...]).sum()) > 0  # not the prior: random N(0, 0.02) kernel
    assert float(jnp.abs(plain.fc2.bias[...]).sum()) == 0


def test_logical_axes():
    enc = nnx.eval_shape(lambda: BoxEncoder(8, rngs=nnx.Rngs(0)))
    dec = nnx.eval_shape(lambda: BoxDecoder(8, rngs=nnx.Rngs(0)))
    assert enc.fc2.kernel.out_sharding == ("mlp", "embed")
    assert dec.fc1.kernel.out_sharding == ("embed", "mlp")


def test_init_std_released_or_lecun():
    """0.02 as released; None = LeCun normal, std 1/sqrt(fan_in) (truncated normal, so within ~15%)."""
    d = 512
    released = BoxDecoder(d, rngs=nnx.Rngs(0))
    lecun = BoxDecoder(d, rngs=nnx.Rngs(0), init_std=None)
    enc = BoxEncoder(d, rngs=nnx.Rngs(0), init_std=None)
    np.testing.assert_allclose(float(jnp.std(released.fc1.kernel[...])), 0.02, rtol=0.05)
    np.testing.assert_allclose(float(jnp.std(lecun.fc1.kernel[...])), d ** -0.5, rtol=0.15)
    np.testing.assert_allclose(float(jnp.std(lecun.fc2.kernel[...])), (d // 2) ** -0.5, rtol=0.15)
    np.testing.assert_allclose(float(jnp.std(enc.fc2.kernel[...])), (d // 2) ** -0.5, rtol=0.15)
