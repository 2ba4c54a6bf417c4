"""Evaluation metrics as pure functions of arrays, plus a host-side accumulator over padded batches.

Axes: B batch, C candidate boxes. Boxes are xyxy (any consistent unit). Every per-batch function takes a
`valid[B]` row mask: rows that only pad the last evaluation batch contribute nothing, so a split is counted
exactly once whatever the batch size. Sums are returned (not means) so batches can be added up exactly.

Definitions (as the NExT-Chat authors compute them):
- REC Acc@0.5: share of samples whose predicted box has IoU > 0.5 (strict) with the ground truth; mIoU is
  the mean IoU (`ops.boxes.iou`: a degenerate box scores 0, never NaN). Runners score the raw prediction in
  the padded square's [0, 1] coordinates, unclamped: IoU is invariant to the uniform scale and shift that maps
  them to pixels, so this equals scoring the unclamped pixel box.
- Visual7W pointing: the predicted box picks the candidate it overlaps most (IoU); accuracy is the share
  of samples whose pick is the answer candidate.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxground.ops.boxes import iou as box_iou
from jaxground.ops.mask_metrics import res_scores


def rec_sums(pred, gt, valid, threshold: float = 0.5) -> dict:
    """pred[B,4], gt[B,4], valid[B] -> {"correct", "iou", "count"} summed over valid rows."""
    iou = box_iou(pred, gt)
    v = valid.astype(jnp.float32)
    return {"correct": jnp.sum((iou > threshold) * v), "iou": jnp.sum(iou * v), "count": jnp.sum(v)}


def rec_summary(sums: Mapping) -> dict:
    n = float(sums["count"])
    return {"acc@0.5": float(sums["correct"]) / max(n, 1.0), "miou": float(sums["iou"]) / max(n, 1.0), "count": int(n)}


def pointing_choice(pred, candidates, candidate_mask):
    """pred[B,4], candidates[B,C,4], candidate_mask[B,C] -> index[B] of the candidate with the highest IoU."""
    iou = box_iou(pred[:, None, :], candidates)
    return jnp.argmax(jnp.where(candidate_mask, iou, -1.0), axis=-1)


def pointing_sums(pred, candidates, candidate_mask, answer, valid) -> dict:
    """Visual7W pointing: {"correct", "count"} over valid rows; answer[B] is the right candidate's index."""
    v = valid.astype(jnp.float32)
    hit = pointing_choice(pred, candidates, candidate_mask) == answer
    return {"correct": jnp.sum(hit * v), "count": jnp.sum(v)}


def pointing_summary(sums: Mapping) -> dict:
    n = float(sums["count"])
    return {"accuracy": float(sums["correct"]) / max(n, 1.0), "count": int(n)}


def res_summary(sums: Mapping) -> dict:
    """From {"intersection", "union", "iou", "count"} sums: `ops.mask_metrics.res_scores` and the count."""
    return {**res_scores(sums), "count": int(sums["count"])}


def res_gen_summary(sums: Mapping) -> dict:
    """RES by generation (`steps.res_generated_step`'s sums): `res_summary` of the first trigger's masks (none:
    empty), `ciou_released` (the released rule: empty unless exactly one trigger) and the counts no_trigger,
    multi_trigger, failed."""
    released = res_scores({k: sums[f"released_{k}"] for k in ("intersection", "union", "iou", "count")})
    counts = {k: int(sums[k]) for k in ("no_trigger", "multi_trigger", "failed")}
    return {**res_summary(sums), "ciou_released": released["ciou"], **counts}


class Sums:
    """Adds dicts of scalar sums across batches on the host (float64, so nothing is lost to rounding)."""

    def __init__(self):
        self.total: dict[str, float] = {}

    def add(self, sums: Mapping) -> None:
        for key, value in sums.items():
            self.total[key] = self.total.get(key, 0.0) + float(np.asarray(value, dtype=np.float64))

    def __getitem__(self, key: str) -> float:
        return self.total.get(key, 0.0)
