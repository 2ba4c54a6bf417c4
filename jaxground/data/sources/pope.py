"""POPE: a jsonl file of `{"question_id", "image", "text": "Is there a X in the image?", "label": "yes"|"no"}`
(one file per setting: random, popular, adversarial). One Example per question (`pope` item with the
question kept verbatim)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jaxground.data.records import Example
from jaxground.data.sources import jsonl_examples

_OBJECT = re.compile(r"Is there an? (.+?) in the image", re.IGNORECASE)


def read_pope(path: str, split: str) -> list[Example]:
    def make(n: int, item: dict) -> Example:
        m = _OBJECT.search(item["text"])
        return Example(
            boxes=np.zeros((0, 4), np.float32), image_path=item["image"], source="pope",
            tasks={"pope": [{"object": m.group(1) if m else "", "answer": item["label"].strip().lower(),
                             "question": item["text"]}]},
            key=f"{Path(path).name}:{n} (question {item.get('question_id')})")
    return jsonl_examples(path, ("text", "image", "label"), make)
