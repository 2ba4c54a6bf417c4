"""Drawing a prediction: labelled boxes `[k]` and translucent masks over the image (Pillow)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw(image: np.ndarray, boxes: np.ndarray, labels: list[str], masks: np.ndarray | None = None,
           alpha: float = 0.4, min_size: int = 256) -> Image.Image:
    """uint8[H,W,3], pixel xyxy float[n,4], n labels, optional bool[n,H,W] -> RGB image [k·H, k·W], enlarged by the
    smallest whole k (nearest neighbour) that makes its longer side at least `min_size`, so that the labels stay
    legible on small images (the embedded default's are 64 px)."""
    image = np.asarray(image, np.uint8)
    k = max(1, -(-min_size // max(image.shape[:2])))
    out = Image.fromarray(image.repeat(k, 0).repeat(k, 1)).convert("RGBA")
    boxes = np.asarray(boxes, np.float64) * k
    if masks is not None:
        for i, m in enumerate(np.asarray(masks).repeat(k, 1).repeat(k, 2)):
            layer = np.zeros((*m.shape, 4), np.uint8)
            layer[m.astype(bool)] = (*COLORS[i % len(COLORS)], int(255 * alpha))
            out = Image.alpha_composite(out, Image.fromarray(layer, "RGBA"))
    pen = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 200))
    for i, (box, label) in enumerate(zip(boxes, labels)):
        color = COLORS[i % len(COLORS)]
        x0, y0, x1, y1 = (float(v) for v in box)
        pen.rectangle((x0, y0, x1, y1), outline=color, width=width)
        tx, ty = x0 + width, max(0.0, y0 - 12)
        text_box = pen.textbbox((tx, ty), label)
        pen.rectangle(text_box, fill=color)
        pen.text((tx, ty), label, fill=(255, 255, 255))
    return out.convert("RGB")
