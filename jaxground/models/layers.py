"""Small building blocks shared by every model: layers whose parameters carry logical axis names.

Logical names (mapped to mesh axes in `jaxground/parallel.py`): `embed` (model width), `mlp` (hidden width
of MLPs), `heads` (attention heads x head dim), `kv` (key/value heads x head dim), `vocab`, `layers`
(stacked scan axis), and None (replicated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def check_sizes_and_dtypes(cfg, positive: tuple[str, ...]) -> None:
    """Refuses (ValueError) a model config whose `positive` sizes are below 1 or whose `dtype`/`param_dtype` NumPy
    does not know: they failed later, deep in initialisation (ZeroDivisionError at width 0, TypeError for 'foo')."""
    name = type(cfg).__name__
    for field in positive:
        if getattr(cfg, field) < 1:
            raise ValueError(f"{name}.{field} must be >= 1, got {getattr(cfg, field)}")
    for field in ("dtype", "param_dtype"):
        try:
            jnp.dtype(getattr(cfg, field))
        except TypeError:
            raise ValueError(f"{name}.{field} {getattr(cfg, field)!r} is not a dtype (e.g. 'float32', "
                             "'bfloat16')") from None


class Linear(nnx.Linear):
    """nnx.Linear that multiplies as one 2-D GEMM: [..., in] is flattened to [N, in] first.

    XLA:CPU runs a dot with several free dimensions on one side about 2x slower than the same [N, in] x [in, out]
    GEMM, forward and backward (measured at [32, 160, 128] x [128, 384]). The reshape only merges contiguous leading
    dimensions, so XLA lowers it to a bitcast.
    """

    def __call__(self, inputs, out_sharding=None):
        lead = inputs.shape[:-1]
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]), out_sharding=out_sharding)
        return y.reshape(*lead, y.shape[-1])


def linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype=None,
    param_dtype=jnp.float32,
) -> Linear:
    """Linear [in, out] whose kernel is annotated with `axes` and bias with `axes[1]`."""
    return Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def layer_norm(dim: int, *, eps: float, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32) -> nnx.LayerNorm:
    """nnx.LayerNorm over the last axis, its scale and bias annotated `embed`."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
    )


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """`jax.nn.softmax` under JAX's custom-JVP rule (`jax.softmax_custom_jvp`): the gradient is y * (dy - sum(y dy))
    from the output y alone. JAX's default still differentiates exp(x - max) / sum, whose backward XLA:CPU runs as a
    longer fusion with four saved inputs; the attention softmaxes of the train step use this one."""
    with jax.softmax_custom_jvp(True):
        return jax.nn.softmax(x, axis=axis)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, the LLaMA MLP's gating, with a hand-written gradient that keeps only gate and up (the GEMM
    outputs, saved anyway) and recomputes the sigmoid in the backward pass (XLA:CPU then writes the sigmoid once,
    for both passes). Under autodiff it wrote sigmoid(gate), silu(gate) and the product as separate arrays in the
    forward pass (the tiny train step was ~4% slower)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(saved, dy):
    gate, up = saved
    s = jax.nn.sigmoid(gate)
    # d silu(g) / dg = s + g s (1 - s)
    return dy * up * (s * (1 + gate * (1 - s))), dy * gate * s


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
