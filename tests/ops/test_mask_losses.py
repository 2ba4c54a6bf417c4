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


@pytest.mark.parametrize("preset", ["focal", "lisa", "released"])
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
    want = {"focal": 20 * foc + dice + mse, "lisa": 2 * bce + 0.5 * lisa, "released": bce + 0.25 * lisa}[preset]
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    # padded masks do not count: garbage there changes nothing
    x2 = x.copy()
    x2[1, 2] = 1e4
    total2, _ = L.seg_loss(jnp.asarray(x2), jnp.asarray(t), jnp.asarray(iou_pred), jnp.asarray(valid), preset)
    assert float(total2) == pytest.approx(float(total), rel=1e-6)


def test_released_is_what_the_official_forward_computes():
    """The official `SamLoss.forward` written out in torch (per image: its masks' summed mean-pixel BCE and LISA
    dice, weights 2 and 0.5, divided by a `num_masks` that counts each mask twice)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    counts = [1, 2, 1]  # masks per image; padded to 2 for jaxground
    x = rng.normal(0, 3, (3, 2, 8, 8)).astype(np.float32)
    t = (rng.random((3, 2, 8, 8)) > 0.5).astype(np.float32)
    valid = np.arange(2)[None] < np.array(counts)[:, None]
    preds, gts = [torch.from_numpy(x[i, :n]) for i, n in enumerate(counts)], [torch.from_numpy(t[i, :n])
                                                                               for i, n in enumerate(counts)]
    num_masks, bce, dice = sum(len(p) for p in preds), 0.0, 0.0
    for p, g in zip(preds, gts):
        bce = bce + F.binary_cross_entropy_with_logits(p, g, reduction="none").flatten(1).mean(1).sum()
        q = p.sigmoid().flatten(1) / 1000
        dice = dice + (1 - (2 * (q * g.flatten(1)).sum(-1) + 1e-6) / (q.sum(-1) + (g.flatten(1) / 1000).sum(-1)
                                                                      + 1e-6)).sum()
        num_masks += g.shape[0]
    want = 2 * bce / num_masks + 0.5 * dice / num_masks
    total, _ = L.seg_loss(jnp.asarray(x), jnp.asarray(t), jnp.zeros((3, 2)), jnp.asarray(valid), "released")
    np.testing.assert_allclose(float(total), float(want), rtol=1e-5)


def test_no_nan_extremes_and_gradients():
    x = jnp.array([[[[1e4, -1e4], [0.0, 50.0]]], [[[-1e4, -1e4], [-1e4, -1e4]]]])
    t = jnp.array([[[[0.0, 1.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    iou = jnp.zeros((2, 1))
    for preset in L.PRESETS:
        for valid in (jnp.ones((2, 1), bool), jnp.zeros((2, 1), bool)):
            val, grad = jax.value_and_grad(lambda x, v=valid, p=preset: L.seg_loss(x, t, iou, v, p)[0])(x)
            assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="must both be"):
        L.seg_loss(
            jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1, 4, 5)), jnp.zeros((1, 1)), jnp.ones((1, 1), bool)
        )
