"""Drawing a prediction: labelled boxes `[k]` and translucent masks over the image (Pillow)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw(image: np.ndarray, boxes: np.ndarray, labels: list[str], masks: np.ndarray | None = None,
         alpha: float = 0.4) -> Image.Image:
    """uint8[H,W,3], pixel xyxy float[n,4], n labels, optional bool[n,H,W] -> RGB image."""
    out = Image.fromarray(np.asarray(image, np.uint8)).convert("RGBA")
    if masks is not None:
        for i, m in enumerate(masks):
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
