"""Visual7W pointing: `dataset_v7w_pointing.json` = `{"images": [{"filename", "image_id", "split",
"qa_pairs": [{"question", "answer": box_id, "multiple_choices": [box_id, ...]}]}], "boxes": [{"box_id", "x",
"y", "width", "height", "name"}]}`. One Example per image; each QA pair is a `v7w` item whose candidates are
the answer and the multiple choices, sorted by box id (each sample shows them in its own order:
`templates.build_turns`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxground.data.records import Example
from jaxground.data.sources import SourceError, xywh_to_xyxy


def read_v7w(path: str, split: str) -> list[Example]:
    if not Path(path).is_file():
        raise SourceError(f"{path} not found (Visual7W dataset_v7w_pointing.json)")
    data = json.loads(Path(path).read_text())
    boxes = {b["box_id"]: b for b in data["boxes"]}
    out = []
    for im in data["images"]:
        if im["split"] != split:
            continue
        ids: list[int] = []
        items = []
        for qa in im["qa_pairs"]:
            cands = sorted({qa["answer"], *qa["multiple_choices"]})
            for c in cands:
                if c not in ids:
                    ids.append(c)
            items.append({"question": qa["question"], "candidates": [ids.index(c) for c in cands],
                          "answer": cands.index(qa["answer"])})
        xyxy = np.array([xywh_to_xyxy(boxes[i]["x"], boxes[i]["y"], boxes[i]["width"], boxes[i]["height"])
                         for i in ids], np.float32).reshape(-1, 4)
        out.append(Example(boxes=xyxy, tasks={"v7w": items}, image_path=im["filename"],
                           names=[boxes[i].get("name", "") for i in ids], source="v7w",
                           key=f"v7w/{im['image_id']}"))
    return out
