"""Mask losses against hand-computed values and a direct NumPy reimplementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxground.ops import mask_losses as L


def _np_terms(x, t):
    p = 1 / (1 + np.exp(-x))
    bce = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    focal = 0.8 * (1 - np.exp(-bce)) ** 2 * bce
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    lisa = 1 - (2 * (p / 1000 * t).sum() + 1e-6) / ((p / 1000).sum() + (t / 1000).sum() + 1e-6)
    pb, tb = x > 0, t > 0.5
    union = (pb | tb).sum()
    iou = (pb & tb).sum() / union if union else 1.0
    return bce, focal, dice, lisa, iou


def test_hand_values():
    x = jnp.zeros((1, 1, 2, 2))
    t = jnp.array([[[[1.0, 0.0], [0.0, 0.0]]]])
    np.testing.assert_allclose(L.mean_bce(x, t), [[np.log(2)]], rtol=1e-6)
    np.testing.assert_allclose(L.dice(x, t), [[1 - (2 * 0.5 + 1) / (2 + 1 + 1)]], rtol=1e-6)
    np.testing.assert_allclose(L.mask_iou(x, t), [[0.0]])  # logits 0 are not > 0: empty prediction
    np.testing.assert_allclose(L.mask_iou(x, jnp.zeros_like(t)), [[1.0]])  # both empty


@pytest.mark.parametrize("preset", ["focal", "lisa"])
def test_against_numpy_with_padding(preset):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (2, 3, 8, 8)).astype(np.float32)
    t = (rng.random((2, 3, 8, 8)) > 0.6).astype(np.float32)
    t[0, 1] = 0  # an empty ground truth
    iou_pred = rng.random((2, 3)).astype(np.float32)
    valid = np.array([[True, True, False], [True, False, False]])
    total, _ = L.seg_loss(jnp.asarray(x), jnp.asarray(t), jnp.asarray(iou_pred), jnp.asarray(valid), preset)
    rows = [(b, q) for b in range(2) for q in range(3) if valid[b, q]]
    terms = np.array([_np_terms(x[b, q].astype(np.float64), t[b, q]) for b, q in rows])
    bce, foc, dice, lisa, _ = terms.mean(0)
    mse = np.mean([(iou_pred[b, q] - terms[i, 4]) ** 2 for i, (b, q) in enumerate(rows)])
    want = {"focal": 20 * foc + dice + mse, "lisa": 2 * bce + 0.5 * lisa}[preset]
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    # padded masks do not count: garbage there changes nothing
    x2 = x.copy()
    x2[1, 2] = 1e4
    total2, _ = L.seg_loss(jnp.asarray(x2), jnp.asarray(t), jnp.asarray(iou_pred), jnp.asarray(valid), preset)
    assert float(total2) == pytest.approx(float(total), rel=1e-6)


def test_released_is_what_the_official_forward_computes():
    """The official `SamLoss` (NExT-Chat `mllm/models/sam/sam_loss.py`) written out in torch: its forward loops over
    the masks ([1, H, W] each) and passes `num_masks` positionally into the focal's alpha and the dice's smoothing."""
    import torch
    import torch.nn.functional as F

    def focal(x, t, alpha, gamma=2):
        bce = F.binary_cross_entropy_with_logits(x.reshape(-1), t.reshape(-1), reduction="mean")
        return alpha * (1 - torch.exp(-bce)) ** gamma * bce

    def dice(x, t, smooth):
        p = torch.clamp(torch.sigmoid(x), 0, 1).reshape(-1)
        return 1 - (2 * (p * t.reshape(-1)).sum() + smooth) / (p.sum() + t.reshape(-1).sum() + smooth)

    def calc_iou(x, t):
        p = x >= 0.5
        inter = torch.sum(p * t, dim=(1, 2))
        return inter / (torch.sum(p, dim=(1, 2)) + torch.sum(t, dim=(1, 2)) - inter + 1e-7)

    rng = np.random.default_rng(1)
    counts = [1, 2, 1]  # masks per image, padded to 2 for jaxground
    x = rng.normal(0, 3, (3, 2, 8, 8)).astype(np.float32)
    t = (rng.random((3, 2, 8, 8)) > 0.5).astype(np.float32)
    t[2, 0] = 0  # an empty ground truth
    iou_pred = rng.random((3, 2)).astype(np.float32)
    valid = np.arange(2)[None] < np.array(counts)[:, None]
    rows = [(b, q) for b in range(3) for q in range(counts[b])]
    preds = [torch.from_numpy(x[b, q][None]) for b, q in rows]
    gts = [torch.from_numpy(t[b, q][None]) for b, q in rows]
    ious = [torch.from_numpy(iou_pred[b, q][None]) for b, q in rows]
    n = sum(len(p) for p in preds)
    want_focal = sum(focal(p, g, n) for p, g in zip(preds, gts))
    want_dice = sum(dice(p, g, n) for p, g in zip(preds, gts))
    want_iou = sum(F.mse_loss(i, calc_iou(p, g), reduction="sum") / n for p, g, i in zip(preds, gts, ious))
    total, parts = L.seg_loss(jnp.asarray(x), jnp.asarray(t), jnp.asarray(iou_pred), jnp.asarray(valid), "released")
    np.testing.assert_allclose(float(parts["focal"]), float(want_focal), rtol=1e-5)
    np.testing.assert_allclose(float(parts["dice"]), float(want_dice), rtol=1e-5)
    np.testing.assert_allclose(float(parts["iou_mse"]), float(want_iou), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(20 * want_focal + want_dice + want_iou), rtol=1e-5)


def test_no_nan_extremes_and_gradients():
    x = jnp.array([[[[1e4, -1e4], [0.0, 50.0]]], [[[-1e4, -1e4], [-1e4, -1e4]]]])
    t = jnp.array([[[[0.0, 1.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    iou = jnp.zeros((2, 1))
    for preset in L.NAMES:
        for valid in (jnp.ones((2, 1), bool), jnp.zeros((2, 1), bool)):
            val, grad = jax.value_and_grad(lambda x, v=valid, p=preset: L.seg_loss(x, t, iou, v, p)[0])(x)
            assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="unknown mask-loss preset"):
        L.seg_loss(jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1)), jnp.ones((1, 1), bool), "sam")
    with pytest.raises(ValueError, match="must both be"):
        L.seg_loss(
            jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1, 4, 5)), jnp.zeros((1, 1)), jnp.ones((1, 1), bool)
        )
