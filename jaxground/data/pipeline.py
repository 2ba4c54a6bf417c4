"""Grain pipelines: datasets -> weighted mixture -> per-epoch shuffle -> dealt to hosts -> sample transform
(decode, choose a task and phrasing, tokenize, CLIP/SAM transforms, pad to static shapes) -> batches of numpy
arrays named exactly like the `Batch` fields (`Batch(**batch)` works).

Config section (`pipeline_config()`; a run config puts it at `config.data`):

| key | meaning |
|---|---|
| `datasets` | name -> {`kind`, `path`, `split`, `image_root`, `weight`, optional `min_objects`/`max_objects` (keep only images with that many objects; the same data twice with a filter oversamples part of it)}; kinds: `shapes` (path = the data dir), `records`, and the readers in `sources` (`refcoco`, `refcoco_jsonl`, `flickr`, `vg`, `v7w`, `pope`, `llava`, `tfds_refcoco`) |
| `tokenizer` | tokenizer directory ("" = `<shapes dir>/tokenizer` of the first `shapes` dataset) |
| `location_format` | `emb` (pixel2emb), `num`, `bin` |
| `system_prompt` | the conversation's system text |
| `image_position` | `first`: the image opens the first user turn (as released); `last`: it follows the question text, so image tokens can attend to the question |
| `task_weights` | task -> weight when a sample could serve several tasks (`rec reg gcap pope count v7w vqa conv`) |
| `rec_answer` | `released`: REC answers `Answer: <at><boxes> .` (as released); `expression`: the expression restated before its box, `The red circle <at><boxes> .` (teacher-forced at evaluation too) |
| `turns` | up to this many items of the chosen task as successive turns about the same image (more box targets per image; 1 = one question per sample, as released; turns that would pass `max_len` are dropped) |
| `max_len`, `max_boxes` | static padded lengths (T, Q); a longer sample is skipped |
| `image_size`, `num_image_tokens` | CLIP input side; `<im_patch>` tokens per image |
| `pad_fill` | the colour expand2square pads with: `mean` (CLIP mean, as LLaVA) or `white` (NExT-Chat's, so its released weights) |
| `with_masks`, `mask_size`, `with_sam`, `sam_size` | stage 3 outputs: target masks (with `mask_region`, the image's pixels of the padded square) and SAM images |
| `patch_targets` | 0 (default) or the CLIP patch size: adds `patch_target` [P], the share of each patch inside the first answer box's object mask (-1 without one), for the tiny default's patch aid (`model.patch_head`, `loss.w_patch`) |
| `patch_attributes` | 0 (default) or the CLIP patch size: adds `patch_attr` [P], per patch the `shapes.patch_class` (shape, size) of the object covering most of it (>= 1/4), 0 for background (< 5% covered), -1 otherwise, for the tiny default's attribute aid (`model.attr_classes`, `loss.w_attr`); synthetic shapes only (others get -1) |
| `max_objects` | curriculum: keep only images with at most this many objects (0 = all) |
| `task` | evaluation: every item of this one task is a sample (e.g. each REC expression); "" = by `task_weights` |
| `batch_size`, `seed`, `workers`, `worker_buffer_size`, `strict` | workers 0 = in-process; strict raises on bad input |
| `read_threads`, `read_buffer` | Grain's record-reading threads and read-ahead per process (its defaults 16 and 500 suit remote storage; 0 and 0 read in the calling thread, fastest for local records on few cores) |

Bad input (unreadable image, a box outside its image or with x1 <= x0, a sample past `max_len`, too many boxes,
`<boxes>` count not matching its boxes) is skipped (an invalid row in evaluation) and counted in `DataIterator.skipped` (training writes the
count as `data_skipped` with the metrics of every logged step; evaluation logs one summary line when its epoch
ends), or raises `BadSample` naming the file and index in strict mode.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import grain.python as grain
import ml_collections
import numpy as np

from jaxground.data import templates
from jaxground.data.conversation import IGNORE, SHORT_SYSTEM, BadSample, ConversationEncoder
from jaxground.data.records import Example, RecordSource
from jaxground.data.transforms import (
    PAD_FILLS,
    boxes_to_square,
    clip_image,
    image_region,
    masks_to_square,
    polygons_to_mask,
)

log = logging.getLogger(__name__)

DEFAULT_TASK_WEIGHTS = {"rec": 4.0, "reg": 1.0, "gcap": 1.0, "pope": 1.0, "count": 1.0, "v7w": 1.0, "vqa": 1.0,
                        "conv": 1.0}


def pipeline_config(**overrides) -> ml_collections.ConfigDict:
    """The data section with the synthetic default's values."""
    cfg = ml_collections.ConfigDict({
        "datasets": {"shapes": {"kind": "shapes", "path": "data/shapes", "split": "train", "image_root": "",
                                "weight": 1.0}},
        "tokenizer": "",
        "location_format": "emb",
        "system_prompt": SHORT_SYSTEM,
        "image_position": "first",
        "task_weights": dict(DEFAULT_TASK_WEIGHTS),
        "turns": 1,
        "rec_answer": "released",
        "max_len": 128,
        "max_boxes": 8,
        "image_size": 64,
        "pad_fill": "mean",
        "num_image_tokens": 64,
        "with_masks": False,
        "patch_targets": 0,
        "patch_attributes": 0,
        "mask_size": 64,
        "with_sam": False,
        "sam_size": 1024,
        "max_objects": 0,
        "task": "",
        "batch_size": 32,
        "seed": 0,
        "workers": 0,
        "worker_buffer_size": 2,
        "read_threads": 16,
        "read_buffer": 500,
        "strict": False,
    })
    for key, value in overrides.items():
        cfg[key] = value  # replaces: `update` would merge dicts (task_weights={"rec": 1} kept every other task)
    return cfg


# ---------------------------------------------------------------- sources

class ListSource:
    """Random access over an in-memory list (the real-dataset readers' annotations)."""

    def __init__(self, items: list):
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int):
        return self._items[i]


class Subset:
    """Some indices of a source (the curriculum filter)."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int):
        return self._source[int(self._indices[i])]


class PerItem:
    """Every item of one task as its own sample (evaluation: each expression of a RefCOCO ref counts once)."""

    def __init__(self, source, task: str):
        self._source, self._key = source, "rec" if task == "reg" else task
        pairs = []
        for i in range(len(source)):
            try:
                n = len(source[i].tasks.get(self._key, []))
            except Exception:  # noqa: BLE001 - an unreadable record stays one sample, skipped when read
                n = 1
            pairs += [(i, k) for k in range(n)]
        self._pairs = np.array(pairs, np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int):
        r, k = self._pairs[i]
        ex = self._source[int(r)]
        return dataclasses.replace(ex, tasks={self._key: [ex.tasks[self._key][int(k)]]})


class Mixture:
    """The datasets of a weighted mixture as one Grain data source: dataset d's record j is key `offsets[d] + j`,
    and one more key past them is the padding of an evaluation (yields ("", None)); otherwise yields (dataset
    name, Example or error text). An epoch has `sum(len)` slots, dataset d filling a share `w_d / sum(w)` of them:
    whole passes over its records, then a subset drawn anew every epoch (`epoch_keys`), so a down-weighted
    dataset shows different records each epoch."""

    def __init__(self, sources: dict, weights: dict | None, seed: int):
        """`weights` None: every record once (evaluation)."""
        self._names = list(sources)
        self._sources = [sources[n] for n in self._names]
        sizes = [len(s) for s in self._sources]
        total = sum(sizes)
        w = np.array(sizes if weights is None else [weights[n] for n in self._names], np.float64)
        if total == 0:
            raise ValueError(f"no samples in {', '.join(self._names)}: an evaluation task counts only the items "
                             "of that task (e.g. the synthetic shapes have no `v7w` items); training counts every record")
        if not (w > 0).any():
            raise ValueError(f"no dataset has a positive weight: {dict(zip(self._names, w.tolist()))}")
        counts = np.array(sizes, np.int64) if weights is None else _largest_remainder(w / w.sum() * total, total)
        for name, n, size in zip(self._names, counts, sizes):
            if n and not size:
                raise ValueError(f"dataset {name!r} has weight {weights[name]} but no records")
        self.counts, self.seed = counts, seed
        self._offsets = np.cumsum([0] + sizes)
        self.pad_key = int(total)
        # Grain checks a restored iterator against repr(source): name what decides the records.
        self._repr = f"Mixture(names={self._names}, sizes={sizes}, counts={counts.tolist()}, seed={seed})"

    def __repr__(self) -> str:
        return self._repr

    def __len__(self) -> int:
        return self.pad_key + 1

    def epoch_keys(self, epoch: int) -> np.ndarray:
        """int64[sum(counts)]: the keys of one epoch, dataset by dataset, each dataset's records in order (an
        evaluation reads them so); the partial pass's subset comes from `default_rng((seed, d, epoch))`."""
        keys = []
        for d, n in enumerate(self.counts):
            size = int(self._offsets[d + 1] - self._offsets[d])
            if not n:
                continue
            full, rest = divmod(int(n), size)
            part = np.sort(np.random.default_rng((self.seed, d, epoch)).permutation(size)[:rest])
            keys.append(self._offsets[d] + np.concatenate([np.arange(size)] * full + [part]))
        return np.concatenate(keys).astype(np.int64)

    def __getitem__(self, key: int):
        if key == self.pad_key:
            return "", None
        d = int(np.searchsorted(self._offsets, key, side="right") - 1)
        name, j = self._names[d], int(key - self._offsets[d])
        try:
            return name, self._sources[d][j]
        except Exception as e:  # noqa: BLE001 - a corrupt record must not kill the loader: a counted skip
            return name, f"{name}[{j}]: unreadable record ({type(e).__name__}: {e})"


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, each the floor of its share or one more (the largest fractions)."""
    counts = np.floor(shares).astype(np.int64)
    counts[np.argsort(counts - shares, kind="stable")[: total - counts.sum()]] += 1
    return counts


class MixtureSampler:
    """A Grain sampler over a `Mixture`'s epochs. Global index i is slot `i % L` of epoch `i // L`; host h of n
    reads the slots h, h + n, ... (Grain's DataLoader asks for `i * n + h`). Training shuffles each epoch's
    keys (seeded by the epoch) before they are dealt out, so every host sees a random part of every dataset, and
    drops the last `L % n` of them so hosts stay in step; evaluation keeps the order and pads L up to a multiple
    of n with the mixture's padding key. Each record's generator is Grain's: Philox keyed by seed + i."""

    def __init__(self, mixture: Mixture, *, shuffle: bool, process_count: int, num_epochs: int | None):
        self._mixture, self._shuffle, self._num_epochs = mixture, shuffle, num_epochs
        n = int(mixture.counts.sum())
        self._length = n - n % process_count if shuffle else -(-n // process_count) * process_count
        if not self._length:
            raise ValueError(f"{n} records cannot be dealt to {process_count} hosts")
        self._cache: dict = {}
        self._repr = (f"MixtureSampler({mixture!r}, shuffle={shuffle}, process_count={process_count}, "
                      f"num_epochs={num_epochs})")

    def __repr__(self) -> str:
        return self._repr

    def __len__(self) -> int:
        return sys.maxsize if self._num_epochs is None else self._num_epochs * self._length

    def _keys(self, epoch: int) -> np.ndarray:
        keys = self._cache.get(epoch)
        if keys is None:
            keys = self._mixture.epoch_keys(epoch)
            if self._shuffle:
                keys = np.random.default_rng((self._mixture.seed, epoch)).permutation(keys)
            self._cache = {e: k for e, k in self._cache.items() if e == epoch - 1} | {epoch: keys}
        return keys

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        epoch, slot = divmod(index, self._length)
        keys = self._keys(epoch)
        key = int(keys[slot]) if slot < len(keys) else self._mixture.pad_key
        rng = np.random.Generator(np.random.Philox(key=self._mixture.seed + index))
        return grain.RecordMetadata(index=index, record_key=key, rng=rng)


def _object_counts(source) -> np.ndarray | None:
    counts = getattr(source, "object_counts", None)
    return counts() if callable(counts) else None


def build_source(entry, max_objects: int = 0):
    """One dataset entry of the config -> a random-access source of Examples, keeping only images with at least
    the entry's `min_objects` and at most its `max_objects` (else the section's `max_objects`) objects."""
    kind, path = entry.kind, Path(entry.path)
    if kind in ("shapes", "records"):
        files = [path / f"{entry.split}.array_record"] if kind == "shapes" else [path]
        src = RecordSource(files)
    else:
        from jaxground.data import sources

        src = ListSource(sources.read(kind, entry))
    low, high = entry.get("min_objects", 0), entry.get("max_objects", 0) or max_objects
    if low or high:
        counts = _object_counts(src)
        if counts is None:
            counts = np.array([len(src[i].boxes) for i in range(len(src))])
        src = Subset(src, np.nonzero((counts >= low) & ((counts <= high) if high else True))[0])
    return src


# ---------------------------------------------------------------- the sample transform

def _image_file(ex: Example, image_root: str):
    if ex.image is not None:
        return io.BytesIO(ex.image)
    return Path(image_root) / ex.image_path if image_root else Path(ex.image_path)


def _load_image(ex: Example, image_root: str) -> np.ndarray:
    from PIL import Image

    with Image.open(_image_file(ex, image_root)) as im:
        return np.asarray(im.convert("RGB"))


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


# ---------------------------------------------------------------- the iterator

def _empty_row(template: dict) -> dict:
    """An all-invalid sample of the template's shapes and dtypes (labels IGNORE)."""
    row = {k: np.zeros_like(v) for k, v in template.items()}
    row["labels"] = np.full_like(template["labels"], IGNORE)
    return row


class Uniform(grain.MapTransform):
    """`SampleMaker`'s output -> one row structure for every sample, so the workers can batch: a good sample
    gains `skip` and `reason` = "", a bad one becomes an all-invalid pad row carrying its skip message and
    reason (an evaluation's padding slot keeps an empty message: it stays, as an invalid row). Batching in the
    workers moves one set of arrays per batch through shared memory instead of one per sample (`bench pipeline`, 2 workers, batch 32: 921-1,046 against 264 samples/s)."""

    def __init__(self, template: dict):
        self.pad = _empty_row(template)

    def map(self, element: dict) -> dict:
        if "skip" in element:
            return {**self.pad, "skip": element["skip"], "reason": element["reason"]}
        return {**self.pad, **element, "skip": "", "reason": ""}


class DataIterator:
    """Batches of `Batch`-named numpy arrays. Grain delivers `Uniform` rows batched in its workers. Training: bad
    rows are dropped here, counted, and the good ones re-batched, `batch_size` good samples a batch. Evaluation:
    bad rows are counted and kept as `valid=False` rows, short batches padded with more. `get_state()`/`set_state()` (JSON bytes) resume exactly: the
    loader's state before the batch in hand and how many of its rows were taken. `skipped` counts bad samples
    by reason (`BadSample.reason`, or the exception's type name)."""

    def __init__(self, loader: grain.DataLoader, batch_size: int, training: bool, strict: bool, template: dict,
                 mixture: Mixture | None = None, image_roots: dict | None = None, num_batches: int | None = None):
        self._it = iter(loader)
        self.num_batches = num_batches  # evaluation: the batches this host yields (None: training, endless)
        self._mixture, self._image_roots = mixture, image_roots or {}
        self.batch_size, self.training, self.strict = batch_size, training, strict
        self._pad = _empty_row(template)
        self.skipped: Counter = Counter()
        self.examples: list[str] = []  # the first few skip messages, for the summary line
        self._done = False
        self._held, self._taken = None, 0  # the loader's batch in hand and how many of its rows are used
        self._state = self._it.get_state()  # the loader's state before `_held`

    def __iter__(self):
        return self

    def _next_held(self) -> bool:
        """Fetches the loader's next batch into `_held`; False when the loader is exhausted."""
        state = self._it.get_state()
        try:
            held = next(self._it)
        except StopIteration:
            return False
        self._held, self._taken, self._state = held, 0, state
        return True

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        if not self.training:
            return self._next_eval()
        pieces, have, skipped_here = [], 0, 0
        while have < self.batch_size:
            used_up = self._held is None or self._taken == len(self._held["skip"])
            if used_up and not self._next_held():
                self._done = True
                self._log_summary()
                if not have or self.training:
                    raise StopIteration
                break
            rows = np.arange(self._taken, len(self._held["skip"]))
            bad = self._held["skip"][rows] != ""
            good = rows[~bad]
            if len(good) > self.batch_size - have:  # stop at the last row this batch takes
                good = good[: self.batch_size - have]
                rows = rows[rows <= good[-1]]
                bad = bad[: len(rows)]
            for i in rows[bad]:
                self._skip(str(self._held["skip"][i]), str(self._held["reason"][i]))
                skipped_here += 1
                if skipped_here > 100 * self.batch_size:  # a config error, not a few bad samples
                    raise BadSample(f"no usable sample in the last {skipped_here}: {self.summary()}; "
                                    f"e.g. {self.examples[0]}")
            pieces.append({k: v[good] for k, v in self._held.items() if k not in ("skip", "reason")})
            have += len(good)
            self._taken = int(rows[-1]) + 1
        out = {k: np.concatenate([p[k] for p in pieces]) for k in self._pad}
        if have < self.batch_size:
            out = {k: np.concatenate([v, np.repeat(self._pad[k][None], self.batch_size - have, 0)])
                   for k, v in out.items()}
        return out

    def _next_eval(self) -> dict:
        """The loader's next batch as it is, bad rows left in as invalid ones: every host then runs the same
        number of batches (a jitted evaluation steps all hosts together)."""
        if not self._next_held():
            self._done = True
            self._log_summary()
            raise StopIteration
        held, short = self._held, self.batch_size - len(self._held["skip"])
        for i in np.flatnonzero(held["skip"] != ""):
            self._skip(str(held["skip"][i]), str(held["reason"][i]))
        self._taken = len(held["skip"])
        return {k: np.concatenate([held[k], np.repeat(self._pad[k][None], short, 0)]) for k in self._pad}

    def example(self, sample: int) -> tuple[Example, str]:
        """Evaluation: the split's sample number `sample` (the epoch's order, as `eval.gather` numbers rows) ->
        (its Example, its dataset's image_root). Raises LookupError for a padding slot or an unreadable record
        (their rows are invalid)."""
        if self.training or self._mixture is None:
            raise LookupError("DataIterator.example needs an evaluation pipeline (make_pipeline(training=False))")
        name, ex = self._mixture[sample]  # an evaluation's epoch keys are 0, 1, ... (`Mixture.epoch_keys`)
        if ex is None or isinstance(ex, str):  # padding, or an unreadable record's error text
            raise LookupError(f"sample {sample} has no record: {ex or 'padding'}")
        return ex, self._image_roots.get(name, "")

    def _skip(self, message: str, reason: str) -> None:
        if self.strict:
            raise BadSample(f"bad input (strict mode): {message}", reason)
        self.skipped[reason] += 1
        if len(self.examples) < 3:
            self.examples.append(message)

    def _log_summary(self) -> None:
        if self.skipped:
            log.warning("data: skipped %d bad samples %s; e.g. %s", sum(self.skipped.values()),
                        dict(self.skipped), self.examples[0])

    def summary(self) -> str:
        return f"skipped {sum(self.skipped.values())} bad samples {dict(self.skipped)}"

    def get_state(self) -> bytes:
        state = {"loader": self._state.decode(), "taken": self._taken, "skipped": dict(self.skipped),
                 "done": self._done}
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        s = json.loads(state)
        self._it.set_state(s["loader"].encode())
        self._held, self._taken, self._state = None, 0, s["loader"].encode()
        if s.get("taken"):  # the batch that was in hand, again; its first rows were used before (absent: saved
            # by the per-record iterator before 2026-12-02, whose loader state is already past its last row)
            self._next_held()
            self._taken = s["taken"]
        self.skipped, self._done = Counter(s["skipped"]), s["done"]


def tokenizer_path(cfg: ml_collections.ConfigDict) -> str:
    """The tokenizer directory: `data.tokenizer`, or when empty the one saved with the first `shapes` dataset."""
    if cfg.tokenizer:
        return cfg.tokenizer
    shapes = [e for e in cfg.datasets.values() if e.kind == "shapes"]
    if not shapes:
        raise ValueError("data.tokenizer is empty and there is no `shapes` dataset to take it from")
    return str(Path(shapes[0].path) / "tokenizer")


def make_encoder(cfg: ml_collections.ConfigDict):
    """-> (ConversationEncoder, TokenIds) for the config's tokenizer and location format."""
    from jaxground.data.location_format import get_format
    from jaxground.data.tokenizer import load_tokenizer

    fmt = get_format(cfg.location_format)
    tok, ids = load_tokenizer(tokenizer_path(cfg), fmt.extra_tokens)
    return ConversationEncoder(tok, ids, fmt, cfg.num_image_tokens, cfg.system_prompt,
                               cfg.image_position), ids


def make_pipeline(cfg: ml_collections.ConfigDict, *, training: bool = True, process_index: int | None = None,
                  process_count: int | None = None, num_epochs: int | None = None) -> DataIterator:
    """Training: shuffled, endless (or `num_epochs`), full batches. Evaluation: in order, one epoch, the last
    batch padded with `valid=False` rows. Shards by `jax.process_index()/process_count()` unless given."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    encoder, _ = make_encoder(cfg)
    sources = {n: build_source(e, cfg.max_objects) for n, e in cfg.datasets.items()}
    if cfg.task:
        sources = {n: PerItem(s, cfg.task) for n, s in sources.items()}
    mixture = Mixture(sources, {n: e.weight for n, e in cfg.datasets.items()} if training else None, cfg.seed)
    maker = SampleMaker(cfg, encoder, {n: e.get("image_root", "") for n, e in cfg.datasets.items()})
    sampler = MixtureSampler(mixture, shuffle=training, process_count=process_count,
                             num_epochs=num_epochs if num_epochs is not None else (None if training else 1))
    if cfg.workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags; we have no absl main
            flags.FLAGS.mark_as_parsed()
    template = _template(cfg, encoder)
    batcher = grain.Batch(cfg.batch_size, drop_remainder=False)  # re-batched to good samples by DataIterator
    loader = grain.DataLoader(data_source=mixture, sampler=sampler, operations=[maker, Uniform(template), batcher],
                              shard_options=grain.ShardOptions(process_index, process_count, drop_remainder=training),
                              worker_count=cfg.workers, worker_buffer_size=cfg.worker_buffer_size,
                              read_options=grain.ReadOptions(num_threads=cfg.read_threads,
                                                             prefetch_buffer_size=cfg.read_buffer))
    host_samples = -(-int(mixture.counts.sum()) // process_count)  # evaluation pads the split to whole hosts
    return DataIterator(loader, cfg.batch_size, training, cfg.strict, template, mixture, maker.image_roots,
                        None if training else -(-host_samples // cfg.batch_size))


def _template(cfg, encoder) -> dict:
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
