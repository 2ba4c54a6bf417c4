"""Pieces shared by the SAM modules: the frozen-buffer variable, conv / norm / MLP builders, exact GELU.

Axis legend: B batch, Y/X rows/columns of a feature map, C channels, D width.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxground.models.layers import layer_norm, linear

LN2D_EPS = 1e-6  # SAM's LayerNorm2d (neck, mask downscaling, upscaling)
LN_EPS = 1e-5  # torch default: the two-way transformer's LayerNorms


class Buffer(nnx.Variable):
    """A saved, non-trainable tensor (SAM's random-Fourier Gaussian matrix): filled by the converter."""


def gelu(x: jax.Array) -> jax.Array:
    """SAM's nn.GELU is the exact erf form."""
    return jax.nn.gelu(x, approximate=False)


def conv(
    cin: int,
    cout: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
    axes=(None, None),
) -> nnx.Conv:
    """NHWC Conv2d; kernel [k, k, cin, cout] with logical axes (None, None, *axes)."""
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, *axes)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def norm2d(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm2d over channels: on NHWC it is a LayerNorm over the last axis with eps 1e-6."""
    return layer_norm(dim, eps=LN2D_EPS, rngs=rngs)


class MLP(nnx.Module):
    """`depth` Linear layers with ReLU between them (SAM's mask-decoder MLP)."""

    def __init__(self, din: int, hidden: int, dout: int, depth: int, *, rngs: nnx.Rngs):
        dims = [din] + [hidden] * (depth - 1) + [dout]
        self.layers = nnx.List(
            [
                linear(a, b, ("embed", "mlp") if i < depth - 1 else ("mlp", None), rngs=rngs)
                for i, (a, b) in enumerate(itertools.pairwise(dims))
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


def zeros_param(shape, axes, dtype=jnp.float32) -> nnx.Param:
    """A parameter initialised to zeros (filled by a checkpoint or trained) with logical axes."""
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)
