"""SAM-side image, box and mask transforms (host NumPy) and the inverse for predicted masks (jnp, jittable).

Forward: resize the longest side to `target` (1024), normalise with SAM's pixel mean/std, pad to target^2 either
centred (NExT-Chat, `pad="center"`) or bottom-right (official SAM, `pad="bottom_right"`). `SamGeometry` records
the mapping; boxes and masks go through the same mapping. Inverse: low-res logits [..., 4g, 4g] -> bilinear up to
target -> crop the padding -> bilinear to the original size (`antialias=False`, as torch's F.interpolate).
Images are `[H, W, 3]` uint8 (or float 0..255), masks `[H, W]`, boxes xyxy `[..., 4]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from PIL import Image

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)
PADS = ("center", "bottom_right")


@dataclass(frozen=True)
class SamGeometry:
    """original (h, w) -> resized (h, w) placed at (top, left) inside a target x target square."""

    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    offset: tuple[int, int]
    target: int

    @property
    def scale_xy(self) -> tuple[float, float]:
        return self.resized_hw[1] / self.orig_hw[1], self.resized_hw[0] / self.orig_hw[0]


def geometry(orig_hw: tuple[int, int], target: int = 1024, pad: str = "center") -> SamGeometry:
    """The official rounding: scale = target / max(h, w); new side = int(side * scale + 0.5), at least 1 (an image
    more than 2·target times as long as it is wide would round to 0, where the official code fails)."""
    if pad not in PADS:
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
    h, w = (int(s) for s in orig_hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {orig_hw}")
    scale = target / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    offset = ((target - nh) // 2, (target - nw) // 2) if pad == "center" else (0, 0)
    return SamGeometry((h, w), (nh, nw), offset, target)


def preprocess_image(
    image: np.ndarray, target: int = 1024, pad: str = "center"
) -> tuple[np.ndarray, SamGeometry]:
    """[H, W, 3] -> ([target, target, 3] float32 normalised, zero (= mean colour) padding, geometry)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    geo = geometry(image.shape[:2], target, pad)
    nh, nw = geo.resized_hw
    resized = np.asarray(Image.fromarray(np.asarray(image).astype(np.uint8)).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((target, target, 3), np.float32)
    top, left = geo.offset
    out[top : top + nh, left : left + nw] = (resized.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    return out, geo


def boxes_to_sam(boxes: np.ndarray, geo: SamGeometry) -> np.ndarray:
    """Pixel xyxy boxes of the original image -> SAM input coordinates."""
    sx, sy = geo.scale_xy
    top, left = geo.offset
    return np.asarray(boxes, np.float32) * np.array([sx, sy, sx, sy], np.float32) + np.array(
        [left, top, left, top], np.float32
    )


def normalized_boxes_to_sam(boxes01: np.ndarray, target: int = 1024) -> np.ndarray:
    """xyxy in [0, 1] of the centred padded square (NExT-Chat's box convention) -> SAM input coordinates."""
    return np.asarray(boxes01, np.float32) * target


def mask_to_sam(mask: np.ndarray, geo: SamGeometry) -> np.ndarray:
    """[H, W] binary mask -> [target, target] uint8 (nearest resize, zero padding)."""
    nh, nw = geo.resized_hw
    resized = np.asarray(Image.fromarray(np.asarray(mask).astype(np.uint8)).resize((nw, nh), Image.NEAREST))
    out = np.zeros((geo.target, geo.target), np.uint8)
    top, left = geo.offset
    out[top : top + nh, left : left + nw] = resized
    return out


def postprocess_masks(low_res: jax.Array, geo: SamGeometry) -> jax.Array:
    """[..., 4g, 4g] mask logits -> [..., H, W] logits of the original image (static sizes: jittable)."""
    lead = low_res.shape[:-2]
    t = geo.target
    up = jax.image.resize(low_res, (*lead, t, t), "linear", antialias=False)
    top, left = geo.offset
    nh, nw = geo.resized_hw
    crop = up[..., top : top + nh, left : left + nw]
    return jax.image.resize(crop, (*lead, *geo.orig_hw), "linear", antialias=False)
