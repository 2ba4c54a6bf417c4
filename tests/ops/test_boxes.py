"""Box ops against HF's DETR helpers (torch), hand-computed cases, and degenerate-box properties."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.loss.loss_for_object_detection import box_iou, generalized_box_iou

from jaxground.ops import boxes as B


def _random_boxes(rng, n):
    xy = rng.uniform(0, 1, (n, 2, 2))
    return np.concatenate([xy.min(1), xy.max(1)], axis=-1).astype(np.float32)


def test_all_pairs_match_hf():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
    ref_iou, _ = box_iou(torch.from_numpy(a), torch.from_numpy(b))
    ref_giou = generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(B.iou(a[:, None], b[None]), ref_iou.numpy(), atol=1e-6)
    np.testing.assert_allclose(B.giou(a[:, None], b[None]), ref_giou.numpy(), atol=1e-6)
    # elementwise = the diagonal of all pairs
    np.testing.assert_allclose(B.giou(a[:5], b), np.diag(ref_giou.numpy()[:5]), atol=1e-6)


def test_hand_computed():
    a = jnp.array([0.0, 0.0, 0.5, 0.5])
    b = jnp.array([0.25, 0.25, 0.75, 0.75])
    # inter 1/16, union 7/16, enclosing 9/16
    np.testing.assert_allclose(B.iou(a, b), 1 / 7, rtol=1e-6)
    np.testing.assert_allclose(B.giou(a, b), 1 / 7 - (2 / 16) / (9 / 16), rtol=1e-6)
    far = jnp.array([0.5, 0.5, 1.0, 1.0])
    # disjoint: IoU 0, union 1/16 + 1/4, enclosing 1
    np.testing.assert_allclose(B.giou(jnp.array([0.0, 0.0, 0.25, 0.25]), far), -(1 - 5 / 16), rtol=1e-6)
    assert B.iou(a, a) == pytest.approx(1.0) and B.giou(a, a) == pytest.approx(1.0)
    assert B.area(jnp.array([0.6, 0.1, 0.2, 0.9])) == 0.0  # inverted -> zero area



_VALUE_AND_GRADS = [jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for f in (B.iou, B.giou)]
coord = st.floats(-2.0, 2.0, width=32)
box4 = hnp.arrays(np.float32, (4,), elements=coord)


@settings(max_examples=60, deadline=None)
@given(a=box4, b=box4, same=st.booleans(), flat=st.integers(0, 2))
def test_degenerate_finite_values_and_grads(a, b, same, flat):
    if same:
        b = a.copy()
    if flat == 1:
        a[2] = a[0]  # zero width
    elif flat == 2:
        a[2:] = a[:2]  # a point
    for f in _VALUE_AND_GRADS:
        v, (ga, gb) = f(jnp.asarray(a), jnp.asarray(b))
        assert np.isfinite(v) and np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    assert 0.0 <= B.iou(a, b) <= 1.0 + 1e-6
    assert -1.0 - 1e-6 <= B.giou(a, b) <= 1.0 + 1e-6
