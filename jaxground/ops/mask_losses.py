"""Mask losses for stage 3 (pure functions, no NaN for finite input).

Axis legend: B images, Q masks per image, Y/X rows/columns. Inputs: `logits [B, Q, Y, X]`, `targets [B, Q, Y, X]`
in {0, 1}, `mask_valid [B, Q]` (False = padding), `iou_pred [B, Q]`. Every loss is computed per mask, zeroed on
padding, summed and divided by the number of real masks (max(count, 1): an all-padding batch gives 0); `released_loss`
below differs.

Forms follow the official NExT-Chat `sam_loss.py` (its `SamLoss`, 20 focal + dice + IoU-MSE):
- focal (alpha 0.8, gamma 2): `alpha * (1 - exp(-bce))**gamma * bce` where `bce` is the mask's *mean* pixel BCE
  (a per-mask focal weight, not per pixel);
- dice (smooth 1): `1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`, p = sigmoid(logits);
- LISA dice (scale 1000, eps 1e-6) and mean-pixel BCE for the `lisa` preset;
- IoU-MSE: `(iou_pred - iou(logits > 0, target))**2`.
Empty ground truth: dice is well defined by the smoothing (0 when the prediction is empty too); the IoU target of
an empty prediction against an empty ground truth is 1 (a perfect answer), otherwise 0.

`released_loss` is what the official `SamLoss.forward` computes as written, for exact reproduction: it passes its
mask count n positionally into the focal's `alpha` and the dice's `smooth`, sums focal and dice over the masks
instead of averaging, and scores the IoU target at logits >= 0.5. Its scale therefore grows with n (the focal
term as n^2); the official code counts the masks on each GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

PRESETS = {
    # the official SamLoss's terms and weights, each a mean over the masks; the default
    "focal": {"focal": 20.0, "dice": 1.0, "iou_mse": 1.0, "bce": 0.0, "lisa_dice": 0.0},
    # LISA's weights as written
    "lisa": {"focal": 0.0, "dice": 0.0, "iou_mse": 0.0, "bce": 2.0, "lisa_dice": 0.5},
}
NAMES = (*PRESETS, "released")  # "released": `released_loss`, the official forward as written


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


def released_loss(
    logits: jax.Array, targets: jax.Array, iou_pred: jax.Array, mask_valid: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The official `SamLoss.forward` over the n real masks -> (20 focal + dice + iou_mse, terms): focal and dice
    summed over the masks with alpha = n and smooth = n, the IoU-MSE summed and divided by n."""
    n = jnp.sum(mask_valid.astype(jnp.float32))
    bce = mean_bce(logits, targets)
    p, t = jax.nn.sigmoid(_flat(logits)), _flat(targets)
    smooth = jnp.maximum(n, 1.0)
    pred = (_flat(logits) >= 0.5).astype(jnp.float32)
    inter = jnp.sum(pred * t, -1)
    iou = inter / (jnp.sum(pred, -1) + jnp.sum(t, -1) - inter + 1e-7)
    per_mask = {
        "focal": n * (1 - jnp.exp(-bce)) ** 2 * bce,
        # smooth = n, kept >= 1 so that a batch without masks (all terms masked out) has no 0/0 in its gradient
        "dice": 1 - (2 * jnp.sum(p * t, -1) + smooth) / (jnp.sum(p, -1) + jnp.sum(t, -1) + smooth),
        "iou_mse": (iou_pred.astype(jnp.float32) - iou) ** 2 / smooth,
    }
    parts = {name: jnp.sum(jnp.where(mask_valid, v, 0.0)) for name, v in per_mask.items()}
    return 20 * parts["focal"] + parts["dice"] + parts["iou_mse"], parts


def seg_loss(
    logits: jax.Array,
    targets: jax.Array,
    iou_pred: jax.Array,
    mask_valid: jax.Array,
    preset: str | dict = "focal",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the mask losses -> (total, {name: unweighted mean}). `preset`: a name in `NAMES` or a
    weight dict over the terms of `PRESETS`."""
    if logits.shape != targets.shape or logits.ndim != 4:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} must both be [B, Q, Y, X]")
    if iou_pred.shape != logits.shape[:2] or mask_valid.shape != logits.shape[:2]:
        raise ValueError(
            f"iou_pred {iou_pred.shape} and mask_valid {mask_valid.shape} must be {logits.shape[:2]}"
        )
    if preset == "released":
        return released_loss(logits, targets, iou_pred, mask_valid)
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown mask-loss preset {preset!r}; choose one of {NAMES}")
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
