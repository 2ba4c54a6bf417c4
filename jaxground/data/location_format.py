"""How boxes are written in text, for the paper's Table 2 comparison of location formats.

`get_format(name, **kw)` returns a format with `name`, `extra_tokens` (tokens the tokenizer must add),
`format(boxes f32[n,4]) -> str` (the text standing for these boxes) and `parse(text) -> f32[k,4]` (the boxes
read back from generated text; malformed text gives an empty [0,4] array, never an exception).

- `emb`  (pixel2emb): `"<at> <boxes>"` per box; the box values travel in the `Batch` arrays, not in text,
  so `parse` returns no box (the model decodes trigger states instead).
- `num`  (Shikra): `[x1,y1,x2,y2]` with 3 decimals; several boxes `;`-separated inside one bracket,
  e.g. `[0.100,0.200,0.300,0.400;0.500,0.500,0.900,0.900]` (Shikra's `PlainBoxFormatter`).
- `bin`  (Pix2Seq / OFA style): 4 tokens `<bin_i>` per box, i = round(v * (N - 1)) for N bins
  (default 224), boxes written one after another.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np


def _no_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


def _check_boxes(boxes) -> np.ndarray:
    boxes = np.asarray(boxes, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [n, 4], got {boxes.shape}")
    if not np.all(np.isfinite(boxes)) or boxes.min(initial=0) < 0 or boxes.max(initial=0) > 1:
        raise ValueError("boxes must be finite normalised coordinates in [0, 1]")
    return boxes


@dataclasses.dataclass(frozen=True)
class EmbFormat:
    name: str = "emb"
    at: str = "<at>"
    slot: str = "<boxes>"

    @property
    def extra_tokens(self) -> list[str]:
        return [self.at, self.slot]

    def format(self, boxes) -> str:
        return " ".join(f"{self.at} {self.slot}" for _ in _check_boxes(boxes))

    def parse(self, text: str) -> np.ndarray:
        return _no_boxes()


_NUM = r"\d(?:\.\d*)?"
_NUM_BOX = rf"{_NUM}(?:,{_NUM}){{3}}"


@dataclasses.dataclass(frozen=True)
class NumFormat:
    name: str = "num"
    precision: int = 3

    @property
    def extra_tokens(self) -> list[str]:
        return []

    def format(self, boxes) -> str:
        body = ";".join(",".join(f"{v:.{self.precision}f}" for v in box) for box in _check_boxes(boxes))
        return f"[{body}]"

    def parse(self, text: str) -> np.ndarray:
        found = [
            [float(v) for v in box.split(",")]
            for group in re.findall(rf"\[({_NUM_BOX}(?:;{_NUM_BOX})*)\]", text)
            for box in group.split(";")
        ]
        return np.asarray(found, np.float32).reshape(-1, 4)


@dataclasses.dataclass(frozen=True)
class BinFormat:
    name: str = "bin"
    num_bins: int = 224

    def __post_init__(self):
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {self.num_bins}")

    @property
    def extra_tokens(self) -> list[str]:
        return [f"<bin_{i}>" for i in range(self.num_bins)]

    def format(self, boxes) -> str:
        bins = np.rint(_check_boxes(boxes) * (self.num_bins - 1)).astype(int)
        return "".join(f"<bin_{i}>" for i in bins.reshape(-1))

    def parse(self, text: str) -> np.ndarray:
        # decoders may put spaces between added tokens
        found = [[int(i) for i in m] for m in re.findall(r"\s*".join([r"<bin_(\d+)>"] * 4), text)]
        bins = np.asarray(found, np.float32).reshape(-1, 4)
        bins = bins[np.all(bins < self.num_bins, axis=1)]
        return bins / (self.num_bins - 1)


FORMATS = {"emb": EmbFormat, "num": NumFormat, "bin": BinFormat}


def get_format(name: str, **kw):
    """The location format `name` (one of FORMATS), built with its options (`num_bins=`, `precision=`)."""
    if name not in FORMATS:
        raise ValueError(f"unknown location format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name](**kw)
