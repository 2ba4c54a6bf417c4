"""TFDS `ref_coco` (prepared by the user with `tfds build`; nothing is downloaded here). Its image feature
needs tensorflow to decode; without tensorflow this reader refuses with a clear message. `path` is the TFDS
data_dir, `split` e.g. `"refcoco_unc/validation"` (builder config / split)."""

from __future__ import annotations

import io

import numpy as np

from jaxground.data.records import Example
from jaxground.data.sources import SourceError


def read_tfds_refcoco(path: str, split: str) -> list[Example]:
    try:
        import tensorflow  # noqa: F401  (TFDS decodes images with it)
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise SourceError(f"tfds_refcoco needs tensorflow and tensorflow_datasets ({e}); install them, or use "
                          "the `refcoco` (refs(unc).p + instances.json) or `refcoco_jsonl` layout") from None
    from PIL import Image

    config, _, split_name = split.partition("/")
    ds = tfds.load(f"ref_coco/{config}", split=split_name or "train", data_dir=path, download=False)
    out = []
    for n, ex in enumerate(tfds.as_numpy(ds)):
        image = ex["image"]
        h, w = image.shape[:2]
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        objs = ex["objects"]
        yxyx = np.asarray(objs["bbox"], np.float32).reshape(-1, 4)  # normalised ymin, xmin, ymax, xmax
        boxes = yxyx[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32)
        rec = [{"expr": s.decode(), "obj": k} for k, refs in enumerate(objs["refexp"]["raw"]) for s in refs]
        out.append(Example(boxes=boxes, tasks={"rec": rec}, image=buf.getvalue(), width=w, height=h,
                           names=[""] * len(boxes), source="tfds_refcoco", key=f"tfds/{split}/{n}"))
    return out
