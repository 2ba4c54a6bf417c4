"""cIoU / gIoU sums against hand-computed values and NumPy."""

import jax.numpy as jnp
import numpy as np

from jaxground.ops import mask_metrics as M


def test_hand_values_and_accumulation():
    pred = np.zeros((1, 3, 2, 2), bool)
    gt = np.zeros((1, 3, 2, 2), bool)
    pred[0, 0, 0, :] = True  # 2 px
    gt[0, 0, :, 0] = True  # 2 px, 1 overlap -> inter 1, union 3
    pred[0, 1] = True  # 4 px vs empty gt: inter 0, union 4
    # mask 2: both empty -> IoU 1, union 0
    sums = M.res_sums(jnp.asarray(pred), jnp.asarray(gt), jnp.ones((1, 3), bool))
    assert float(sums["intersection"]) == 1 and float(sums["union"]) == 7 and float(sums["count"]) == 3
    np.testing.assert_allclose(float(sums["iou"]), 1 / 3 + 0 + 1)
    more = M.res_sums(jnp.asarray(gt), jnp.asarray(gt), jnp.array([[True, False, False]]))
    both = {k: sums[k] + more[k] for k in sums}
    scores = M.res_scores(both)
    np.testing.assert_allclose(scores["ciou"], (1 + 2) / (7 + 2))
    np.testing.assert_allclose(scores["giou"], (1 / 3 + 0 + 1 + 1) / 4)


def test_against_numpy():
    rng = np.random.default_rng(0)
    pred, gt = rng.random((3, 4, 6, 6)) > 0.5, rng.random((3, 4, 6, 6)) > 0.7
    valid = rng.random((3, 4)) > 0.3
    sums = M.res_sums(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(valid))
    inter = (pred & gt).sum((2, 3))[valid]
    union = (pred | gt).sum((2, 3))[valid]
    np.testing.assert_allclose(float(sums["intersection"]), inter.sum())
    np.testing.assert_allclose(float(sums["union"]), union.sum())
    np.testing.assert_allclose(
        float(sums["iou"]), np.where(union > 0, inter / np.maximum(union, 1), 1).sum(), rtol=1e-6
    )
    np.testing.assert_allclose(
        M.iou_of_counts(*M.intersection_union(jnp.asarray(pred), jnp.asarray(gt)))[valid], inter / union, rtol=1e-6
    )
