"""The per-sample transform: (dataset name, `Example`) -> one sample's padded numpy arrays (decode the image,
choose a task and phrasing, tokenize, CLIP/SAM transforms, pad to the static shapes of `sample_template`), or a
skip message for bad input."""

from __future__ import annotations

import io
from pathlib import Path

import grain.python as grain
import ml_collections
import numpy as np

from jaxground.data import templates
from jaxground.data.conversation import IGNORE, BadSample, ConversationEncoder
from jaxground.data.records import Example
from jaxground.data.transforms import (
    PAD_FILLS,
    boxes_to_square,
    clip_image,
    image_region,
    masks_to_square,
    polygons_to_mask,
    rgb_uint8,
)


def _image_file(ex: Example, image_root: str):
    if ex.image is not None:
        return io.BytesIO(ex.image)
    return Path(image_root) / ex.image_path if image_root else Path(ex.image_path)


def _load_image(ex: Example, image_root: str) -> np.ndarray:
    from PIL import Image

    with Image.open(_image_file(ex, image_root)) as im:
        return rgb_uint8(im)


def image_size(ex: Example, image_root: str = "") -> tuple[int, int]:
    """(height, width) of the Example's image: its annotation's, else its masks', else the image file's header."""
    if ex.height and ex.width:
        return ex.height, ex.width
    if ex.masks is not None:
        return ex.masks.shape[1:]
    from PIL import Image

    with Image.open(_image_file(ex, image_root)) as im:
        return im.height, im.width


def _check_boxes(boxes: np.ndarray, h: int, w: int, key: str) -> None:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise BadSample(f"{key}: non-finite box", "bad box")
    bad = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if bad.any():
        raise BadSample(f"{key}: box {b[bad][0].tolist()} has x1 <= x0 or y1 <= y0", "bad box")
    out = (b[:, 0] < -1) | (b[:, 1] < -1) | (b[:, 2] > w + 1) | (b[:, 3] > h + 1)  # 1 px of annotation slack
    if out.any():
        raise BadSample(f"{key}: box {b[out][0].tolist()} lies outside the {w}x{h} image", "box outside image")


class SampleMaker(grain.RandomMapTransform):
    """(dataset name, Example) -> dict of padded numpy arrays, or {"skip": reason} for bad input."""

    def __init__(self, cfg: ml_collections.ConfigDict, encoder: ConversationEncoder, image_roots: dict):
        if cfg.turns < 1:
            raise ValueError(f"data.turns must be >= 1, got {cfg.turns}")
        self.pad_fill = cfg.get("pad_fill", "mean")
        if self.pad_fill not in PAD_FILLS:  # checked here: inside a sample it would be a counted skip
            raise ValueError(f"data.pad_fill must be one of {sorted(PAD_FILLS)}, got {self.pad_fill!r}")
        self.rec_answer = cfg.get("rec_answer", "released")
        if self.rec_answer not in templates.REC_ANSWERS:
            raise ValueError(f"data.rec_answer must be one of {templates.REC_ANSWERS}, got {self.rec_answer!r}")
        for key in ("patch_targets", "patch_attributes"):
            if cfg[key] and (cfg[key] < 0 or cfg.image_size % cfg[key]):
                raise ValueError(f"data.{key} (the CLIP patch size) must divide image_size {cfg.image_size}, "
                                 f"got {cfg[key]}")
        self.cfg, self.encoder, self.image_roots = cfg, encoder, image_roots
        self.task_weights = {cfg.task: 1.0} if cfg.get("task") else dict(cfg.task_weights)

    def random_map(self, element, rng: np.random.Generator):
        name, ex = element
        if ex is None:  # an evaluation's padding slot: an invalid row, not a skip
            return {"skip": "", "reason": "padding"}
        try:
            if isinstance(ex, str):
                raise BadSample(ex, "unreadable record")
            return self.make(ex, rng, self.image_roots.get(name, ""))
        except BadSample as e:
            return {"skip": str(e), "reason": e.reason}
        except Exception as e:  # noqa: BLE001 - unreadable image files and the like: counted, named in strict mode
            return {"skip": f"{getattr(ex, 'key', name)}: {type(e).__name__}: {e}", "reason": type(e).__name__}

    def make(self, ex: Example, rng: np.random.Generator, image_root: str = "") -> dict:
        cfg, key = self.cfg, ex.key or ex.image_path or "?"
        tasks = [t for t in templates.available_tasks(ex) if self.task_weights.get(t, 0) > 0]
        if not tasks:
            raise BadSample(f"{key}: no task with a positive weight among {templates.available_tasks(ex)}", "no task")
        p = np.array([self.task_weights[t] for t in tasks], np.float64)
        task = tasks[rng.choice(len(tasks), p=p / p.sum())]
        items = ex.tasks["rec" if task == "reg" else task]
        picked = rng.permutation(len(items))[: cfg.turns]
        image = _load_image(ex, image_root)
        h, w = image.shape[:2]
        if (ex.width and ex.width != w) or (ex.height and ex.height != h):
            raise BadSample(f"{key}: image is {w}x{h} but the annotation says {ex.width}x{ex.height}", "image size")
        boxes = np.clip(boxes_to_square(np.clip(ex.boxes, 0, [w, h, w, h]), h, w), 0.0, 1.0)
        turns = [templates.build_turns(ex, task, items[int(k)], rng, self.rec_answer) for k in picked]
        T, Q = cfg.max_len, cfg.max_boxes
        for k in range(len(turns), 0, -1):  # as many turns as fit in max_len (the first always counts)
            kept = [t for pair in turns[:k] for t in pair]
            enc = self.encoder.encode(kept, boxes, key)
            if len(enc.input_ids) <= T:
                break
        # only the boxes these turns show: one bad region must not cost an image its other regions
        _check_boxes(ex.boxes[sorted({o for _, _, groups in kept for g in groups for o in g})], h, w, key)
        n = len(enc.input_ids)
        if n > T:
            raise BadSample(f"{key}: {n} tokens exceed max_len {T}", "too long")
        if len(enc.boxes) > Q or len(enc.target_boxes) > Q:
            raise BadSample(f"{key}: {len(enc.boxes)} boxes / {len(enc.target_boxes)} targets exceed max_boxes {Q}",
                            "too many boxes")
        out = {
            "images": clip_image(image, cfg.image_size, self.pad_fill),
            "input_ids": _pad(enc.input_ids, T, self.encoder.ids.pad),
            "attention_mask": np.arange(T) < n,
            "labels": _pad(enc.labels, T, IGNORE),
            "boxes": _pad(enc.boxes, Q, 0.0),
            "box_mask": np.arange(Q) < len(enc.boxes),
            "target_boxes": _pad(enc.target_boxes, Q, 0.0),
            "target_mask": np.arange(Q) < len(enc.target_boxes),
            "valid": np.bool_(True),
        }
        if cfg.patch_targets:
            out["patch_target"] = self._patch_target(ex, enc.target_objects, cfg.image_size, cfg.patch_targets)
        if cfg.patch_attributes:
            out["patch_attr"] = self._patch_attr(ex, cfg.image_size, cfg.patch_attributes)
        if cfg.with_masks:
            out["masks"], out["mask_valid"] = self._masks(ex, enc.target_objects, h, w)
            out["mask_region"] = image_region(h, w, cfg.mask_size)
        if cfg.with_sam:
            from jaxground.data import sam_transforms

            out["sam_images"] = sam_transforms.preprocess_image(image, cfg.sam_size)[0]  # centred, as boxes
        return out

    @staticmethod
    def _patch_target(ex: Example, objs: list[int], size: int, patch: int) -> np.ndarray:
        """float32[P]: the share of each CLIP patch (row-major) covered by the first trigger's object, -1 when
        the sample has no trigger or no mask."""
        g = size // patch
        if not objs or ex.masks is None:
            return np.full(g * g, -1.0, np.float32)
        return _patch_shares(ex.masks[objs[0]][None], size, patch)[0]

    @staticmethod
    def _patch_attr(ex: Example, size: int, patch: int) -> np.ndarray:
        """int32[P]: per CLIP patch (row-major) the `shapes.patch_class` of the object covering most of it when
        that is at least a quarter of the patch, 0 (background) when objects cover under 5%, else -1 (mixed);
        all -1 for images without masks or attributes."""
        from jaxground.data.shapes import patch_class

        g = size // patch
        if ex.masks is None or not ex.attrs or not len(ex.masks):
            return np.full(g * g, -1, np.int32)
        share = _patch_shares(ex.masks, size, patch)
        best = share.argmax(0)
        classes = np.array([patch_class(a) for a in ex.attrs], np.int32)[best]
        out = np.where(share.sum(0) < 0.05, 0, -1).astype(np.int32)
        return np.where(share.max(0) >= 0.25, classes, out)

    def _masks(self, ex: Example, objs: list[int], h: int, w: int):
        Q, S = self.cfg.max_boxes, self.cfg.mask_size
        masks, valid = np.zeros((Q, S, S), np.float32), np.zeros(Q, bool)
        for k, o in enumerate(objs):
            if ex.masks is not None:
                m = ex.masks[o]
            elif ex.polygons is not None and ex.polygons[o]:
                m = polygons_to_mask(ex.polygons[o], h, w)
            else:
                continue
            masks[k] = masks_to_square(m[None], S)[0]
            valid[k] = True
        return masks, valid


def _patch_shares(masks: np.ndarray, size: int, patch: int) -> np.ndarray:
    """bool[n,H,W] object masks -> float32[n,P]: the share of each CLIP patch (row-major) each object covers,
    on the padded square the CLIP image is made of."""
    g = size // patch
    square = masks_to_square(masks, size)
    return square.reshape(len(masks), g, patch, g, patch).mean((2, 4)).reshape(len(masks), -1).astype(np.float32)


def _pad(x: np.ndarray, n: int, value) -> np.ndarray:
    out = np.full((n, *x.shape[1:]), value, x.dtype)
    out[: len(x)] = x
    return out


def sample_template(cfg: ml_collections.ConfigDict, encoder: ConversationEncoder) -> dict:
    """An all-invalid sample: every array `SampleMaker` returns for this data config, at its shape and dtype."""
    T, Q, S = cfg.max_len, cfg.max_boxes, cfg.image_size
    t = {"images": np.zeros((S, S, 3), np.float32), "input_ids": np.full(T, encoder.ids.pad, np.int32),
         "attention_mask": np.zeros(T, bool), "labels": np.full(T, IGNORE, np.int32),
         "boxes": np.zeros((Q, 4), np.float32), "box_mask": np.zeros(Q, bool),
         "target_boxes": np.zeros((Q, 4), np.float32), "target_mask": np.zeros(Q, bool), "valid": np.bool_(False)}
    if cfg.patch_targets:
        t["patch_target"] = np.full((S // cfg.patch_targets) ** 2, -1.0, np.float32)
    if cfg.patch_attributes:
        t["patch_attr"] = np.full((S // cfg.patch_attributes) ** 2, -1, np.int32)
    if cfg.with_masks:
        t["masks"], t["mask_valid"] = np.zeros((Q, cfg.mask_size, cfg.mask_size), np.float32), np.zeros(Q, bool)
        t["mask_region"] = np.zeros((cfg.mask_size, cfg.mask_size), bool)
    if cfg.with_sam:
        t["sam_images"] = np.zeros((cfg.sam_size, cfg.sam_size, 3), np.float32)
    return t
