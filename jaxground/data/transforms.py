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


def rgb_uint8(im: Image.Image) -> np.ndarray:
    """A decoded PIL image -> uint8[H, W, 3]. 16-bit greyscale (modes I;16*) is scaled from 0..65535 (PIL's
    convert("RGB") clips it to black and white instead); 32-bit integer and float greyscale (modes I, F), whose range
    the file does not state, raise ValueError."""
    if im.mode.startswith("I;16"):
        grey = (np.asarray(im).astype(np.uint32) * 255 + 32767) // 65535
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
    if im.mode in ("I", "F"):
        raise ValueError(f"{'32-bit integer' if im.mode == 'I' else 'floating-point'} greyscale pixels (PIL mode "
                         f"{im.mode}) have no stated range; convert the image to 8 bits first")
    return np.asarray(im.convert("RGB"))


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
    """COCO polygons (flat [x0,y0,x1,y1,...] pixel lists) -> bool[H,W], pixel for pixel what pycocotools gives
    (`decode(merge(frPyObjects(polygons, H, W)))`), which the official RES training and evaluation use.

    Its rule: vertices are scaled by 5 and rounded, each edge is walked one step at a time along its major axis
    (the other coordinate rounded), and wherever the walk crosses a pixel-centre column line (scaled x = 5c + 2.5)
    a toggle goes to the first row whose scaled centre 5r + 2 is not above the crossing (clamped to [0, H]); a
    pixel is in a polygon when an odd number of that polygon's toggles precede it in column-major order, and an
    object's polygons are OR'd. A polygon under 6 numbers is skipped: of 1-2 points pycocotools gives no pixels,
    and as an object's first it fails (4 numbers are read as [x, y, w, h] boxes); an odd last number is dropped
    as pycocotools does."""
    hw = height * width
    first, which = [], []
    for i, poly in enumerate(polygons):
        p = np.asarray(poly, np.float64).ravel()
        p = p[: len(p) // 2 * 2].reshape(-1, 2)
        if len(p) >= 3:
            first.append(np.trunc(p * 5 + 0.5).astype(np.int64))  # C's (int) cast: toward zero (-0.5 -> -2)
            which.append(np.full(len(p), i))
    if not first:
        return np.zeros((height, width), bool)
    a = np.concatenate(first)  # int64[E,2]: each edge runs from a vertex to the next of its polygon
    b = np.concatenate([np.roll(q, -1, 0) for q in first])
    edge_poly = np.concatenate(which)

    # The walk along an edge, from its lower end on the major axis (walking it the other way gives the same
    # points). Its points step by at most 1 in x, so each column line is crossed between two adjacent points;
    # points of adjacent edges meet at the shared vertex, which only C's truncation of negative x can move, left
    # of every pixel centre, so crossings are looked for within each edge.
    d = np.abs(b - a)
    xmajor = d[:, 0] >= d[:, 1]
    n = np.where(xmajor, d[:, 0], d[:, 1])
    flip = np.where(xmajor, a[:, 0] > b[:, 0], a[:, 1] > b[:, 1])
    lo, hi = np.where(flip[:, None], b, a), np.where(flip[:, None], a, b)
    major0, minor0 = np.where(xmajor, lo[:, 0], lo[:, 1]), np.where(xmajor, lo[:, 1], lo[:, 0])
    slope = np.where(xmajor, hi[:, 1] - lo[:, 1], hi[:, 0] - lo[:, 0]) / np.maximum(n, 1)  # n = 0: one point

    count = n + 1
    e = np.repeat(np.arange(len(n)), count)
    t = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    minor = np.trunc(minor0[e] + slope[e] * t + 0.5).astype(np.int64)  # the C expression, same rounding
    major = major0[e] + t
    xm = xmajor[e]
    u, v = np.where(xm, major, minor), np.where(xm, minor, major)

    # Crossings: adjacent points of an edge whose x straddles 5c + 2.5, for columns c in the image.
    j = np.flatnonzero(u[1:] != u[:-1])
    j = j[t[j + 1] > 0]
    x, y = np.minimum(u[j], u[j + 1]), np.minimum(v[j], v[j + 1])
    cross = (x % 5 == 2) & (x >= 2) & (x <= 5 * width - 3)
    j, col, row = j[cross], (x[cross] - 2) // 5, np.clip(-((2 - y[cross]) // 5), 0, height)  # ceil((y-2)/5)

    # Each polygon's toggles, sorted in column-major order, pair up as [on, off) runs (a closed walk crosses a
    # line an even number of times; were a count odd, its last run would end at H*W, where pycocotools closes);
    # the union merges the overlapping runs of all polygons.
    key = np.sort(edge_poly[e[j]] * (hw + 1) + col * height + row)
    odd = np.nonzero(np.bincount(key // (hw + 1)) % 2)[0]
    key = np.sort(np.concatenate([key, odd * (hw + 1) + hw]))
    on, off = key[0::2] % (hw + 1), key[1::2] % (hw + 1)
    on, off = on[on < off], off[on < off]
    if not len(on):
        return np.zeros((height, width), bool)
    order = np.argsort(on, kind="stable")
    on, reach = on[order], np.maximum.accumulate(off[order])
    new_run = np.r_[True, on[1:] > reach[:-1]]
    bounds = np.stack([on[new_run], reach[np.r_[new_run[1:], True]]], 1).ravel()
    lengths = np.diff(np.r_[0, bounds, hw])
    flat = np.repeat(np.arange(len(lengths)) % 2 == 1, lengths)  # runs alternate out, in, ..., out
    return flat.reshape(width, height).T.copy()
