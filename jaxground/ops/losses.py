"""Training losses as pure functions of arrays: token cross-entropy, box detection, cycle consistency.

Axes: B batch, T tokens, V vocabulary, Q boxes (padded, with a mask), D model width.
Every loss is finite for finite input (degenerate boxes included) and 0 when nothing is counted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxground.ops import boxes as box_ops

IGNORE = -100

# (w_l1, w_giou) for L_det = w_l1 * L1 + w_giou * (1 - GIoU).
# "paper": DETR's 5:2 ratio scaled to alpha = 0.4; "released": the official code's `loss_bbox*2 + loss_giou/5`.
DET_PRESETS: dict[str, tuple[float, float]] = {"paper": (1.0, 0.4), "released": (2.0, 0.2)}


def _check_shape(name: str, x: jax.Array, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _masked_mean(per_item: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of per_item [...] over mask [...] (bool); 0 when the mask is empty."""
    mask = mask.astype(per_item.dtype)
    return jnp.sum(per_item * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy with the HF shift: logits[:, t] predicts labels[:, t + 1].

    logits f32[B,T,V], labels int[B,T] (-100 = ignored) -> (mean loss over counted tokens (0 if none),
    number of counted tokens int32[]). Computed in float32.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be [B,T,V] and [B,T]")
    return target_cross_entropy(logits[:, :-1], labels[:, 1:])


def target_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of logits f32[B,K,V] against aligned targets int[B,K] (-100 = ignored), no shift ->
    (mean over counted targets (0 if none), number counted int32[]). Computed in float32."""
    counted = targets != IGNORE
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(counted, targets, 0))
    return _masked_mean(nll, counted), jnp.sum(counted, dtype=jnp.int32)


def supervised_positions(labels: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The first k positions t of each row whose next label counts (labels[:, t + 1] != -100), with those labels.

    labels int[B,T] -> (positions int32[B,k], targets int32[B,k]; -100 where a row has fewer than k). The LM
    head then runs on k states per row instead of T, with the same loss as `token_cross_entropy` as long as
    no row has more than k counted labels (`count_supervised` tells).
    """
    counted = labels[:, 1:] != IGNORE  # [B,T-1]
    order = jnp.argsort(~counted, axis=1, stable=True)[:, :k].astype(jnp.int32)  # counted positions first, in order
    targets = jnp.take_along_axis(labels[:, 1:], order, axis=1)
    return order, jnp.where(jnp.take_along_axis(counted, order, axis=1), targets, IGNORE).astype(jnp.int32)


def count_supervised(labels) -> int:
    """The largest number of counted next-token labels in a row of labels int[B,T] (numpy or JAX)."""
    return int((labels[:, 1:] != IGNORE).sum(axis=1).max(initial=0))


def detection_loss(
    pred: jax.Array, target: jax.Array, mask: jax.Array, w_l1: float, w_giou: float
) -> dict[str, jax.Array]:
    """L_det between predicted and ground-truth xyxy boxes pred/target f32[B,Q,4], mask bool[B,Q].

    l1: |pred - target| averaged over the 4 coordinates and the real boxes; giou: mean (1 - GIoU) over the
    real boxes; det = w_l1 * l1 + w_giou * giou. Every term is 0 for a batch without boxes.
    Differences from the released code, on purpose: it drops inverted predictions from the GIoU mean (here
    they stay in, with zero area, so GIoU still pulls them towards the target), and its `masked_loss` weights
    the batch's last box by 1e-10, which silently drops it (here every real box counts).
    """
    _check_shape("target", target, pred.shape)
    _check_shape("mask", mask, pred.shape[:-1])
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    l1 = _masked_mean(jnp.mean(jnp.abs(pred - target), axis=-1), mask)
    giou = _masked_mean(1.0 - box_ops.giou(pred, target), mask)
    return {"l1": l1, "giou": giou, "det": w_l1 * l1 + w_giou * giou}


def cycle_loss(
    boxes: jax.Array,
    box_mask: jax.Array,
    decode_of_encode: jax.Array,
    triggers: jax.Array,
    trigger_mask: jax.Array,
    encode_of_decode: jax.Array,
) -> dict[str, jax.Array]:
    """L_cyc = L1(b, F(G(b))) + MSE(t, G(F(t))).

    boxes, decode_of_encode f32[B,Q,4] with box_mask bool[B,Q] (the input boxes b and F(G(b)));
    triggers, encode_of_decode [B,Q,D] with trigger_mask bool[B,Q] (trigger states t and G(F(t))).
    cyc_box: L1 averaged over coordinates and real boxes; cyc_emb: squared error averaged over D and real
    triggers; cyc = cyc_box + cyc_emb.

    No stop_gradient, as in the official code (`NextChatForCausalLM.forward` in
    mllm/models/nextchat/nextchat_base.py: `F.mse_loss(loc_encoder(pred_locs), selected_hidden_states)` and
    `F.l1_loss(loc_decoder(loc_embeds), loc_inputs)`, nothing detached): the MSE term also trains the LLM's
    trigger states t, and both terms train F and G.
    """
    _check_shape("decode_of_encode", decode_of_encode, boxes.shape)
    _check_shape("box_mask", box_mask, boxes.shape[:-1])
    _check_shape("encode_of_decode", encode_of_decode, triggers.shape)
    _check_shape("trigger_mask", trigger_mask, triggers.shape[:-1])
    box_err = jnp.mean(jnp.abs(decode_of_encode.astype(jnp.float32) - boxes.astype(jnp.float32)), axis=-1)
    emb_err = jnp.mean(jnp.square(encode_of_decode.astype(jnp.float32) - triggers.astype(jnp.float32)), axis=-1)
    cyc_box = _masked_mean(box_err, box_mask)
    cyc_emb = _masked_mean(emb_err, trigger_mask)
    return {"cyc_box": cyc_box, "cyc_emb": cyc_emb, "cyc": cyc_box + cyc_emb}
