"""SAM's ViT image encoder (ViTDet style): windowed and global attention with decomposed relative positions,
then the neck (conv1x1, LayerNorm2d, conv3x3, LayerNorm2d).

Axis legend: B batch (images, or windows x images inside a windowed block), Y/X rows/columns of the patch grid
(K/L the key rows/columns), T the tokens of an attended square (U its key tokens), D ViT width, N heads, H head
dim, R rows of the two relative-position tables, C neck channels (= prompt_dim).
Layout is NHWC throughout: input `[B, S, S, 3]` normalised pixels, output `[B, g, g, C]` with g = S / patch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.models.layers import layer_norm, linear, softmax
from jaxground.models.sam.common import conv, gelu, norm2d, zeros_param
from jaxground.models.sam.config import SamConfig

VIT_LN_EPS = 1e-6  # the official build passes LayerNorm(eps=1e-6) to the ViT blocks


def _rel_index(size: int) -> np.ndarray:
    """[size, size] index into a [2*size-1, H] table: query i, key j -> i - j + size - 1 (equal q/k sizes)."""
    r = np.arange(size)
    return r[:, None] - r[None, :] + size - 1


def window_partition(x: jax.Array, ws: int) -> jax.Array:
    """[B, Y, X, ...] -> [B * nY * nX, ws, ws, ...], zero-padding Y and X up to multiples of ws."""
    b, y, w, *rest = x.shape
    py, pw = -y % ws, -w % ws
    x = jnp.pad(x, ((0, 0), (0, py), (0, pw)) + ((0, 0),) * len(rest))
    ny, nx = (y + py) // ws, (w + pw) // ws
    x = x.reshape(b, ny, ws, nx, ws, *rest).swapaxes(2, 3)
    return x.reshape(b * ny * nx, ws, ws, *rest)


def window_unpartition(windows: jax.Array, ws: int, b: int, y: int, w: int) -> jax.Array:
    """Inverse of `window_partition` for `[B * nY * nX, ws, ws, D]`, cropping the padding: -> [B, Y, X, D]."""
    ny, nx = -(-y // ws), -(-w // ws)
    d = windows.shape[-1]
    x = windows.reshape(b, ny, nx, ws, ws, d).transpose(0, 1, 3, 2, 4, 5).reshape(b, ny * ws, nx * ws, d)
    return x[:, :y, :w]


class Attention(nnx.Module):
    """Multi-head self-attention over a `[B, Y, X, D]` map with decomposed relative positions: across the whole
    `grid` x `grid` map (`window` 0), or within `window` x `window` windows of the map zero-padded to whole windows."""

    def __init__(self, dim: int, num_heads: int, grid: int, window: int, *, rngs: nnx.Rngs):
        self.num_heads, self.window = num_heads, window
        self.size = window or grid  # side of an attended square; the relative-position tables span 2 * size - 1
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
        self.rel_pos_h = zeros_param((2 * self.size - 1, head_dim), (None, None))
        self.rel_pos_w = zeros_param((2 * self.size - 1, head_dim), (None, None))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, y, w, _ = x.shape
        # The reference projects the zero-padded windows, where a padding token's q, k, v is the bias alone. Projecting
        # the map before partitioning and adding the bias after gives the same values without the GEMM rows of the
        # padding (a 16 x 16 grid in 14 x 14 windows pads 256 tokens to 784).
        qkv = jnp.einsum("...d,dte->...te", x, self.qkv.kernel[...])  # [B, Y, X, 3, D]
        if self.window:
            qkv = window_partition(qkv, self.window)  # [B * windows, ws, ws, 3, D]
        out = self._attend(qkv + self.qkv.bias[...])  # [B', s, s, D], s = self.size
        if self.window:
            out = window_unpartition(out, self.window, b, y, w)
        return self.proj(out)  # the padding cropped first: no GEMM rows for it here either

    def _attend(self, qkv: jax.Array) -> jax.Array:
        """[B, s, s, 3, D] q, k, v of s x s squares (s = self.size) -> [B, s, s, D] attention output before `proj`."""
        b, y, w, _, d = qkv.shape
        n, s, t = self.num_heads, self.size, y * w
        # heads first, [B, N, T, H] each: XLA then runs scores, softmax and weighted sum as batched GEMMs without
        # transposing the [T, T] scores or copying q once per relative-position table
        q, k, v = qkv.reshape(b, t, 3, n, d // n).transpose(2, 0, 3, 1, 4)
        attn = jnp.einsum("BNTH,BNUH->BNTU", q * (d // n) ** -0.5, k)
        # decomposed relative positions from the unscaled q, as in the reference: q against every row of both tables
        # in one GEMM, [B, N, Y, X, 2, 2s - 1], then query row y takes row y - k + s - 1 for key row k (columns alike)
        tables = jnp.concatenate([self.rel_pos_h[...], self.rel_pos_w[...]])  # [R, H], R = 2 (2s - 1)
        r = jnp.einsum("BNTH,RH->BNTR", q, tables).reshape(b, n, y, w, 2, 2 * s - 1)
        idx = jnp.asarray(_rel_index(s))
        rel_h = jnp.take_along_axis(r[..., 0, :], idx[None, None, :, None], axis=-1)  # [B, N, Y, X, K]
        rel_w = jnp.take_along_axis(r[..., 1, :], idx[None, None, None], axis=-1)  # [B, N, Y, X, L]
        attn = attn.reshape(b, n, y, w, y, w) + rel_h[..., :, None] + rel_w[..., None, :]
        attn = softmax(attn.reshape(b, n, t, t), axis=-1)
        out = jnp.einsum("BNTU,BNUH->BNTH", attn, v)
        return out.transpose(0, 2, 1, 3).reshape(b, y, w, d)


class Block(nnx.Module):
    """Pre-norm ViT block; `window_size` 0 = global attention over the whole grid."""

    def __init__(self, cfg: SamConfig, window_size: int, *, rngs: nnx.Rngs):
        d = cfg.width
        self.norm1 = layer_norm(d, eps=VIT_LN_EPS, rngs=rngs)
        self.attn = Attention(d, cfg.num_heads, cfg.grid, window_size, rngs=rngs)
        self.norm2 = layer_norm(d, eps=VIT_LN_EPS, rngs=rngs)
        hidden = int(d * cfg.mlp_ratio)
        self.lin1 = linear(d, hidden, ("embed", "mlp"), rngs=rngs)
        self.lin2 = linear(hidden, d, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
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
