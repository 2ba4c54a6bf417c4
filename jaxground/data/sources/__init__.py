"""Readers of real datasets from local files (nothing is downloaded). Each returns a list of
`records.Example` with pixel xyxy boxes, image paths relative to the entry's `image_root`, and task items.

`read(kind, entry)`; `entry` has `path`, `split`, optionally `image_root` (a config `datasets` entry) and the
reader's `OPTIONS`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable

from jaxground.data.records import Example

READERS = {
    "refcoco": ("refcoco", "read_refcoco"),
    "refcoco_jsonl": ("refcoco", "read_refcoco_jsonl"),
    "flickr": ("flickr", "read_flickr"),
    "vg": ("vg", "read_vg"),
    "v7w": ("v7w", "read_v7w"),
    "pope": ("pope", "read_pope"),
    "llava": ("llava", "read_llava"),
    "tfds_refcoco": ("tfds_refcoco", "read_tfds_refcoco"),
}


# entry keys a reader takes besides path and split
OPTIONS = {"llava": ("coco_prefix",)}


class SourceError(ValueError):
    """A dataset that cannot be read: missing files, wrong layout, missing optional dependency."""


def read(kind: str, entry) -> list[Example]:
    if kind not in READERS:
        raise SourceError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(READERS))}")
    module, fn = READERS[kind]
    reader = getattr(importlib.import_module(f"jaxground.data.sources.{module}"), fn)
    options = {k: entry[k] for k in OPTIONS.get(kind, ()) if k in entry}
    return reader(str(entry["path"]), str(entry.get("split", "train")), **options)


def xywh_to_xyxy(x, y, w, h) -> list[float]:
    return [float(x), float(y), float(x) + float(w), float(y) + float(h)]


def jsonl_examples(path: str, keys: tuple[str, ...], make: Callable[[int, dict], Example]) -> list[Example]:
    """`make(line number from 1, object)` for each non-blank line of the jsonl file `path`; a line that is not a
    JSON object holding `keys`, or whose values `make` cannot take (a box of text, a width that is not a number),
    is refused as FILE:LINE, so a bad line in a large file can be found."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{n}: not JSON ({e.msg})") from None
            missing = [k for k in keys if not isinstance(item, dict) or k not in item]
            if missing:
                raise SourceError(f"{path}:{n}: no {', '.join(map(repr, missing))} in this line")
            try:
                out.append(make(n, item))
            except (ValueError, TypeError, AttributeError) as e:
                raise SourceError(f"{path}:{n}: {e}") from None
    return out
