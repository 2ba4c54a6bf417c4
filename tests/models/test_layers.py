import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.models.layers import Linear, linear, softmax, swiglu


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


def test_swiglu_and_its_gradient_equal_autodiff_of_silu_times_up():
    """The hand-written backward pass of silu(gate) * up gives autodiff's gradients, also where the sigmoid
    saturates (|gate| ~ 30), and in bfloat16."""
    gate = (jax.random.normal(jax.random.key(0), (3, 5, 16)) * 4).at[0, 0, :2].set(jnp.array([30.0, -30.0]))
    up = jax.random.normal(jax.random.key(1), gate.shape)
    cotangent = jax.random.normal(jax.random.key(2), gate.shape)

    def loss(fn, g, u):
        return jnp.sum(fn(g, u) * cotangent)

    def plain(g, u):
        return jax.nn.silu(g) * u

    assert "custom_vjp_call" in str(jax.make_jaxpr(swiglu)(gate, up))
    np.testing.assert_allclose(swiglu(gate, up), plain(gate, up), rtol=1e-6, atol=1e-7)
    mine = jax.jit(jax.grad(lambda g, u: loss(swiglu, g, u), argnums=(0, 1)))(gate, up)
    auto = jax.jit(jax.grad(lambda g, u: loss(plain, g, u), argnums=(0, 1)))(gate, up)
    for a, b in zip(mine, auto):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    g16, u16 = gate.astype(jnp.bfloat16), up.astype(jnp.bfloat16)
    mine16 = jax.grad(lambda g, u: loss(swiglu, g, u).astype(jnp.float32), argnums=(0, 1))(g16, u16)
    auto16 = jax.grad(lambda g, u: loss(plain, g, u).astype(jnp.float32), argnums=(0, 1))(g16, u16)
    for a, b in zip(mine16, auto16):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=5e-2, atol=5e-2)
