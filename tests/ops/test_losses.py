"""Token cross-entropy against torch, detection and cycle losses: values, masking, degenerate boxes."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxground.ops import losses as L


def test_token_cross_entropy_matches_torch_shifted():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (2, 6)).astype(np.int32)
    labels[0, :3] = -100
    labels[1, 4] = -100
    loss, n = L.token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1]).reshape(-1, 11), torch.from_numpy(labels[:, 1:]).long().reshape(-1)
    )
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
    assert int(n) == int((labels[:, 1:] != -100).sum()) == 7


def test_token_cross_entropy_empty_and_bad_shape():
    loss, n = L.token_cross_entropy(jnp.zeros((1, 4, 5)), jnp.full((1, 4), -100))
    assert float(loss) == 0.0 and int(n) == 0
    with pytest.raises(ValueError, match="labels"):
        L.token_cross_entropy(jnp.zeros((1, 4, 5)), jnp.zeros((1, 3), jnp.int32))


def test_detection_loss_values_and_mask():
    pred = jnp.array([[[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2]]])
    target = jnp.array([[[0.25, 0.25, 0.75, 0.75], [9.0, 9.0, 9.0, 9.0]]])  # second is padding
    mask = jnp.array([[True, False]])
    out = L.detection_loss(pred, target, mask, *L.DET_PRESETS["released"])
    giou = 1 / 7 - (2 / 16) / (9 / 16)
    np.testing.assert_allclose(out["l1"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(out["giou"], 1 - giou, rtol=1e-6)
    np.testing.assert_allclose(out["det"], 2.0 * 0.25 + 0.2 * (1 - giou), rtol=1e-6)
    empty = L.detection_loss(pred, target, jnp.zeros_like(mask), *L.DET_PRESETS["paper"])
    assert all(float(v) == 0.0 for v in empty.values())
    with pytest.raises(ValueError, match="mask"):
        L.detection_loss(pred, target, mask[:, :1], 1.0, 1.0)


def test_cycle_loss_zero_for_inverse_pair_and_gradients_flow():
    rng = np.random.default_rng(0)
    boxes = jnp.asarray(rng.uniform(size=(2, 3, 4)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    mask = jnp.array([[True, True, False], [True, False, False]])
    # G(b) = b @ W with W of full column rank, F = pseudo-inverse: F(G(b)) == b exactly in theory.
    w = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    w_pinv = jnp.linalg.pinv(w)
    out = L.cycle_loss(boxes, mask, (boxes @ w) @ w_pinv, t, mask, ((t @ w_pinv) @ w))
    assert float(out["cyc_box"]) < 1e-5
    assert float(out["cyc_emb"]) > 0.1  # G∘F is a rank-4 projection of 8-d states, not the identity
    exact = L.cycle_loss(boxes, mask, boxes, t, mask, t)
    assert float(exact["cyc"]) == 0.0
    # No stop_gradient: the MSE term reaches the trigger states t (as in the official code).
    g = jax.grad(lambda t_: L.cycle_loss(boxes, mask, boxes, t_, mask, 2.0 * t_)["cyc"])(t)
    assert float(jnp.abs(g).sum()) > 0 and float(jnp.abs(g[~mask]).sum()) == 0.0


coord = st.floats(-2.0, 2.0, width=32)
boxes_strat = hnp.arrays(np.float32, (2, 3, 4), elements=coord)


def _all_losses(pred, target, mask, logits, labels):
    det = L.detection_loss(pred, target, mask, *L.DET_PRESETS["released"])["det"]
    states = jnp.concatenate([pred, target], -1)
    cyc = L.cycle_loss(target, mask, pred, states, mask, 2 * states)["cyc"]
    ce = L.token_cross_entropy(logits, labels)[0]
    return det + cyc + ce


_loss_and_grads = jax.jit(jax.value_and_grad(_all_losses, argnums=(0, 1, 3)))


@settings(max_examples=40, deadline=None)
@given(pred=boxes_strat, target=boxes_strat, mask=hnp.arrays(bool, (2, 3)), copy=st.booleans())
def test_losses_finite_with_finite_gradients(pred, target, mask, copy):
    if copy:
        target = pred.copy()  # identical (possibly inverted / zero-area) boxes
    logits = jnp.asarray(pred.reshape(2, 3, 4) * 3)
    labels = jnp.where(jnp.asarray(mask), 1, -100)
    value, grads = _loss_and_grads(pred, target, mask, logits, labels)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_supervised_positions_pick_counted_next_labels_in_order():
    labels = np.array([[-100, -100, 5, 6, -100, 7], [-100, 3, -100, -100, -100, -100]], np.int32)
    pos, tgt = L.supervised_positions(jnp.asarray(labels), 4)
    np.testing.assert_array_equal(pos[0, :3], [1, 2, 4])  # labels at 2, 3, 5 are predicted from t = 1, 2, 4
    np.testing.assert_array_equal(tgt, [[5, 6, 7, -100], [3, -100, -100, -100]])
    assert pos[1, 0] == 0
    assert L.count_supervised(labels) == 3 and L.count_supervised(labels[:, :1]) == 0
    logits = jax.random.normal(jax.random.key(0), (2, 6, 9))
    full = L.token_cross_entropy(logits, jnp.asarray(labels))
    part = L.target_cross_entropy(jnp.take_along_axis(logits, pos[..., None], axis=1), tgt)
    np.testing.assert_allclose(float(part[0]), float(full[0]), rtol=1e-6)
    assert int(part[1]) == int(full[1]) == 4
