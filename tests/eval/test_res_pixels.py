"""RES at original pixels (`eval.res_pixels="original"`) against a re-statement of the released NExT-Chat code:
`SamForLMSeg.forward` (low-res logits bilinear to the SAM input square), `de_transform_mask` (bilinear to the long
side, `> 0`, the centred padding cut), `decode_mask` (pycocotools polygons summed) and the I / U of its
`prediction_step`."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxground.eval.res_pixels import pixel_counts, released_ground_truth, released_mask


def released_reference(low_res: np.ndarray, height: int, width: int, sam_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The released code's mask at original pixels in float32 torch -> (bool[H, W], its logits [H, W])."""
    x = torch.from_numpy(low_res.astype(np.float32))[None, None]
    x = F.interpolate(x, (sam_size, sam_size), mode="bilinear", align_corners=False)  # SamForLMSeg.forward
    long_side, short_side = max(width, height), min(width, height)  # de_transform_mask(orgw, orgh, mask)
    pad = (long_side - short_side) // 2
    x = F.interpolate(x, [long_side, long_side], mode="bilinear", align_corners=False)
    x = x[..., :, pad : short_side + pad] if width < height else x[..., pad : short_side + pad, :]
    return (x > 0)[0, 0].numpy(), x[0, 0].numpy()


def decode_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """mllm/dataset/single_image_dataset/res.py's `decode_mask`."""
    from pycocotools import mask as maskutil

    with warnings.catch_warnings():  # its decode calls np.asarray(copy=False) on an object without NumPy 2's signature
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
        return np.sum(maskutil.decode(maskutil.frPyObjects(polygons, height, width)), axis=2).astype(np.uint8)


@pytest.mark.parametrize(("hw", "low", "sam"), [
    ((480, 640), 256, 1024), ((640, 427), 256, 1024), ((375, 500), 256, 1024),  # COCO sizes, SAM ViT-H's grid
    ((24, 40), 8, 32), ((40, 23), 8, 32), ((32, 32), 8, 32),  # upsampled past the SAM side; square
])
def test_released_mask_equals_the_released_code(hw, low, sam):
    """Wide, tall and square images: the same mask wherever the released float32 logit is not within 1e-4 of
    zero (our two resizes run in float64)."""
    rng = np.random.default_rng(sum(hw))
    logits = rng.normal(0.0, 4.0, (low, low)) + np.linspace(-3, 3, low)[:, None]
    want, want_logits = released_reference(logits, *hw, sam)
    got = released_mask(logits, hw, sam)
    assert got.shape == want.shape == hw
    sure = np.abs(want_logits) > 1e-4
    assert sure.mean() > 0.999 and 0.1 < want.mean() < 0.9
    np.testing.assert_array_equal(got[sure], want[sure])


@pytest.mark.parametrize("hw", [(30, 50), (50, 30)])
def test_ground_truth_sums_polygons_as_pycocotools(hw):
    """An object of three polygons, two of them overlapping: each pixel counts the polygons covering it."""
    h, w = hw
    polygons = [[2.0, 3.0, 20.5, 4.0, 18.0, 22.0, 4.0, 19.0], [10.0, 10.0, 28.0, 12.0, 25.0, 28.7],
                [1.0, 26.0, 8.0, 26.0, 8.0, 29.0]]
    got = released_ground_truth(polygons, hw)
    want = decode_mask(polygons, h, w)
    assert got.max() == 2  # the overlap counts twice, as released
    np.testing.assert_array_equal(got, want)


def test_pixel_counts_as_the_released_prediction_step():
    """I = sum(pred * gt), U = sum(pred) + sum(gt) - I, with a ground truth that counts a pixel twice."""
    gt = np.zeros((4, 6), np.int32)
    gt[0, :3] = 1
    gt[0, 1] = 2
    pred = np.zeros((4, 6), bool)
    pred[0, 1:5] = True
    inter, union, area = pixel_counts(pred, gt)
    p, t = torch.from_numpy(pred[None]), torch.from_numpy(gt[None].astype(np.uint8))
    want_inter = torch.sum(torch.mul(p, t), dim=(1, 2))
    want_union = torch.sum(p, dim=(1, 2)) + torch.sum(t, dim=(1, 2)) - want_inter
    assert (inter, union, area) == (3.0, 5.0, 4.0) == (float(want_inter[0]), float(want_union[0]), 4.0)
