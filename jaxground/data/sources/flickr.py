"""Flickr30K Entities: `{split}.txt` (image ids), `Sentences/{id}.txt` (phrases marked
`[/EN#18/people A child]`) and `Annotations/{id}.xml` (boxes per entity id, VOC style, 1-based inclusive: read
as 0-based xyxy with exclusive right/bottom). One Example per image; each sentence becomes a grounded caption
(`gcap`) with `<loc>` after every phrase that has boxes."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from jaxground.data.records import Example
from jaxground.data.sources import SourceError

_PHRASE = re.compile(r"\[/EN#(\d+)/[^ \]]+ ([^\]]+)\]")


def _boxes(xml_path: Path):
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    w, h = int(size.findtext("width")), int(size.findtext("height"))
    by_entity: dict[str, list[int]] = {}
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:  # scene / no-box entities
            continue
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        # VOC pixels are 1-based and inclusive: 0-based with an exclusive right/bottom edge (the project's
        # convention) is [xmin - 1, ymin - 1, xmax, ymax]; the official reader's [all - 1] is that box's
        # last pixel, one less on the right and bottom
        boxes.append([x0 - 1, y0 - 1, x1, y1])
        for name in obj.iter("name"):
            by_entity.setdefault(name.text, []).append(len(boxes) - 1)
    return np.asarray(boxes, np.float32).reshape(-1, 4), by_entity, w, h


def read_flickr(path: str, split: str) -> list[Example]:
    root = Path(path)
    ids_file = root / f"{split}.txt"
    if not ids_file.is_file():
        raise SourceError(f"{ids_file} not found (Flickr30K Entities split list)")
    out = []
    for image_id in ids_file.read_text().split():
        boxes, by_entity, w, h = _boxes(root / "Annotations" / f"{image_id}.xml")
        items = []
        for sentence in (root / "Sentences" / f"{image_id}.txt").read_text().splitlines():
            groups = []

            def mark(m, by_entity=by_entity, groups=groups):
                objs = by_entity.get(m.group(1))
                if not objs:
                    return m.group(2)
                groups.append(objs)
                return f"{m.group(2)} <loc>"

            caption = _PHRASE.sub(mark, sentence.strip())
            if groups:
                items.append({"caption": caption, "groups": groups})
        out.append(Example(boxes=boxes, tasks={"gcap": items}, image_path=f"{image_id}.jpg", width=w, height=h,
                           names=[""] * len(boxes), source="flickr", key=f"flickr/{image_id}"))
    return out
