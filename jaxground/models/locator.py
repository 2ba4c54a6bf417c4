"""The pixel2emb box encoder G (box -> one token embedding) and box decoder F (trigger state -> box).

Axes: B batch, Q boxes, D model width (the LLM's hidden size), M = D // 2 (the MLP's hidden width).
Boxes are normalised xyxy; F has no output sigmoid, as released.

Parameter names follow the torch `nn.Sequential` indices (index 1 is the parameter-free ReLU):
  loc_encoder.0.{weight,bias} -> loc_encoder.fc1.{kernel,bias}   (weight transposed: [out,in] -> [in,out])
  loc_encoder.2.{weight,bias} -> loc_encoder.fc2.{kernel,bias}
  loc_decoder.0.* -> loc_decoder.fc1.*,  loc_decoder.2.* -> loc_decoder.fc2.*
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxground.models.layers import Linear

# F's output at initialisation when `box_prior=True`: a centred box covering half of each side.
PRIOR_BOX = (0.25, 0.25, 0.75, 0.75)


def _linear(d_in: int, d_out: int, axes, *, std: float | None, rngs: nnx.Rngs, dtype, param_dtype, kernel_init=None):
    # HF `post_init` gives every nn.Linear of the released model N(0, initializer_range = 0.02) and zero bias;
    # std None = LeCun normal (1/sqrt(d_in)), for models trained from scratch.
    default = nnx.initializers.lecun_normal() if std is None else nnx.initializers.normal(std)
    return Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init or default, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


class BoxEncoder(nnx.Module):
    """G: f32[..., 4] xyxy -> [..., D]: Linear(4 -> D/2), ReLU, Linear(D/2 -> D)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, init_std: float | None = 0.02, dtype=None, param_dtype=jnp.float32):
        kw = {"std": init_std, "rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.fc1 = _linear(4, dim // 2, (None, "mlp"), **kw)
        self.fc2 = _linear(dim // 2, dim, ("mlp", "embed"), **kw)

    def __call__(self, boxes: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(boxes)))


class BoxDecoder(nnx.Module):
    """F: [..., D] -> f32[..., 4] xyxy: Linear(D -> D/2), ReLU, Linear(D/2 -> 4), no sigmoid.

    `box_prior=True` zero-initialises the last kernel and sets its bias to `PRIOR_BOX`, so every trigger
    first decodes to a centred box (a starting point that GIoU can improve) instead of ~0.
    """

    def __init__(
        self,
        dim: int,
        *,
        rngs: nnx.Rngs,
        box_prior: bool = False,
        init_std: float | None = 0.02,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        kw = {"std": init_std, "rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.fc1 = _linear(dim, dim // 2, ("embed", "mlp"), **kw)
        zeros = nnx.initializers.zeros_init() if box_prior else None
        self.fc2 = _linear(dim // 2, 4, ("mlp", None), **kw, kernel_init=zeros)
        if box_prior:
            self.fc2.bias[...] = jnp.asarray(PRIOR_BOX, dtype=param_dtype)

    def __call__(self, states: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(states))).astype(jnp.float32)
