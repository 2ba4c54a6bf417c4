"""RES metrics as accumulable sums (pure functions; an evaluator adds the per-batch sums up).

Axis legend: B images, Q masks per image, Y/X rows/columns. `pred`, `gt` are boolean masks `[B, Q, Y, X]`,
`valid [B, Q]` marks real masks. cIoU = sum of intersections / sum of unions over a split; gIoU = mean per-mask
IoU where an empty union (empty prediction and empty ground truth) counts 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def intersection_union(pred: jax.Array, gt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, Q] pixel counts of pred & gt and pred | gt."""
    p, t = pred.astype(bool), gt.astype(bool)
    axes = tuple(range(2, p.ndim))
    return jnp.sum(p & t, axes).astype(jnp.float32), jnp.sum(p | t, axes).astype(jnp.float32)


def iou_of_counts(inter: jax.Array, union: jax.Array) -> jax.Array:
    """IoU from pixel counts of any shape; 1 where the union is empty. Jittable, and NumPy arrays work."""
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def res_sums(pred: jax.Array, gt: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """Per-batch sums: intersection, union, iou (sum of per-mask IoU), count (real masks)."""
    inter, union = intersection_union(pred, gt)
    v = valid.astype(bool)
    iou = iou_of_counts(inter, union)
    return {
        "intersection": jnp.sum(jnp.where(v, inter, 0.0)),
        "union": jnp.sum(jnp.where(v, union, 0.0)),
        "iou": jnp.sum(jnp.where(v, iou, 0.0)),
        "count": jnp.sum(v.astype(jnp.float32)),
    }


def res_scores(sums: dict) -> dict[str, float]:
    """cIoU and gIoU from accumulated sums (cIoU of an all-empty split is 1, gIoU of no masks is 0)."""
    union, count = float(sums["union"]), float(sums["count"])
    return {
        "ciou": float(sums["intersection"]) / union if union > 0 else 1.0,
        "giou": float(sums["iou"]) / count if count > 0 else 0.0,
    }
