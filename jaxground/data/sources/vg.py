"""Visual Genome region descriptions: `region_descriptions.json` (a list of
`{"id": image_id, "regions": [{"phrase", "x", "y", "width", "height", ...}]}`), images `{image_id}.jpg`.
One Example per image whose regions serve region captioning and REC (`rec` items)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxground.data.records import Example
from jaxground.data.sources import SourceError, xywh_to_xyxy


def read_vg(path: str, split: str) -> list[Example]:
    """`path` is the json file (VG has no official split: `split` is recorded in the key only)."""
    if not Path(path).is_file():
        raise SourceError(f"{path} not found (Visual Genome region_descriptions.json)")
    out = []
    for entry in json.loads(Path(path).read_text()):
        regions = entry["regions"]
        if not regions:
            continue
        image_id = entry.get("id", regions[0]["image_id"])
        boxes = np.array([xywh_to_xyxy(r["x"], r["y"], r["width"], r["height"]) for r in regions], np.float32)
        out.append(Example(boxes=boxes, tasks={"rec": [{"expr": r["phrase"].strip(), "obj": k}
                                                       for k, r in enumerate(regions)]},
                           image_path=f"{image_id}.jpg", names=[""] * len(regions), source="vg",
                           key=f"vg/{split}/{image_id}"))
    return out
