"""LLaVA instruction data: a json list of `{"id", "image", "conversations": [{"from": "human"|"gpt",
"value"}]}`; `<image>` markers are dropped (the template places the image). Entries without an image are
left out (this pipeline always has one). `coco_prefix`: the json names COCO train2014 images by id only
(`000000033471.jpg`), so prepend the file names' `COCO_train2014_`, as the official config does."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from jaxground.data.records import Example
from jaxground.data.sources import SourceError

_ROLES = {"human": "user", "gpt": "assistant"}


def read_llava(path: str, split: str, coco_prefix: bool = False) -> list[Example]:
    if not Path(path).is_file():
        raise SourceError(f"{path} not found (LLaVA instruction json)")
    out, text_only = [], 0
    for entry in json.loads(Path(path).read_text()):
        if "image" not in entry:
            text_only += 1
            continue
        turns = [[_ROLES[t["from"]], t["value"]] for t in entry["conversations"]]
        out.append(Example(boxes=np.zeros((0, 4), np.float32), tasks={"conv": [{"turns": turns}]},
                           image_path=f"COCO_train2014_{entry['image']}" if coco_prefix else entry["image"], source="llava", key=f"llava/{entry.get('id')}"))
    if text_only:
        logging.getLogger(__name__).info("llava: left out %d entries without an image", text_only)
    return out
