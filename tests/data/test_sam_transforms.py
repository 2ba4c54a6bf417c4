"""SAM transforms: box/mask consistency, the official rounding, and postprocessing vs torch F.interpolate."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxground.data import sam_transforms as T


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("pad", ["center", "bottom_right"])
@pytest.mark.parametrize("hw", [(300, 500), (640, 480), (77, 77)])
def test_box_drawn_as_mask_stays_its_box(pad, hw):
    rng = np.random.default_rng(hw[0])
    geo = T.geometry(hw, 256, pad)
    for _ in range(5):
        x0, x1 = np.sort(rng.choice(hw[1], 2, replace=False))
        y0, y1 = np.sort(rng.choice(hw[0], 2, replace=False))
        mask = np.zeros(hw, np.uint8)
        mask[y0 : y1 + 1, x0 : x1 + 1] = 1
        box = np.array([x0, y0, x1 + 1, y1 + 1], np.float32)
        np.testing.assert_allclose(_bbox(T.mask_to_sam(mask, geo)), T.boxes_to_sam(box, geo), atol=1.0)


def test_geometry_and_image():
    geo = T.geometry((300, 500), 1024, "center")
    assert geo.resized_hw == (614, 1024) and geo.offset == (205, 0)
    assert T.geometry((300, 500), 1024, "bottom_right").offset == (0, 0)
    img, geo = T.preprocess_image(np.full((30, 50, 3), 255, np.uint8), 64, "center")
    assert img.shape == (64, 64, 3)
    np.testing.assert_allclose(img[32, 10], (255 - T.PIXEL_MEAN) / T.PIXEL_STD, rtol=1e-6)
    assert (img[0] == 0).all()  # padding rows
    np.testing.assert_allclose(T.normalized_boxes_to_sam(np.array([0.5, 0.5, 1, 1])), [512, 512, 1024, 1024])
    with pytest.raises(ValueError, match="pad must be"):
        T.geometry((3, 3), 64, "left")


@pytest.mark.parametrize("pad", ["center", "bottom_right"])
def test_postprocess_matches_torch(pad):
    geo = T.geometry((100, 60), 128, pad)
    low = np.random.default_rng(0).normal(size=(2, 32, 32)).astype(np.float32)
    t = F.interpolate(torch.from_numpy(low)[None], (128, 128), mode="bilinear", align_corners=False)
    (top, left), (nh, nw) = geo.offset, geo.resized_hw
    t = F.interpolate(
        t[..., top : top + nh, left : left + nw], (100, 60), mode="bilinear", align_corners=False
    )[0]
    out = np.asarray(T.postprocess_masks(jnp.asarray(low), geo))
    assert out.shape == (2, 100, 60)
    np.testing.assert_allclose(out, t.numpy(), atol=1e-5)


def test_a_sliver_of_an_image_keeps_one_pixel():
    """A 3x500 image at target 64 would round its short side to 0 (the official rounding fails there): it keeps one
    pixel, and a predicted mask maps back to the image's own size."""
    image = np.full((3, 500, 3), 200, np.uint8)
    out, geo = T.preprocess_image(image, target=64)
    assert geo.resized_hw == (1, 64) and out.shape == (64, 64, 3)
    assert T.postprocess_masks(jnp.ones((1, 16, 16)), geo).shape == (1, 3, 500)
