"""Vision -> LLM projector (`mm_projector`): "linear" or "mlp2x_gelu" (Linear, exact GELU, Linear).

Axes: B batch, P patches, I input (vision) dim, D output (LLM) dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxground.models.layers import linear

KINDS = ("linear", "mlp2x_gelu")


class Projector(nnx.Module):
    def __init__(
        self, kind: str, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"
    ):
        if kind not in KINDS:
            raise ValueError(f"projector kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        kw = {"rngs": rngs, "dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(param_dtype)}
        # two layers: column- then row-parallel, so the hidden activation stays split over `tensor`
        self.fc1 = linear(in_dim, out_dim, ("embed", "mlp") if kind == "mlp2x_gelu" else (None, "embed"), **kw)
        if kind == "mlp2x_gelu":
            self.fc2 = linear(out_dim, out_dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B,P,I] -> [B,P,D]."""
        x = self.fc1(x)
        if self.kind == "mlp2x_gelu":
            x = self.fc2(jax.nn.gelu(x, approximate=False))
        return x
