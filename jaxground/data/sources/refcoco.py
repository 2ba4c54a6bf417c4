"""RefCOCO / RefCOCO+ / RefCOCOg: the `refer` layout (`refs(unc).p` pickle + COCO `instances.json` in one
directory) and the Shikra / NExT-Chat jsonl layout (`{"img_path", "expression", "bbox": xyxy, ...}` a line)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from jaxground.data.records import Example
from jaxground.data.sources import SourceError, jsonl_examples, xywh_to_xyxy

_PREFERRED = ("refs(unc).p", "refs(umd).p", "refs(google).p", "refs(berkeley).p")


def _refs_file(root: Path) -> Path:
    found = sorted(root.glob("refs(*).p"))
    if not found:
        raise SourceError(f"no refs(*).p in {root}")
    for name in _PREFERRED:
        if (root / name) in found:
            return root / name
    return found[0]


def read_refcoco(path: str, split: str) -> list[Example]:
    """One Example per referred object of `split`: its box, polygons (when given) and sentences (`rec`)."""
    root = Path(path)
    if not (root / "instances.json").is_file():
        raise SourceError(f"{root} has no instances.json")
    with open(_refs_file(root), "rb") as f:
        refs = pickle.load(f)
    inst = json.loads((root / "instances.json").read_text())
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    out = []
    for ref in refs:
        if ref["split"] != split:
            continue
        ann, im = anns[ref["ann_id"]], images[ref["image_id"]]
        seg = ann.get("segmentation")
        polygons = [seg] if isinstance(seg, list) and seg else None  # RLE (crowd) masks are not decoded
        out.append(Example(
            boxes=np.array([xywh_to_xyxy(*ann["bbox"])], np.float32),
            tasks={"rec": [{"expr": s["sent"], "obj": 0} for s in ref["sentences"]]},
            image_path=im["file_name"], width=im["width"], height=im["height"],
            names=[str(ref.get("category_id", ""))], polygons=polygons, source="refcoco",
            key=f"{root.name}/ref{ref['ref_id']}"))
    return out


def read_refcoco_jsonl(path: str, split: str) -> list[Example]:
    """The Shikra jsonl file `path` (the split is the file); one Example per line."""
    def make(n: int, item: dict) -> Example:
        return Example(
            boxes=np.array([item["bbox"]], np.float32), tasks={"rec": [{"expr": item["expression"], "obj": 0}]},
            image_path=item["img_path"], width=int(item.get("width", 0)), height=int(item.get("height", 0)),
            names=[""], source="refcoco_jsonl", key=f"{Path(path).name}:{n}")
    return jsonl_examples(path, ("bbox", "expression", "img_path"), make)
