"""SAM's mask decoder: two-way transformer, 4x upscaling by two 2x2/stride-2 transposed convs, hypernetwork
MLPs per mask token, IoU head. Works on B images each with its own Q prompts.

Axis legend: B images, Q prompts per image, M masks, T tokens, Y/X rows/columns, C prompt_dim,
c = C / 8 upscaled channels, I/O in/out channels of a transposed conv, u/v kernel row/column.
The 2x2 stride-2 transposed convs do not overlap, so they are one einsum each: out[2y+u, 2x+v] = in[y, x] . W[u, v]
(torch weight [I, O, u, v] -> kernel [u, v, I, O]; no spatial flip is involved in this form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxground.models.sam.common import MLP, gelu, norm2d, zeros_param
from jaxground.models.sam.config import SamConfig
from jaxground.models.sam.transformer import TwoWayTransformer


class UpConv2x(nnx.Module):
    """ConvTranspose2d(kernel 2, stride 2), NHWC: [B, Y, X, I] -> [B, 2Y, 2X, O]."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=2, out_axis=3)
        self.kernel = nnx.Param(
            init(rngs.params(), (2, 2, cin, cout)),
            out_sharding=(None, None, "embed", None),
            eager_sharding=False,
        )
        self.bias = zeros_param((cout,), (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, y, w, _ = x.shape
        out = jnp.einsum("BYXI,uvIO->BYuXvO", x, self.kernel[...])
        return out.reshape(b, 2 * y, 2 * w, -1) + self.bias[...]


class MaskDecoder(nnx.Module):
    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, m = cfg.prompt_dim, cfg.num_mask_tokens
        self.iou_token = zeros_param((1, c), (None, "embed"))
        self.mask_tokens = zeros_param((m, c), (None, "embed"))
        self.transformer = TwoWayTransformer(cfg, rngs=rngs)
        self.upscale_conv1 = UpConv2x(c, c // 4, rngs=rngs)
        self.upscale_norm = norm2d(c // 4, rngs=rngs)
        self.upscale_conv2 = UpConv2x(c // 4, c // 8, rngs=rngs)
        self.hypernet = nnx.List([MLP(c, c, c // 8, 3, rngs=rngs) for _ in range(m)])
        self.iou_head = MLP(c, cfg.iou_head_hidden_dim, m, cfg.iou_head_depth, rngs=rngs)

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse: jax.Array,
        dense: jax.Array,
        multimask_output: bool,
    ):
        """image_embeddings [B, g, g, C], image_pe [g, g, C], sparse [B, Q, n, C], dense [B, Q, g, g, C]
        -> (mask logits [B, Q, M', 4g, 4g], iou predictions [B, Q, M']); M' = 3 if multimask_output else 1."""
        b, g, _, c = image_embeddings.shape
        q, n = sparse.shape[1], sparse.shape[2]
        if sparse.shape[0] != b or dense.shape[:2] != (b, q):
            raise ValueError(f"prompts for {sparse.shape[0]} image(s) but {b} image embedding(s)")
        m = self.cfg.num_mask_tokens
        out_tokens = jnp.concatenate([self.iou_token[...], self.mask_tokens[...]], axis=0)  # [1+M, C]
        tokens = jnp.concatenate(
            [jnp.broadcast_to(out_tokens, (b * q, 1 + m, c)), sparse.reshape(b * q, n, c)], axis=1
        )
        src = (image_embeddings[:, None] + dense).reshape(b * q, g * g, c)
        hs, src = self.transformer(src, image_pe.reshape(1, g * g, c), tokens)
        up = gelu(self.upscale_norm(self.upscale_conv1(src.reshape(b * q, g, g, c))))
        up = gelu(self.upscale_conv2(up))  # [BQ, 4g, 4g, c]
        hyper = jnp.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.hypernet)], axis=1)  # [BQ, M, c]
        masks = jnp.einsum("BMc,BYXc->BMYX", hyper, up)
        iou = self.iou_head(hs[:, 0])
        sl = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou = masks[:, sl], iou[:, sl]
        return masks.reshape(b, q, *masks.shape[1:]), iou.reshape(b, q, -1)
