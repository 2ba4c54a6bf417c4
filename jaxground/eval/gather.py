"""Multi-host evaluation: the prediction rows of every process, in sample order, on every process.

Each process evaluates its own shard of a split: the evaluation sampler (`data.mixture.MixtureSampler`) deals
host h of n the samples h, h + n, h + 2n, ... (the split padded to a multiple of n with invalid rows), so the row
at position p of host h's batches (padding rows counted) is sample p * n + h. Rows travel as JSON through JAX's
collectives (no shared file system is assumed) and are sorted by that number: every process then holds the rows
one process would have produced, in the same order, and computes the figures over all of them.
"""

from __future__ import annotations

import json

import jax
import numpy as np


def gather_rows(rows: list[dict]) -> list[dict]:
    """This process's rows ("index": position in its batches) -> the rows of all processes ordered by sample,
    "index" renumbered 0, 1, ... as on one process. Every process must call it (a collective)."""
    n = jax.process_count()
    parts = from_every_process(rows)
    numbered = sorted(((sample_number(r["index"], host, n), r) for host, part in enumerate(parts) for r in part),
                      key=lambda t: t[0])
    return [r | {"index": i} for i, (_, r) in enumerate(numbered)]


def sample_number(position: int, process: int, processes: int) -> int:
    """The split's sample number of the row at `position` of process `process`'s batches (padding rows counted)."""
    return position * processes + process


def process_sum(value: int) -> int:
    """An integer summed over the processes (e.g. each host's skipped samples). A collective."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.process_allgather(np.int32(value)).sum())


def from_every_process(value) -> list:
    """Every process's JSON-able `value`, in process order, on every process. A collective."""
    if jax.process_count() == 1:
        return [value]
    return [json.loads(b) for b in _allgather_bytes(json.dumps(value).encode())]


def from_first_process(value):
    """Process 0's JSON-able `value` on every process (the others' are not read). A collective."""
    if jax.process_count() == 1:
        return value
    payload = json.dumps(value).encode() if jax.process_index() == 0 else b""
    return json.loads(_allgather_bytes(payload)[0])


def _allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's `payload`, in process order (padded to the longest for the collective)."""
    from jax.experimental import multihost_utils

    sizes = multihost_utils.process_allgather(np.int32(len(payload)))
    buffer = np.zeros(int(sizes.max()), np.uint8)
    buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
    stacked = multihost_utils.process_allgather(buffer)
    return [stacked[i, : int(size)].tobytes() for i, size in enumerate(sizes)]
