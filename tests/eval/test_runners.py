"""Runners over padded evaluation batches: each sample counted once; POPE runner."""

import numpy as np
import pytest

from jaxground.eval.metrics import rec_sums
from jaxground.eval.runners import run_pope, run_rec


def batches(pred, target, batch_size):
    n = len(pred)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n
        idx = np.where(valid, idx, 0)  # pad rows repeat sample 0: they must not count
        yield {"pred": pred[idx], "target": target[idx], "valid": valid}


def step(batch):
    return {"sums": rec_sums(batch["pred"], batch["target"], batch["valid"]), "pred": batch["pred"],
            "target": batch["target"]}


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 16])
def test_padded_batches_count_each_sample_once(batch_size):
    target = np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (7, 1))
    pred = target.copy()
    pred[0] = [0.6, 0.6, 0.9, 0.9]  # sample 0 (the padding source) is wrong: padding it would lower acc
    summary, rows = run_rec(step, batches(pred, target, batch_size))
    assert summary["count"] == 7 and len(rows) == 7
    assert summary["acc@0.5"] == pytest.approx(6 / 7)
    assert [r["index"] for r in rows] == list(range(7))


def test_run_pope():
    metrics, rows = run_pope(["The answer is yes .", "The answer is no .", "yes"], ["yes", "yes", "no"])
    assert [r["pred"] for r in rows] == ["yes", "no", "yes"]
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["yes_ratio"] == pytest.approx(2 / 3)
