"""SAM's ViT image encoder (ViTDet style): windowed and global attention with decomposed relative positions,
then the neck (conv1x1, LayerNorm2d, conv3x3, LayerNorm2d).

Axis legend: B batch (images, or windows x images inside a windowed block), Y/X rows/columns of the patch grid
(K/L the key rows/columns), D ViT width, N heads, H head dim, C neck channels (= prompt_dim).
Layout is NHWC throughout: input `[B, S, S, 3]` normalised pixels, output `[B, g, g, C]` with g = S / patch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.models.layers import layer_norm, linear
from jaxground.models.sam.common import conv, gelu, norm2d, zeros_param
from jaxground.models.sam.config import SamConfig

VIT_LN_EPS = 1e-6  # the official build passes LayerNorm(eps=1e-6) to the ViT blocks


def _rel_index(size: int) -> np.ndarray:
    """[size, size] index into a [2*size-1, H] table: query i, key j -> i - j + size - 1 (equal q/k sizes)."""
    r = np.arange(size)
    return r[:, None] - r[None, :] + size - 1


class Attention(nnx.Module):
    """Multi-head self-attention over a `[B, Y, X, D]` map with decomposed relative positions (size x size)."""

    def __init__(self, dim: int, num_heads: int, size: int, *, rngs: nnx.Rngs):
        self.num_heads, self.size = num_heads, size
        head_dim = dim // num_heads
        # kernel [D, 3, D]: q, k and v each keep their own head axis, so a tensor-parallel shard holds whole heads of
        # all three (a fused [D, 3D] sharded over 3D would split across q/k/v and make XLA gather the activations)
        self.qkv = nnx.Einsum(
            "...d,dte->...te",
            (dim, 3, dim),
            (3, dim),
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), ("embed", None, "heads")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None, "heads")),
            rngs=rngs,
        )
        self.proj = linear(dim, dim, ("heads", "embed"), rngs=rngs)
        self.rel_pos_h = zeros_param((2 * size - 1, head_dim), (None, None))
        self.rel_pos_w = zeros_param((2 * size - 1, head_dim), (None, None))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, y, w, d = x.shape
        n = self.num_heads
        qkv = self.qkv(x).reshape(b, y, w, 3, n, d // n)  # [B, Y, X, 3, D] -> per-head
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [B, Y, X, N, H]
        scale = (d // n) ** -0.5
        attn = jnp.einsum("BYXNH,BKLNH->BNYXKL", q * scale, k)
        idx = _rel_index(self.size)
        rh = self.rel_pos_h[...][idx]  # [Y, K, H]
        rw = self.rel_pos_w[...][idx]  # [X, L, H]
        rel_h = jnp.einsum("BYXNH,YKH->BNYXK", q, rh)  # unscaled q, as in the reference
        rel_w = jnp.einsum("BYXNH,XLH->BNYXL", q, rw)
        attn = attn + rel_h[..., :, None] + rel_w[..., None, :]
        attn = jax.nn.softmax(attn.reshape(b, n, y, w, y * w), axis=-1).reshape(attn.shape)
        out = jnp.einsum("BNYXKL,BKLNH->BYXNH", attn, v).reshape(b, y, w, d)
        return self.proj(out)


def window_partition(x: jax.Array, ws: int) -> jax.Array:
    """[B, Y, X, D] -> [B * nY * nX, ws, ws, D], zero-padding Y and X up to multiples of ws."""
    b, y, w, d = x.shape
    py, pw = -y % ws, -w % ws
    x = jnp.pad(x, ((0, 0), (0, py), (0, pw), (0, 0)))
    ny, nx = (y + py) // ws, (w + pw) // ws
    x = x.reshape(b, ny, ws, nx, ws, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * ny * nx, ws, ws, d)


def window_unpartition(windows: jax.Array, ws: int, b: int, y: int, w: int) -> jax.Array:
    """Inverse of `window_partition`, cropping the padding: -> [B, Y, X, D]."""
    ny, nx = -(-y // ws), -(-w // ws)
    d = windows.shape[-1]
    x = windows.reshape(b, ny, nx, ws, ws, d).transpose(0, 1, 3, 2, 4, 5).reshape(b, ny * ws, nx * ws, d)
    return x[:, :y, :w]


class Block(nnx.Module):
    """Pre-norm ViT block; `window_size` 0 = global attention over the whole grid."""

    def __init__(self, cfg: SamConfig, window_size: int, *, rngs: nnx.Rngs):
        d = cfg.width
        self.window_size = window_size
        self.norm1 = layer_norm(d, eps=VIT_LN_EPS, rngs=rngs)
        self.attn = Attention(d, cfg.num_heads, window_size or cfg.grid, rngs=rngs)
        self.norm2 = layer_norm(d, eps=VIT_LN_EPS, rngs=rngs)
        hidden = int(d * cfg.mlp_ratio)
        self.lin1 = linear(d, hidden, ("embed", "mlp"), rngs=rngs)
        self.lin2 = linear(hidden, d, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, y, w, _ = x.shape
        h = self.norm1(x)
        if self.window_size:
            h = window_unpartition(
                self.attn(window_partition(h, self.window_size)), self.window_size, b, y, w
            )
        else:
            h = self.attn(h)
        x = x + h
        return x + self.lin2(gelu(self.lin1(self.norm2(x))))


class ImageEncoder(nnx.Module):
    """`[B, S, S, 3]` normalised, padded images -> `[B, g, g, C]` image embeddings (NHWC)."""

    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p, d, c = cfg.patch_size, cfg.width, cfg.prompt_dim
        self.patch_embed = conv(3, d, p, stride=p, axes=(None, "embed"), rngs=rngs)
        self.pos_embed = zeros_param((1, cfg.grid, cfg.grid, d), (None, None, None, "embed"))
        self.blocks = nnx.List(
            [
                Block(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size, rngs=rngs)
                for i in range(cfg.depth)
            ]
        )
        self.neck_conv1 = conv(d, c, 1, use_bias=False, axes=("embed", None), rngs=rngs)
        self.neck_norm1 = norm2d(c, rngs=rngs)
        self.neck_conv2 = conv(c, c, 3, padding=1, use_bias=False, rngs=rngs)
        self.neck_norm2 = norm2d(c, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        s = self.cfg.img_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(
                f"images must be [B, {s}, {s}, 3] (NHWC, normalised, padded); got {images.shape}"
            )
        x = self.patch_embed(images) + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        x = self.neck_norm1(self.neck_conv1(x))
        return self.neck_norm2(self.neck_conv2(x))
