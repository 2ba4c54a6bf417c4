"""Metrics against hand-computed values and a direct NumPy loop; padded rows never count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxground.eval import metrics


def np_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_rec_sums_match_numpy_loop_and_are_finite():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 2, (200, 4)).astype(np.float32)  # includes inverted / zero-area boxes
    b = rng.uniform(-1, 2, (200, 4)).astype(np.float32)
    got = jax.jit(metrics.rec_sums)(a, b, np.ones(200, bool))
    want = np.array([np_iou(x, y) for x, y in zip(a, b)])
    assert np.isfinite(float(got["iou"]))
    assert float(got["iou"]) == pytest.approx(want.sum(), rel=1e-5)
    assert float(got["correct"]) == (want > 0.5).sum()


def test_rec_sums_skip_padding_and_use_strict_threshold():
    pred = jnp.array([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 4, 1], [0, 0, 2, 2]], jnp.float32)
    gt = jnp.array([[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 2, 1], [0, 0, 2, 2]], jnp.float32)
    valid = jnp.array([True, True, True, False])
    s = metrics.Sums()
    s.add(metrics.rec_sums(pred, gt, valid))
    out = metrics.rec_summary(s.total)
    # IoUs 1, 1/7, exactly 0.5 (not > 0.5); the padded perfect row is ignored
    assert out["count"] == 3
    assert out["acc@0.5"] == pytest.approx(1 / 3)
    assert out["miou"] == pytest.approx((1 + 1 / 7 + 0.5) / 3, rel=1e-6)


def test_rec_summary_over_batches_equals_one_pass():
    rng = np.random.default_rng(1)
    lo = rng.uniform(0, 0.5, (10, 2))
    pred = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (10, 2))], 1).astype(np.float32)
    gt = np.clip(pred + rng.normal(0, 0.1, pred.shape), 0, 1).astype(np.float32)
    s = metrics.Sums()
    for start in range(0, 10, 4):  # batches of 4, the last padded with 2 rows
        idx = np.arange(start, start + 4)
        valid = idx < 10
        idx = np.minimum(idx, 9)
        s.add(metrics.rec_sums(pred[idx], gt[idx], valid))
    ious = np.array([np_iou(p, g) for p, g in zip(pred, gt)])
    out = metrics.rec_summary(s.total)
    assert out["count"] == 10
    assert out["acc@0.5"] == pytest.approx(np.mean(ious > 0.5))
    assert out["miou"] == pytest.approx(ious.mean(), rel=1e-5)


def test_pointing_accuracy():
    cands = jnp.array([[[0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 3, 3], [9, 9, 9, 9]]] * 3, jnp.float32)
    mask = jnp.array([[True, True, True, False]] * 3)
    pred = jnp.array([[2.1, 2.1, 3, 3], [0, 0, 2.9, 3], [9, 9, 9.5, 9.5]], jnp.float32)
    np.testing.assert_array_equal(metrics.pointing_choice(pred, cands, mask)[:2], [1, 2])
    s = metrics.pointing_sums(pred, cands, mask, jnp.array([1, 0, 3]), jnp.array([True, True, True]))
    # row 3 overlaps only the masked-out candidate, so it cannot pick it
    assert metrics.pointing_summary(s) == {"accuracy": pytest.approx(1 / 3), "count": 3}


def test_res_summary_hand_values():
    # two expressions: I/U = 2/4 and 0/0 (empty prediction and empty ground truth counts 1)
    out = metrics.res_summary({"intersection": 2.0, "union": 4.0, "iou": 0.5 + 1.0, "count": 2})
    assert out == {"ciou": 0.5, "giou": 0.75, "count": 2}
