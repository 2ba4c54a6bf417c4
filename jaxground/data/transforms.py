"""CLIP-side image transforms: expand2square (pad to a centred square: `PAD_FILLS`, white as NExT-Chat's
`Expand2square` defaults to and its configs use, or the CLIP mean colour as LLaVA pads), bicubic resize, CLIP
normalisation; boxes and masks follow the same geometry.

Pixel boxes are xyxy with exclusive right/bottom edges (a mask's bounding box is [x_min, y_min, x_max + 1,
y_max + 1]), so padding shifts them exactly and normalising by the square side gives [0, 1] coordinates.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PAD_FILLS = {"mean": tuple(int(v * 255) for v in CLIP_MEAN), "white": (255, 255, 255)}


def square_offsets(height: int, width: int) -> tuple[int, int, int]:
    """-> (side, left, top): where expand2square places an HxW image."""
    side = max(height, width)
    return side, (side - width) // 2, (side - height) // 2


def expand2square(image: np.ndarray, fill=PAD_FILLS["mean"]) -> np.ndarray:
    """uint8[H,W,3] -> uint8[S,S,3], S = max(H, W), the image centred on `fill`."""
    h, w = image.shape[:2]
    side, left, top = square_offsets(h, w)
    if h == w:
        return image
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.asarray(fill, np.uint8)
    out[top : top + h, left : left + w] = image
    return out


def boxes_to_square(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """float[n,4] pixel xyxy in the HxW image -> float32[n,4] normalised to the padded square."""
    side, left, top = square_offsets(height, width)
    shift = np.array([left, top, left, top], np.float32)
    return ((np.asarray(boxes, np.float32).reshape(-1, 4) + shift) / side).astype(np.float32)


def masks_to_square(masks: np.ndarray, size: int) -> np.ndarray:
    """bool[n,H,W] -> float32[n,size,size] in {0,1}: padded like the image, then nearest-resized."""
    n, h, w = masks.shape
    side, left, top = square_offsets(h, w)
    padded = np.zeros((n, side, side), bool)
    padded[:, top : top + h, left : left + w] = masks
    if side == size:
        return padded.astype(np.float32)
    idx = _nearest(side, size)
    return padded[:, idx][:, :, idx].astype(np.float32)


def _nearest(side: int, size: int) -> np.ndarray:
    """int[size]: the source pixel of each output pixel (nearest sampling at pixel centres) for side -> size."""
    return np.minimum(((np.arange(size) + 0.5) * side / size).astype(np.int64), side - 1)


def image_region(height: int, width: int, size: int) -> np.ndarray:
    """bool[size,size]: the pixels of the padded square (sampled as `masks_to_square` does) inside the image."""
    side, left, top = square_offsets(height, width)
    centres = _nearest(side, size)
    rows, cols = (centres >= top) & (centres < top + height), (centres >= left) & (centres < left + width)
    return rows[:, None] & cols[None, :]


def clip_image(image: np.ndarray, size: int, fill: str = "mean") -> np.ndarray:
    """uint8[H,W,3] -> float32[size,size,3]: expand2square on `PAD_FILLS[fill]`, bicubic resize, CLIP
    normalisation."""
    if fill not in PAD_FILLS:
        raise ValueError(f"pad fill must be one of {sorted(PAD_FILLS)}, got {fill!r}")
    square = expand2square(image, PAD_FILLS[fill])
    if square.shape[0] != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))
    return (square.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """COCO polygons (flat [x0,y0,x1,y1,...] pixel lists) -> bool[H,W]: a pixel is in when its centre lies
    inside a polygon (even-odd rule; an object's polygons are OR'd), the area pycocotools' `frPyObjects`, which
    the official RES evaluation uses, gives (PIL's outline added a pixel on the right and bottom edges)."""
    mask = np.zeros((height, width), bool)
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    for poly in polygons:
        if len(poly) < 6:
            continue
        p = np.asarray(poly, np.float64).reshape(-1, 2)
        inside = np.zeros((height, width), bool)
        for (x0, y0), (x1, y1) in zip(p, np.roll(p, -1, 0)):
            rows = np.nonzero((ys >= min(y0, y1)) & (ys < max(y0, y1)))[0]  # half-open: a vertex counts once
            if len(rows):  # flip every pixel left of where this edge crosses the row's centre line
                cross = x0 + (ys[rows] - y0) * (x1 - x0) / (y1 - y0)
                inside[rows] ^= xs[None, :] < cross[:, None]
        mask |= inside
    return mask
