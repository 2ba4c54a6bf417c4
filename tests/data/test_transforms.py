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


def _random_object(rng, h, w):
    """One COCO-like object: 1-4 polygons of a random kind, coordinates of a random precision, some beyond the
    image, some tiny or degenerate; short ones (4-5 numbers) only where pycocotools accepts them."""
    polys = []
    for _ in range(rng.integers(1, 5)):
        kind = rng.choice(["star", "convex", "tangle", "rect", "tiny", "huge", "dupes", "line"])
        n = int(rng.integers(3, 12))
        cx, cy = rng.uniform(-0.3, 1.3) * w, rng.uniform(-0.3, 1.3) * h
        r = rng.uniform(0.5, 0.6 * max(h, w) + 1, n)
        angle = np.sort(rng.uniform(0, 2 * np.pi, n))
        if kind == "convex":
            r[:] = r[0]
        elif kind == "tangle":  # unsorted angles: self-intersecting
            angle = rng.uniform(0, 2 * np.pi, n)
        elif kind == "tiny":
            r = rng.uniform(0.05, 1.2, n)
        elif kind == "huge":
            r = rng.uniform(1, 3, n) * max(h, w)
        p = np.stack([cx + r * np.cos(angle), cy + r * np.sin(angle)], 1)
        if kind == "rect":
            x0, y0 = rng.uniform(-5, w), rng.uniform(-5, h)
            x1, y1 = x0 + rng.uniform(0.2, w), y0 + rng.uniform(0.2, h)
            p = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        elif kind == "dupes":  # repeated vertices, sometimes all the same point
            p = p[np.sort(rng.integers(0, n, n + 3))] if rng.random() < 0.8 else np.repeat(p[:1], n, 0)
        elif kind == "line":  # collinear: one way, or there and back
            along = np.linspace(0, 1, n) if rng.random() < 0.5 else np.abs(np.linspace(-1, 1, n))
            p = p[:1] + along[:, None] * (p[2] - p[0])
        precision = rng.choice(["float", "int", "half", "tenth", "coco"])
        p = {"float": p, "int": np.round(p), "half": np.round(p * 2) / 2, "tenth": np.round(p, 1),
             "coco": np.round(p, 2)}[precision]
        polys.append(p.ravel().tolist())
    if rng.random() < 0.15:  # 1-2 points or an odd count: pycocotools reads len // 2 points
        polys.append(polys[0][: int(rng.choice([0, 2, 3, 4, 5, 7]))])
    if rng.random() < 0.05:  # a 2-point (5-number) polygon first: pycocotools still reads polygons
        polys.insert(0, polys[0][:5])
    return polys


def _coco_mask(polys, h, w):
    from pycocotools import mask as coco

    return coco.decode(coco.merge(coco.frPyObjects(polys, h, w))).astype(bool)


# pycocotools' decode calls np.asarray(copy=False) on an object without the NumPy 2 signature
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_polygon_mask_is_pycocotools_exactly():
    """The official RES evaluation and training rasterise with pycocotools (frPyObjects, merge, decode): every
    pixel equal on random objects of every kind, on square and non-square images."""
    rect = [[5, 3, 20, 3, 20, 12, 5, 12]]
    assert _coco_mask(rect, 30, 40).sum() == 135
    rng = np.random.default_rng(0)
    for i in range(400):
        h, w = [(30, 40), (37, 53), (53, 37), (24, 24), (5, 9), (1, 1)][i % 6]
        polys = _random_object(rng, h, w)
        np.testing.assert_array_equal(polygons_to_mask(polys, h, w), _coco_mask(polys, h, w), err_msg=str(polys))
    for h, w in [(30, 40), (37, 53)]:  # edge and corner cases by hand
        for polys in (
            rect,
            [[0, 0, w, 0, w, h, 0, h]],  # the whole image
            [[-5, -5, w + 5, -5, w + 5, h + 5, -5, h + 5]],  # beyond it on every side
            [[0.5, 0.5, 3.5, 0.5, 3.5, 2.5, 0.5, 2.5]],  # on pixel centres
            [[-0.5, -0.5, 2.5, -0.5, 1, 3.5]],  # negative half-pixels: C's cast truncates toward zero
            [[2.1, 2.3, 2.1, 2.3, 2.1, 2.3]],  # a single point
            [[1, 1, 9, 1, 9, 9, 1, 9], [3, 3, 7, 3, 7, 7, 3, 7]],  # a hole drawn as a polygon is still OR'd
            [[1, 1, 9, 1, 1, 9, 9, 9]],  # a bow tie
        ):
            np.testing.assert_array_equal(polygons_to_mask(polys, h, w), _coco_mask(polys, h, w), err_msg=str(polys))


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
@pytest.mark.parametrize("short,error,match", [([1, 2, 10, 12], TypeError, "incorrect type"),
                                               ([1, 2], Exception, "not supported"), ([], Exception, "not supported")])
def test_polygons_pycocotools_refuses_are_skipped(short, error, match):
    """pycocotools reads an object whose first polygon has 4 numbers as [x, y, w, h] boxes and fails (fewer: an
    unsupported type); elsewhere a polygon of 1-2 points gives no pixels. We skip polygons under 6 numbers."""
    from pycocotools import mask as coco

    square = [2, 2, 9, 2, 9, 8, 2, 8]
    with pytest.raises(error, match=match):
        coco.frPyObjects([short, square], 20, 30)
    np.testing.assert_array_equal(polygons_to_mask([short, square], 20, 30), _coco_mask([square], 20, 30))
    np.testing.assert_array_equal(polygons_to_mask([square, short], 20, 30), _coco_mask([square, short], 20, 30))
    assert not polygons_to_mask([short], 20, 30).any() and not polygons_to_mask([], 20, 30).any()


@pytest.mark.parametrize("h,w,size", [(30, 50, 50), (50, 30, 24), (40, 40, 16), (31, 52, 256)])
def test_image_region_is_the_square_of_an_all_ones_mask(h, w, size):
    np.testing.assert_array_equal(image_region(h, w, size), masks_to_square(np.ones((1, h, w), bool), size)[0] > 0)
