"""Task runners: iterate padded evaluation batches (dicts of `Batch` fields with a `valid` row mask), call a
jitted per-batch function, add up metric sums on the host and collect per-sample predictions.

A padded row (`valid=False`) contributes to no sum and no prediction line, so every sample of a split is
counted exactly once whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from jaxground.eval.metrics import Sums, rec_sums, rec_summary
from jaxground.eval.pope import PARSERS, pope_metrics


def rec_teacher_forced_step(model, batch: dict) -> dict:
    """One forward pass with the answer "<at> <boxes>" given (as the authors evaluate REC): per-batch sums
    and the predicted / target boxes of the first trigger of each row."""
    from jaxground.data.batch import Batch

    b = Batch(**batch)
    out = model(b)
    sums = rec_sums(out.pred_boxes[:, 0], b.target_boxes[:, 0], b.valid & b.target_mask[:, 0])
    return {"sums": sums, "pred": out.pred_boxes[:, 0], "target": b.target_boxes[:, 0]}


def run_rec(step: Callable[[dict], dict], batches: Iterable[dict]) -> tuple[dict, list[dict]]:
    """step(batch) -> {"sums", "pred" [B,4], "target" [B,4]} -> (Acc@0.5 / mIoU summary, prediction rows)."""
    total, rows = Sums(), []
    for batch in batches:
        out = step(batch)
        total.add(out["sums"])
        pred, target = np.asarray(out["pred"]), np.asarray(out["target"])
        for i in np.flatnonzero(np.asarray(batch["valid"])):
            rows.append({"index": len(rows), "pred": pred[i].round(4).tolist(), "target": target[i].round(4).tolist()})
    return rec_summary(total.total), rows


def run_pope(answers: Iterable[str], labels: Iterable[str], parser: str = "nextchat") -> tuple[dict, list[dict]]:
    """Generated answers and "yes"/"no" labels -> (POPE metrics, prediction rows)."""
    parse = PARSERS[parser]
    rows = [{"answer": a, "pred": "yes" if parse(a) else "no", "label": str(y).lower()} for a, y in zip(answers, labels)]
    metrics = pope_metrics([r["pred"] == "yes" for r in rows], [r["label"] == "yes" for r in rows])
    return metrics, rows
