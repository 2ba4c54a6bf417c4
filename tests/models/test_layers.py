import jax
import numpy as np
from flax import nnx

from jaxground.models.layers import Linear, linear


def test_linear_flattens_leading_dims_and_matches_a_plain_dot():
    layer = linear(8, 5, ("embed", "mlp"), rngs=nnx.Rngs(0))
    assert isinstance(layer, Linear)
    layer.bias[...] = np.arange(5, dtype=np.float32)
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 8))
    y = layer(x)
    assert y.shape == (2, 3, 4, 5)
    want = np.einsum("abcd,df->abcf", np.asarray(x), np.asarray(layer.kernel[...])) + np.arange(5)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
