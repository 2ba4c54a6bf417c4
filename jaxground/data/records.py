"""The common record every dataset reader yields, and its on-disk form (ArrayRecord files).

An `Example` is one image with its objects and the task items that can be asked about it. Boxes are pixel
xyxy in the original image. `tasks` maps a task name to a list of items (plain JSON dicts) that refer to
objects by index:

| task | item |
|---|---|
| `rec` | `{"expr": str, "obj": int}` (also serves region captioning, `reg`, in reverse) |
| `gcap` | `{"caption": str with one "<loc>" per group, "groups": [[int, ...], ...]}` |
| `vqa` | `{"question": str, "answer": str}` |
| `pope` | `{"object": str, "answer": "yes" or "no"}` |
| `count` | `{"noun": str, "objs": [int, ...]}` |
| `v7w` | `{"question": str, "candidates": [int, ...], "answer": int}` (index into candidates) |
| `conv` | `{"turns": [[role, text], ...]}` (LLaVA instructions; roles "user"/"assistant") |

On disk a record is `b"JGR1" | u32 header length | JSON header | u32 image length | image bytes | masks`,
where masks (optional) are the objects' bit-packed {0,1} masks at image resolution, zlib-compressed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

MAGIC = b"JGR1"


@dataclasses.dataclass
class Example:
    """One image, its objects and task items. Either `image` (encoded bytes) or `image_path` is set."""

    boxes: np.ndarray  # float32[n,4], pixel xyxy
    tasks: dict
    image: bytes | None = None
    image_path: str | None = None
    width: int = 0
    height: int = 0
    names: list[str] = dataclasses.field(default_factory=list)  # one per object ("" if unknown)
    masks: np.ndarray | None = None  # bool[n,H,W] at image resolution
    polygons: list | None = None  # per object: list of flat [x0,y0,x1,y1,...] pixel polygons, or None
    source: str = ""
    key: str = ""  # the dataset's own id for the sample (named in error messages)
    attrs: list[dict] | None = None  # per-object attributes (synthetic shapes: colour, shape, size)


def encode(ex: Example) -> bytes:
    """Example -> record bytes (the image must be embedded)."""
    if ex.image is None:
        raise ValueError(f"record {ex.key!r}: only examples with embedded image bytes can be written")
    header = {
        "boxes": np.asarray(ex.boxes, np.float32).reshape(-1, 4).tolist(),
        "tasks": ex.tasks,
        "width": ex.width,
        "height": ex.height,
        "names": ex.names,
        "polygons": ex.polygons,
        "source": ex.source,
        "key": ex.key,
        "attrs": ex.attrs,
        "has_masks": ex.masks is not None,
    }
    h = json.dumps(header, separators=(",", ":")).encode()
    masks = b""
    if ex.masks is not None:
        masks = zlib.compress(np.packbits(np.asarray(ex.masks, bool).reshape(-1)).tobytes(), 1)
    return b"".join([MAGIC, struct.pack("<I", len(h)), h, struct.pack("<I", len(ex.image)), ex.image, masks])


def decode(data: bytes) -> Example:
    """Record bytes -> Example; raises ValueError on a malformed record."""
    if data[:4] != MAGIC:
        raise ValueError("not a jaxground record (bad magic)")
    (hn,) = struct.unpack_from("<I", data, 4)
    header = json.loads(data[8 : 8 + hn])
    (im_n,) = struct.unpack_from("<I", data, 8 + hn)
    start = 12 + hn
    image = bytes(data[start : start + im_n])
    boxes = np.asarray(header["boxes"], np.float32).reshape(-1, 4)
    masks = None
    if header["has_masks"]:
        n, h, w = len(boxes), header["height"], header["width"]
        bits = np.frombuffer(zlib.decompress(data[start + im_n :]), np.uint8)
        masks = np.unpackbits(bits, count=n * h * w).reshape(n, h, w).astype(bool)
    return Example(
        boxes=boxes, tasks=header["tasks"], image=image, width=header["width"], height=header["height"],
        names=header["names"], masks=masks, polygons=header["polygons"], source=header["source"],
        key=header["key"], attrs=header["attrs"],
    )


def png_bytes(image: np.ndarray) -> bytes:
    """uint8[H,W,3] -> PNG bytes (fast compression: the data set is written once, read many times)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_records(path: str | Path, examples: Iterable[Example]) -> int:
    """Writes examples to one ArrayRecord file; returns how many."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    counts = []
    for ex in examples:
        writer.write(encode(ex))
        counts.append(len(ex.boxes))
    writer.close()
    np.save(_counts_path(path), np.asarray(counts, np.int32))  # lets the curriculum filter skip decoding
    return len(counts)


def _counts_path(path) -> Path:
    return Path(f"{path}.objects.npy")


class RecordSource:
    """Random access to the Examples of one or more ArrayRecord files (a Grain `RandomAccessDataSource`)."""

    def __init__(self, paths: str | Path | list):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        folders = [str(p) for p in paths if Path(p).is_dir()]
        if folders:
            raise ValueError(f"folders, not record files: {', '.join(folders)}")
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"record files not found: {', '.join(missing)}")
        self._paths = [str(p) for p in paths]
        self._readers = None
        readers = [_reader(p) for p in self._paths]
        # ArrayRecord reads another format, or a file cut short (an interrupted write or copy), as 0 records
        unreadable = [p for p, r in zip(self._paths, readers) if not r.ok()]
        if unreadable:
            raise ValueError(f"not readable as ArrayRecord files (another format, or cut short): {', '.join(unreadable)}")
        self._offsets = np.cumsum([0] + [r.num_records() for r in readers])
        for r in readers:
            r.close()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> Example:
        if self._readers is None:  # opened lazily: each worker process opens its own
            self._readers = [_reader(p) for p in self._paths]
        f = int(np.searchsorted(self._offsets, index, side="right") - 1)
        ex = decode(self._readers[f].read([int(index - self._offsets[f])])[0])
        ex.key = f"{self._paths[f]}#{index - self._offsets[f]} ({ex.key})" if ex.key else f"{self._paths[f]}#{index - self._offsets[f]}"
        return ex

    def object_counts(self) -> np.ndarray | None:
        """int32[len]: objects per record, from the sidecar files `write_records` leaves (None if absent)."""
        paths = [_counts_path(p) for p in self._paths]
        if not all(p.is_file() for p in paths):
            return None
        return np.concatenate([np.load(p) for p in paths])

    def __getstate__(self):
        return {"_paths": self._paths, "_readers": None, "_offsets": self._offsets}

    def __repr__(self) -> str:
        return f"RecordSource({len(self)} records)"


def _reader(path: str):
    from array_record.python.array_record_module import ArrayRecordReader

    return ArrayRecordReader(path, "readahead_buffer_size:0")
