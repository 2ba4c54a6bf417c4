"""The datasets of a run as one Grain data source, and the sampler that orders it: each config entry becomes a
random-access source of `Example`s (`build_source`), the sources a weighted `Mixture` whose epochs hold every
dataset's share, and `MixtureSampler` shuffles each epoch and deals it to the hosts."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import grain.python as grain
import numpy as np

from jaxground.data.records import RecordSource


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


RECORD_KINDS = ("shapes", "records")  # ArrayRecord files: a `jaxground data shapes` folder, or one file


def check_kind(kind: str) -> None:
    """Raises SourceError for a dataset kind that no reader takes, listing those that exist."""
    from jaxground.data.sources import READERS, SourceError

    known = sorted((*READERS, *RECORD_KINDS))
    if kind not in known:
        raise SourceError(f"unknown dataset kind {kind!r}; known: {', '.join(known)}")


def build_source(entry, max_objects: int = 0):
    """One dataset entry of the config -> a random-access source of Examples, keeping only images with at least
    the entry's `min_objects` and at most its `max_objects` (else the section's `max_objects`) objects."""
    kind, path = entry.kind, Path(entry.path)
    check_kind(kind)
    if kind in RECORD_KINDS:
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
