"""Progress lines of a long evaluation, printed on stderr by process 0 (every host runs the same number of
batches):

    eval rec/refcoco_val: 170 batches of 64 rows
    eval rec/refcoco_val: batch 40 of 170 (24%), 2.95 s a batch, about 6m 24s left
    eval rec/refcoco_val: done in 8m 21s: {"count": 10834, "acc@0.5": ...}

The per-batch figure is the mean since the split's first batch ended, so the first batch's compile time does not
count in it."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import jax


def duration(seconds: float) -> str:
    """3725.0 -> "1h 2m 5s", 65.2 -> "1m 5s", 4.25 -> "4.2s"."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m}m {s}s" if h else f"{m}m {s}s"


def _print(line: str) -> None:
    if jax.process_index() == 0:  # on stderr: stdout stays the figures' one JSON line
        print(line, file=sys.stderr, flush=True)


class Progress:
    """Wraps a split's per-batch function: a line when it starts, one at most every `every` seconds (0: none
    between), and `done(figures)` when it ends; `every` None: silent. `total` is the number of batches (every host
    runs as many; None: unknown), `rows` the global batch size."""

    def __init__(self, label: str, total: int | None, rows: int, every: float | None,
                 clock: Callable[[], float] = time.monotonic, show: Callable[[str], None] = _print):
        self.label, self.total, self.every, self.clock = label, total, every, clock
        self.show = (lambda line: None) if every is None else show
        self.count = 0
        self.start = self.first_end = self.last_line = clock()
        self.show(f"eval {label}: {total if total is not None else 'an unknown number of'} batches of {rows} rows")

    def wrap(self, fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        def counted(batch: dict) -> dict:
            out = fn(batch)
            self.tick()
            return out

        return counted

    def tick(self) -> None:
        self.count += 1
        now = self.clock()
        if self.count == 1:
            self.first_end = now
        if not self.every or now - self.last_line < self.every or self.count == self.total:
            return
        self.last_line = now
        line = f"eval {self.label}: batch {self.count}"
        if self.total:
            line += f" of {self.total} ({100 * self.count // self.total}%)"
        if self.count > 1:
            per = (now - self.first_end) / (self.count - 1)
            line += f", {per:.2f} s a batch"
            if self.total:
                line += f", about {duration(per * (self.total - self.count))} left"
        self.show(line)

    def done(self, figures: dict) -> None:
        self.show(f"eval {self.label}: done in {duration(self.clock() - self.start)}: {json.dumps(figures)}")
