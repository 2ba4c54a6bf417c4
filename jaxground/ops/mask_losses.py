"""Mask losses for stage 3 (pure functions, no NaN for finite input).

Axis legend: B images, Q masks per image, Y/X rows/columns. Inputs: `logits [B, Q, Y, X]`, `targets [B, Q, Y, X]`
in {0, 1}, `mask_valid [B, Q]` (False = padding), `iou_pred [B, Q]`. Every loss is computed per mask, zeroed on
padding, summed and divided by the number of real masks (max(count, 1): an all-padding batch gives 0).

Forms follow the official NExT-Chat `sam_loss.py`, whose active `SamLoss.forward` is the `released` preset (LISA's
form at half its weights) and whose commented-out one is `focal`:
- focal (NExT-Chat's form, alpha 0.8, gamma 2): `alpha * (1 - exp(-bce))**gamma * bce` where `bce` is the mask's
  *mean* pixel BCE (a per-mask focal weight, not per pixel);
- dice (smooth 1): `1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`, p = sigmoid(logits);
- LISA dice (scale 1000, eps 1e-6) and mean-pixel BCE for the `lisa` and `released` presets;
- IoU-MSE: `(iou_pred - iou(logits > 0, target))**2`.
The official code normalises focal/dice per image over that image's masks; per mask is the same with one mask
per image and does not weight an image by its mask count.
Empty ground truth: dice is well defined by the smoothing (0 when the prediction is empty too); the IoU target of
an empty prediction against an empty ground truth is 1 (a perfect answer), otherwise 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

PRESETS = {
    # SAM-style fine-tuning loss, the default; commented out in the official sam_loss.py
    "focal": {"focal": 20.0, "dice": 1.0, "iou_mse": 1.0, "bce": 0.0, "lisa_dice": 0.0},
    # LISA's weights as written
    "lisa": {"focal": 0.0, "dice": 0.0, "iou_mse": 0.0, "bce": 2.0, "lisa_dice": 0.5},
    # what the official SamLoss.forward computes: LISA's form, but its `num_masks` counts every mask twice
    # (the sum of prediction counts, then each ground-truth count added again), which halves both weights
    "released": {"focal": 0.0, "dice": 0.0, "iou_mse": 0.0, "bce": 1.0, "lisa_dice": 0.25},
}


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:2], -1).astype(jnp.float32)


def mean_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[B, Q] mean pixel binary cross-entropy with logits."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(_flat(logits), _flat(targets)), axis=-1)


def focal(logits: jax.Array, targets: jax.Array, alpha: float = 0.8, gamma: float = 2.0) -> jax.Array:
    """[B, Q] NExT-Chat's focal loss of each mask."""
    bce = mean_bce(logits, targets)
    return alpha * (1 - jnp.exp(-bce)) ** gamma * bce


def dice(logits: jax.Array, targets: jax.Array, smooth: float = 1.0) -> jax.Array:
    """[B, Q] dice loss with additive smoothing."""
    p, t = jax.nn.sigmoid(_flat(logits)), _flat(targets)
    return 1 - (2 * jnp.sum(p * t, -1) + smooth) / (jnp.sum(p, -1) + jnp.sum(t, -1) + smooth)


def lisa_dice(logits: jax.Array, targets: jax.Array, scale: float = 1000.0, eps: float = 1e-6) -> jax.Array:
    """[B, Q] LISA's dice loss (sums scaled down by `scale`, eps smoothing)."""
    p, t = jax.nn.sigmoid(_flat(logits)) / scale, _flat(targets)
    return 1 - (2 * jnp.sum(p * t, -1) + eps) / (jnp.sum(p, -1) + jnp.sum(t / scale, -1) + eps)


def mask_iou(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[B, Q] IoU of (logits > 0) with targets; 1 when both are empty."""
    p, t = _flat(logits) > 0, _flat(targets) > 0.5
    inter = jnp.sum(p & t, -1).astype(jnp.float32)
    union = jnp.sum(p | t, -1).astype(jnp.float32)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def iou_mse(logits: jax.Array, targets: jax.Array, iou_pred: jax.Array) -> jax.Array:
    """[B, Q] squared error of the predicted IoU against the achieved one (the target carries no gradient)."""
    return (iou_pred.astype(jnp.float32) - jax.lax.stop_gradient(mask_iou(logits, targets))) ** 2


def masked_mean(per_mask: jax.Array, mask_valid: jax.Array) -> jax.Array:
    """Sum over real masks / number of real masks (0 if none)."""
    valid = mask_valid.astype(jnp.float32)
    return jnp.sum(jnp.where(mask_valid, per_mask, 0.0)) / jnp.maximum(jnp.sum(valid), 1.0)


def seg_loss(
    logits: jax.Array,
    targets: jax.Array,
    iou_pred: jax.Array,
    mask_valid: jax.Array,
    preset: str | dict = "focal",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the mask losses -> (total, {name: unweighted mean}). `preset`: name or weight dict."""
    if logits.shape != targets.shape or logits.ndim != 4:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} must both be [B, Q, Y, X]")
    if iou_pred.shape != logits.shape[:2] or mask_valid.shape != logits.shape[:2]:
        raise ValueError(
            f"iou_pred {iou_pred.shape} and mask_valid {mask_valid.shape} must be {logits.shape[:2]}"
        )
    weights = PRESETS[preset] if isinstance(preset, str) else preset
    terms = {
        "focal": lambda: focal(logits, targets),
        "dice": lambda: dice(logits, targets),
        "iou_mse": lambda: iou_mse(logits, targets, iou_pred),
        "bce": lambda: mean_bce(logits, targets),
        "lisa_dice": lambda: lisa_dice(logits, targets),
    }
    parts = {name: masked_mean(terms[name](), mask_valid) for name, w in weights.items() if w}
    total = sum(weights[name] * value for name, value in parts.items())
    return total, parts
