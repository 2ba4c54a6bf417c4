"""Box areas, IoU and GIoU: pure jnp functions over `[..., 4]` boxes.

Boxes are normalised `xyxy` (x1, y1, x2, y2); broadcast `a[:, None]` against `b[None]` for all pairs.

No clamping: the box decoder F has no output sigmoid, so a prediction outside [0, 1] must still get the
gradient that pulls it back, and the values match DETR's / HF's definitions. Evaluation scores the raw
prediction too (the part outside the image counts against it).

Robustness: an inverted box (x2 < x1 or y2 < y1) has zero area, every division is guarded by `EPS`, so
degenerate, zero-area, inverted and identical boxes all give finite values and finite gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-7


def _side(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Length of [lo, hi]; 0 when inverted."""
    return jnp.maximum(hi - lo, 0.0)


def area(boxes: jax.Array) -> jax.Array:
    """[..., 4] xyxy -> [...]; inverted boxes have zero area."""
    return _side(boxes[..., 0], boxes[..., 2]) * _side(boxes[..., 1], boxes[..., 3])


def _inter_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    inter = _side(jnp.maximum(a[..., 0], b[..., 0]), jnp.minimum(a[..., 2], b[..., 2])) * _side(
        jnp.maximum(a[..., 1], b[..., 1]), jnp.minimum(a[..., 3], b[..., 3])
    )
    return inter, area(a) + area(b) - inter


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Elementwise IoU of broadcastable [..., 4] xyxy boxes -> [...], in [0, 1]; 0 when the union is empty."""
    inter, union = _inter_union(a, b)
    return inter / jnp.maximum(union, EPS)


def giou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Elementwise generalised IoU of broadcastable [..., 4] xyxy boxes -> [...], in [-1, 1].

    GIoU = IoU - (C - U) / C with C the area of the smallest box enclosing both.
    """
    inter, union = _inter_union(a, b)
    enclosing = _side(jnp.minimum(a[..., 0], b[..., 0]), jnp.maximum(a[..., 2], b[..., 2])) * _side(
        jnp.minimum(a[..., 1], b[..., 1]), jnp.maximum(a[..., 3], b[..., 3])
    )
    return inter / jnp.maximum(union, EPS) - (enclosing - union) / jnp.maximum(enclosing, EPS)
