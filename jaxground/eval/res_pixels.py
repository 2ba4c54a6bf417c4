"""RES scored at original image pixels, as the released NExT-Chat evaluation scores it (`eval.res_pixels =
"original"`; the default "grid" scores on the padded square's grid at `data.mask_size` inside the jitted step).

The released rule (mllm/engine/base_engine.py: `prediction_step`, `de_transform_mask`; the ground truth from
mllm/dataset/single_image_dataset/res.py: `decode_mask`):
- prediction: SAM's low-resolution logits, bilinear (`F.interpolate`, align_corners=False, no antialiasing) up
  to the SAM input square S (1024), then bilinear to the image's long side L x L, `> 0`, then the centred
  padding cut at that size: `(L - short) // 2` rows of a wide image, columns of a tall one;
- ground truth: the object's COCO polygons rasterised one by one at the image size (pycocotools
  `frPyObjects` + `decode`) and *summed*, so a pixel inside two of its polygons counts 2;
- per sample: I = sum(pred * gt), U = sum(pred) + sum(gt) - I; cIoU = sum I / sum U over the split.

This is not SAM's own `postprocess_masks` (`data.sam_transforms.postprocess_masks`, which `predict` draws with:
crop the padding at S, where the resized image lies, then resize the crop to H x W): the released evaluation
resizes the whole square and crops at the original scale, a sub-pixel shift. Both resizes are separable and
linear, so each axis's two compose to one map of a few taps, applied on the host in float64, one row's mask at a
time (no compile per image size; only one batch's logits are held; a 640 x 480 row, its ground truth included,
took ~8 ms on a 2-core CPU).

Axes: B batch, h/w low-resolution logit grid, H/W original image.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np

from jaxground.data.transforms import polygons_to_mask, square_offsets
from jaxground.eval.gather import sample_number
from jaxground.eval.steps import res_generated_terms, res_terms

RES_PIXELS = ("grid", "original")


def bilinear_rows(x: np.ndarray, size: int) -> np.ndarray:
    """x [n, ...] -> [size, ...] along axis 0 as torch's bilinear `F.interpolate` (align_corners=False,
    antialias=False): output i samples the input at (i + 0.5) * n / size - 0.5, clamped to [0, n - 1]."""
    n = x.shape[0]
    src = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0)
    lo = src.astype(np.int64)  # floor: src >= 0
    hi = np.minimum(lo + 1, n - 1)
    frac = (src - lo).reshape(-1, *([1] * (x.ndim - 1)))
    return x[lo] * (1.0 - frac) + x[hi] * frac


@functools.lru_cache(maxsize=256)
def _taps(n: int, sam_size: int, side: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The released mapping along one axis, n logits -> pixels start..stop-1 of the long side, as taps:
    pixel p = sum_k weight[p, k] * logit[index[p, k]] (int64, float64 [stop - start, k]). The two bilinear
    resizes compose to a few adjacent logits per pixel, so a mask costs O(H * (w + W) * k), not a dense product."""
    m = bilinear_rows(bilinear_rows(np.eye(n), sam_size), side)[start:stop]
    nonzero = m != 0
    first, last = nonzero.argmax(1), n - 1 - nonzero[:, ::-1].argmax(1)
    k = int((last - first).max()) + 1
    index = np.minimum(first, n - k)[:, None] + np.arange(k)
    return index, np.take_along_axis(m, index, 1)


def released_mask(logits: np.ndarray, hw: tuple[int, int], sam_size: int) -> np.ndarray:
    """Low-resolution mask logits [h, w] over the padded square -> bool[H, W] at the image's pixels, the
    released rule: up to sam_size, to the long side, `> 0`, the centred padding cut."""
    height, width = hw
    side, left, top = square_offsets(height, width)
    x = np.asarray(logits, np.float64)
    row_index, row_weight = _taps(x.shape[0], sam_size, side, top, top + height)
    col_index, col_weight = _taps(x.shape[1], sam_size, side, left, left + width)
    x = np.einsum("Hk,Hkw->Hw", row_weight, x[row_index])
    return np.einsum("Wk,HWk->HW", col_weight, x[:, col_index]) > 0


def released_ground_truth(polygons: list, hw: tuple[int, int]) -> np.ndarray:
    """An object's COCO polygons -> int32[H, W]: how many of them cover each pixel (the released `decode_mask`
    sums pycocotools' per-polygon masks; `polygons_to_mask` is pycocotools' rasteriser)."""
    out = np.zeros(hw, np.int32)
    for polygon in polygons:
        out += polygons_to_mask([polygon], *hw)
    return out


def pixel_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """bool[H, W] prediction, int[H, W] ground truth (a count per pixel) -> (I, U, ground-truth area) as the
    released evaluation counts them: I = sum(pred * gt), U = sum(pred) + sum(gt) - I."""
    inter = float(np.sum(gt[pred], dtype=np.int64))
    area = float(np.sum(gt, dtype=np.int64))
    return inter, float(np.count_nonzero(pred)) + area - inter, area


def sample_ground_truth(ex, image_root: str) -> np.ndarray:
    """The ground truth of an evaluation sample at its image's pixels, int32[H, W]: an evaluation sample holds one
    REC item (`mixture.PerItem`) whose object is its answer's only trigger; polygons as the released code
    decodes them, or the record's own mask (as `SampleMaker._masks`, a record's masks come first)."""
    from jaxground.data.sample import image_size

    obj = ex.tasks["rec"][0]["obj"]
    if ex.masks is not None:
        return ex.masks[obj].astype(np.int32)
    return released_ground_truth(ex.polygons[obj], image_size(ex, image_root))


def at_original_pixels(step: Callable[[dict], dict], batches, sam_size: int) -> Callable[[dict], dict]:
    """A RES step as this host runs it (`res_step` or `res_generated_step` on the mesh, numpy rows out) -> the
    same step whose "sums" score each counted row's mask at original pixels (`released_mask` against
    `sample_ground_truth`; `res_terms`, or `res_generated_terms` when the outputs hold "num_triggers").

    step(batch) -> {"mask_logits" [B,1,h,w], "counted" bool[B], ...}; `batches` is the evaluation's
    `DataIterator`, which this step must see every batch of, in order: a row's position in them names its sample
    (`gather.sample_number`), whose record gives the ground truth. Rows are scored per process, before the
    gather, so the figures do not depend on the host count."""
    process, processes = jax.process_index(), jax.process_count()
    seen = 0

    def scored(batch: dict) -> dict:
        nonlocal seen
        out = step(batch)
        counted = np.asarray(out["counted"], bool)
        inter, union, area = np.zeros((3, len(counted)), np.float32)
        for i in np.flatnonzero(counted):
            ex, root = batches.example(sample_number(seen + int(i), process, processes))
            gt = sample_ground_truth(ex, root)
            pred = released_mask(np.asarray(out["mask_logits"][i, 0]), gt.shape, sam_size)
            inter[i], union[i], area[i] = pixel_counts(pred, gt)
        seen += len(counted)
        if "num_triggers" in out:
            sums = res_generated_terms(inter, union, area, np.asarray(out["num_triggers"]), counted)
        else:
            sums = res_terms(inter, union, counted)
        return out | {"sums": {k: np.asarray(v) for k, v in sums.items()}}

    return scored
