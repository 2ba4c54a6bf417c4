import numpy as np
import pytest

from jaxground.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    boxes_to_square,
    clip_image,
    expand2square,
    image_region,
    masks_to_square,
    polygons_to_mask,
    square_offsets,
)


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("h,w", [(30, 50), (50, 30), (40, 40), (31, 52)])
def test_box_and_mask_stay_consistent(h, w):
    rng = np.random.default_rng(h * w)
    masks = np.zeros((3, h, w), bool)
    for m in masks:
        x0, y0 = rng.integers(0, w - 6), rng.integers(0, h - 6)
        m[y0 : y0 + rng.integers(3, 6), x0 : x0 + rng.integers(3, 6)] = True  # >= 3 px: survives the 24 px resize
    boxes = np.stack([_bbox(m) for m in masks])
    side = max(h, w)
    sq_boxes = boxes_to_square(boxes, h, w)
    sq_masks = masks_to_square(masks, side)  # padding only: exact
    for b, m in zip(sq_boxes, sq_masks):
        np.testing.assert_allclose(b * side, _bbox(m), atol=1e-4)  # float32 rounding only
    big = masks_to_square(masks, 2 * side)  # an integer upscale: still exact
    for b, m in zip(sq_boxes, big):
        np.testing.assert_allclose(b * 2 * side, _bbox(m), atol=1e-4)
    small = masks_to_square(masks, 24)  # any resize: within one output pixel
    for b, m in zip(sq_boxes, small):
        assert np.abs(b * 24 - _bbox(m)).max() <= 1.0


def test_expand2square_centres_on_the_mean_colour_by_default():
    image = np.full((20, 40, 3), 7, np.uint8)
    sq = expand2square(image)
    _, left, top = square_offsets(20, 40)
    assert sq.shape == (40, 40, 3) and (left, top) == (0, 10)
    assert (sq[10:30] == 7).all()
    np.testing.assert_array_equal(sq[0, 0], (CLIP_MEAN * 255).astype(np.uint8))


def test_released_weight_configs_pad_white_like_nextchat():
    from pathlib import Path

    from jaxground.config import load_config

    configs = Path(__file__).parents[2] / "configs"
    for name in ("nextchat_7b_stage1", "nextchat_7b_stage2", "nextchat_7b_stage3", "nextchat_13b_stage1",
                 "eval_refcoco", "eval_pope", "eval_res"):
        assert load_config(configs / f"{name}.py").data.pad_fill == "white", name
    assert load_config(configs / "tiny_shapes.py").data.pad_fill == "mean"
    image = np.zeros((20, 40, 3), np.uint8)
    white = clip_image(image, 40, "white")[0, 0]
    np.testing.assert_allclose(white, (1 - CLIP_MEAN) / CLIP_STD, rtol=1e-6)
    with pytest.raises(ValueError, match="pad fill"):
        clip_image(image, 40, "grey")


def test_clip_image_normalises_and_resizes():
    image = np.zeros((10, 20, 3), np.uint8)
    out = clip_image(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[8, 8], -CLIP_MEAN / CLIP_STD, atol=1e-6)  # the image's black centre
    # The padded band is the mean colour, so it normalises to ~0.
    assert np.abs(out[0, 8]).max() < 0.02


def test_polygon_mask_matches_its_box():
    m = polygons_to_mask([[2, 3, 10, 3, 10, 8, 2, 8]], 12, 14)
    np.testing.assert_array_equal(_bbox(m), [2, 3, 10, 8])  # exclusive right/bottom, as boxes


# pycocotools' decode calls np.asarray(copy=False) on an object without the NumPy 2 signature
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_polygon_mask_is_pycocotools_area():
    """The official RES evaluation rasterises with pycocotools' frPyObjects: the rectangle exactly, random
    polygons up to its sub-pixel boundary rule (PIL's outline fill differed in 21% of the pixels, +15% area)."""
    from pycocotools import mask as coco

    def reference(polys, h, w):
        return coco.decode(coco.merge(coco.frPyObjects(polys, h, w))).astype(bool)

    rect = [[5, 3, 20, 3, 20, 12, 5, 12]]
    np.testing.assert_array_equal(polygons_to_mask(rect, 30, 40), reference(rect, 30, 40))
    assert reference(rect, 30, 40).sum() == 135
    rng = np.random.default_rng(0)
    ours, theirs, differ = 0, 0, 0
    for i in range(100):
        n = rng.integers(3, 9)
        angle, radius = np.sort(rng.uniform(0, 2 * np.pi, n)), rng.uniform(3, 14, n)
        poly = np.stack([rng.uniform(10, 30) + radius * np.cos(angle), rng.uniform(8, 22) + radius * np.sin(angle)], 1)
        poly = [(np.round(poly) if i % 2 else poly).ravel().tolist()]
        a, b = polygons_to_mask(poly, 30, 40), reference(poly, 30, 40)
        ours, theirs, differ = ours + a.sum(), theirs + b.sum(), differ + (a ^ b).sum()
    assert abs(ours / theirs - 1) < 0.01 and differ / theirs < 0.04


@pytest.mark.parametrize("h,w,size", [(30, 50, 50), (50, 30, 24), (40, 40, 16), (31, 52, 256)])
def test_image_region_is_the_square_of_an_all_ones_mask(h, w, size):
    np.testing.assert_array_equal(image_region(h, w, size), masks_to_square(np.ones((1, h, w), bool), size)[0] > 0)
