"""SAM's prompt encoder: random-Fourier positions (saved Gaussian matrix), points, boxes, mask prompts.

Axis legend: B images, Q prompts per image, N points per prompt, Y/X rows/columns, C prompt_dim.
Prompts are in SAM input pixel coordinates (the padded `img_size` square); boxes are xyxy.
Boxes outside the image are encoded as they are, like the official encoder does (the released NExT-Chat feeds
it F's unconstrained boxes), so converted weights give the same masks for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.models.sam.common import Buffer, conv, gelu, norm2d, zeros_param
from jaxground.models.sam.config import SamConfig


class PromptEncoder(nnx.Module):
    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, m = cfg.prompt_dim, cfg.mask_in_chans
        # non-trainable; the converter fills it from the checkpoint (a fresh model draws it like torch.randn)
        self.gaussian = Buffer(jax.random.normal(rngs.params(), (2, c // 2)))
        self.point_embed = zeros_param((4, c), (None, "embed"))  # negative, positive, box corner 1, corner 2
        self.not_a_point_embed = zeros_param((c,), ("embed",))
        self.no_mask_embed = zeros_param((c,), ("embed",))
        self.mask_conv1 = conv(1, m // 4, 2, stride=2, rngs=rngs)
        self.mask_norm1 = norm2d(m // 4, rngs=rngs)
        self.mask_conv2 = conv(m // 4, m, 2, stride=2, rngs=rngs)
        self.mask_norm2 = norm2d(m, rngs=rngs)
        self.mask_conv3 = conv(m, c, 1, axes=(None, "embed"), rngs=rngs)

    def _pe(self, coords01: jax.Array) -> jax.Array:
        """[..., 2] xy in [0, 1] -> [..., C]."""
        proj = 2 * np.pi * ((2 * coords01 - 1) @ self.gaussian[...].astype(coords01.dtype))
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)

    def get_dense_pe(self) -> jax.Array:
        """[g, g, C] positional encoding of the image-embedding grid (pixel centres)."""
        g = self.cfg.grid
        centres = (jnp.arange(g, dtype=jnp.float32) + 0.5) / g
        xy = jnp.stack(jnp.meshgrid(centres, centres, indexing="xy"), axis=-1)  # [Y, X, 2] as (x, y)
        return self._pe(xy)

    def embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """points [B, Q, N, 2] xy pixels, labels [B, Q, N] (1 fg, 0 bg, -1 not a point) -> [B, Q, N(+1), C]."""
        points = points.astype(jnp.float32) + 0.5
        if pad:  # the reference appends a not-a-point when no box follows
            points = jnp.concatenate([points, jnp.zeros_like(points[..., :1, :])], axis=-2)
            labels = jnp.concatenate([labels, -jnp.ones_like(labels[..., :1])], axis=-1)
        pe = self._pe(points / self.cfg.img_size)
        lab = labels[..., None]
        table = self.point_embed[...]
        pe = jnp.where(lab == -1, self.not_a_point_embed[...], pe)
        pe = pe + jnp.where(lab == 0, table[0], 0.0) + jnp.where(lab == 1, table[1], 0.0)
        return pe

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """boxes [B, Q, 4] xyxy pixels -> [B, Q, 2, C] corner tokens."""
        s = self.cfg.img_size
        corners = boxes.astype(jnp.float32).reshape(*boxes.shape[:-1], 2, 2) + 0.5
        return self._pe(corners / s) + self.point_embed[...][2:4]

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """masks [B, Q, 4g, 4g] logits -> [B, Q, g, g, C]."""
        b, q, y, x = masks.shape
        h = masks.reshape(b * q, y, x, 1).astype(jnp.float32)
        h = gelu(self.mask_norm1(self.mask_conv1(h)))
        h = gelu(self.mask_norm2(self.mask_conv2(h)))
        h = self.mask_conv3(h)
        return h.reshape(b, q, *h.shape[1:])

    def __call__(self, batch: int, num_prompts: int, points=None, labels=None, boxes=None, masks=None):
        """Sparse `[B, Q, n, C]` (points, then box corners) and dense `[B, Q, g, g, C]` embeddings.

        Shapes are checked here, before any compute: points `[B, Q, N, 2]` with labels `[B, Q, N]`,
        boxes `[B, Q, 4]`, masks `[B, Q, 4g, 4g]`.
        """
        cfg, b, q = self.cfg, batch, num_prompts
        check_prompts(cfg, b, q, points, labels, boxes, masks)
        sparse = [jnp.zeros((b, q, 0, cfg.prompt_dim), jnp.float32)]
        if points is not None:
            sparse.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = jnp.broadcast_to(self.no_mask_embed[...], (b, q, cfg.grid, cfg.grid, cfg.prompt_dim))
        return jnp.concatenate(sparse, axis=2), dense


def check_prompts(cfg: SamConfig, b: int, q: int, points, labels, boxes, masks) -> None:
    """Raises ValueError naming the first prompt whose shape does not fit B images x Q prompts."""
    if (points is None) != (labels is None):
        raise ValueError("points and labels go together: pass both or neither")
    want = {}
    if points is not None:
        want["points"] = (points.shape, (b, q, points.shape[2] if points.ndim == 4 else -1, 2))
        want["labels"] = (labels.shape, (b, q, points.shape[2] if points.ndim == 4 else -1))
    if boxes is not None:
        want["boxes"] = (boxes.shape, (b, q, 4))
    if masks is not None:
        want["masks"] = (masks.shape, (b, q, cfg.mask_input_size, cfg.mask_input_size))
    for name, (got, expected) in want.items():
        if tuple(got) != expected:
            raise ValueError(
                f"{name} has shape {tuple(got)}; expected {expected} for {b} image(s) x {q} prompt(s) "
                f"(the prompt batch must match the image batch)"
            )
