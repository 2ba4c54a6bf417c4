"""Grain pipelines: datasets -> weighted mixture -> per-epoch shuffle -> dealt to hosts (`mixture.py`) -> sample
transform (decode, choose a task and phrasing, tokenize, CLIP/SAM transforms, pad to static shapes; `sample.py`)
-> batches of numpy arrays named exactly like the `Batch` fields (`Batch(**batch)` works; the batching, skipping
and exact resumption are here).

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

import contextlib
import json
import logging
import signal
from collections import Counter
from pathlib import Path

import grain.python as grain
import ml_collections
import numpy as np

from jaxground.data.conversation import IGNORE, SHORT_SYSTEM, BadSample, ConversationEncoder
from jaxground.data.mixture import Mixture, MixtureSampler, PerItem, build_source, check_kind
from jaxground.data.records import Example
from jaxground.data.sample import SampleMaker, sample_template

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


@contextlib.contextmanager
def _sigint_blocked(block: bool):
    """SIGINT held back in this thread. Grain starts its worker processes (through threads of its own) lazily,
    inside any call of its iterator, and they inherit the blocked mask: a Ctrl-C at the terminal, which reaches the
    whole process group, then stops the run in the main process alone (training saves and exits) instead of
    killing each worker with a traceback. A Ctrl-C meanwhile arrives when the block lifts."""
    if not block:
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class DataIterator:
    """Batches of `Batch`-named numpy arrays. Grain delivers `Uniform` rows batched in its workers. Training: bad
    rows are dropped here, counted, and the good ones re-batched, `batch_size` good samples a batch. Evaluation:
    bad rows are counted and kept as `valid=False` rows, short batches padded with more. `get_state()`/`set_state()` (JSON bytes) resume exactly: the
    loader's state before the batch in hand and how many of its rows were taken. `skipped` counts bad samples
    by reason (`BadSample.reason`, or the exception's type name)."""

    def __init__(self, loader: grain.DataLoader, batch_size: int, training: bool, strict: bool, template: dict,
                 mixture: Mixture | None = None, image_roots: dict | None = None, num_batches: int | None = None):
        self._workers = bool(loader.multiprocessing_options.num_workers)  # every call into Grain under
        # `_sigint_blocked`: any of them may start a worker process
        with _sigint_blocked(self._workers):
            self._it = iter(loader)
        self.num_batches = num_batches  # evaluation: the batches this host yields (None: training, endless)
        self._mixture, self._image_roots = mixture, image_roots or {}
        self.batch_size, self.training, self.strict = batch_size, training, strict
        self._pad = _empty_row(template)
        self.skipped: Counter = Counter()
        self.examples: list[str] = []  # the first few skip messages, for the summary line
        self._done = False
        self._held, self._taken = None, 0  # the loader's batch in hand and how many of its rows are used
        self._state = self._loader_state()  # the loader's state before `_held`

    def __iter__(self):
        return self

    def _loader_state(self) -> bytes:
        with _sigint_blocked(self._workers):
            return self._it.get_state()

    def _next_held(self) -> bool:
        """Fetches the loader's next batch into `_held`; False when the loader is exhausted."""
        state = self._loader_state()
        try:
            with _sigint_blocked(self._workers):
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
        with _sigint_blocked(self._workers):
            self._it.set_state(s["loader"].encode())
        self._held, self._taken, self._state = None, 0, s["loader"].encode()
        taken = s.get("taken", 0)  # absent: saved by the per-record iterator before 2026-12-02, whose loader state
        # is already past its last row
        while taken and self._next_held():  # the batch that was in hand, again; its first rows were used before
            self._taken = min(taken, len(self._held["skip"]))
            taken -= self._taken  # > 0: a run resumed with a smaller batch, where that batch spans several
        self.skipped, self._done = Counter(s["skipped"]), s["done"]


def tokenizer_path(cfg: ml_collections.ConfigDict) -> str:
    """The tokenizer directory: `data.tokenizer`, or when empty the one saved with the first `shapes` dataset."""
    if cfg.tokenizer:
        return cfg.tokenizer
    shapes = [e for e in cfg.datasets.values() if e.kind == "shapes"]
    if not shapes:
        for e in cfg.datasets.values():  # a misspelt "shapes" is the likelier cause
            check_kind(e.kind)
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


def open_readers(cfg: ml_collections.ConfigDict, *, training: bool) -> tuple[ConversationEncoder, Mixture, SampleMaker]:
    """The tokenizer's encoder, the datasets' mixture and the sample maker of a data config, which raise on a bad
    one: opened without starting a loader, so a split that cannot be read is refused before the work that needs it
    (training's final evaluation). `make_pipeline` takes them (`readers`) or opens its own."""
    encoder, _ = make_encoder(cfg)
    sources = {n: build_source(e, cfg.max_objects) for n, e in cfg.datasets.items()}
    if cfg.task:
        sources = {n: PerItem(s, cfg.task) for n, s in sources.items()}
    mixture = Mixture(sources, {n: e.weight for n, e in cfg.datasets.items()} if training else None, cfg.seed)
    return encoder, mixture, SampleMaker(cfg, encoder, {n: e.get("image_root", "") for n, e in cfg.datasets.items()})


def make_pipeline(cfg: ml_collections.ConfigDict, *, training: bool = True, process_index: int | None = None,
                  process_count: int | None = None, num_epochs: int | None = None, readers=None) -> DataIterator:
    """Training: shuffled, endless (or `num_epochs`), full batches. Evaluation: in order, one epoch, the last
    batch padded with `valid=False` rows. Shards by `jax.process_index()/process_count()` unless given.
    `readers`: `open_readers(cfg)`, when already opened (a large annotation file is then parsed once)."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    encoder, mixture, maker = readers or open_readers(cfg, training=training)
    sampler = MixtureSampler(mixture, shuffle=training, process_count=process_count,
                             num_epochs=num_epochs if num_epochs is not None else (None if training else 1))
    if cfg.workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags; we have no absl main
            flags.FLAGS.mark_as_parsed()
    template = sample_template(cfg, encoder)
    batcher = grain.Batch(cfg.batch_size, drop_remainder=False)  # re-batched to good samples by DataIterator
    loader = grain.DataLoader(data_source=mixture, sampler=sampler, operations=[maker, Uniform(template), batcher],
                              shard_options=grain.ShardOptions(process_index, process_count, drop_remainder=training),
                              worker_count=cfg.workers, worker_buffer_size=cfg.worker_buffer_size,
                              read_options=grain.ReadOptions(num_threads=cfg.read_threads,
                                                             prefetch_buffer_size=cfg.read_buffer))
    host_samples = -(-int(mixture.counts.sum()) // process_count)  # evaluation pads the split to whole hosts
    return DataIterator(loader, cfg.batch_size, training, cfg.strict, template, mixture, maker.image_roots,
                        None if training else -(-host_samples // cfg.batch_size))
