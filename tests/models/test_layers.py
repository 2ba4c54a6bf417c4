import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.models.layers import Linear, linear, softmax


def test_linear_flattens_leading_dims_and_matches_a_plain_dot():
    layer = linear(8, 5, ("embed", "mlp"), rngs=nnx.Rngs(0))
    assert isinstance(layer, Linear)
    layer.bias[...] = np.arange(5, dtype=np.float32)
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 8))
    y = layer(x)
    assert y.shape == (2, 3, 4, 5)
    want = np.einsum("abcd,df->abcf", np.asarray(x), np.asarray(layer.kernel[...])) + np.arange(5)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_softmax_and_its_gradient_equal_jax_defaults_with_masked_and_fully_masked_rows():
    """The custom-JVP softmax computes what jax.nn.softmax computes, forward and backward, where attention masks
    scores to float32's min (a fully masked row, a padding query, is uniform)."""
    scores = jax.random.normal(jax.random.key(0), (2, 3, 5, 7)) * 4
    keep = jax.random.bernoulli(jax.random.key(1), 0.6, (2, 3, 5, 7)).at[0, 0, 0].set(False)
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    cotangent = jax.random.normal(jax.random.key(2), scores.shape)

    def loss(fn, x):
        return jnp.sum(fn(x, axis=-1) * cotangent)

    assert "custom_jvp_call" in str(jax.make_jaxpr(softmax)(scores))  # the rule its gradient comes from
    np.testing.assert_allclose(softmax(scores), jax.nn.softmax(scores, axis=-1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(softmax(scores)[0, 0, 0], np.full(7, 1 / 7), rtol=1e-6)
    mine = jax.jit(jax.grad(lambda x: loss(softmax, x)))(scores)
    default = jax.jit(jax.grad(lambda x: loss(jax.nn.softmax, x)))(scores)
    np.testing.assert_allclose(mine, default, rtol=1e-5, atol=1e-6)
