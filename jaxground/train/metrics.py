"""Run outputs: the progress line, `WORKDIR/metrics.jsonl` and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """Appends to `metrics.jsonl` and TensorBoard. `resume_step`: the checkpoint a resumed run starts from, 0 for a
    fresh start; what was logged after it (steps run again after a crash, or a run that never saved) is dropped, so
    every step appears once."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.is_file():
                self._truncate(resume_step)
            purge = None if resume_step is None else resume_step + 1  # TensorBoard hides events from here on
            self.tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=purge)

    def _truncate(self, step: int, drop: tuple[int, str] | None = None) -> None:
        """Keeps the lines of steps <= `step` but the (step, split) `drop` (a torn last line from a crash goes too);
        replaced atomically."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row["step"] <= step and (row["step"], row["split"]) != drop:
                    kept.append(line + "\n")
            except (ValueError, KeyError):
                continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    def write(self, step: int, values: dict, *, split: str = "train", replace: bool = False) -> None:
        """`replace`: first drops an earlier line of this step and split (a finished run's final evaluation,
        run again by the same command)."""
        if not self.enabled:
            return
        if replace and self.path.is_file():
            self._truncate(step, drop=(step, split))
        values = {k: float(v) for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        for k, v in values.items():
            if math.isfinite(v):
                self.tb.add_scalar(f"{split}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """`step 120/600 | loss 1.234 ce 0.9 l1 0.1 ... | 52.1 samples/s | ETA 0:03:10` lines."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int):
        self.total, self.batch = total_steps, batch_size
        self.last_step, self.last_time = start_step, time.perf_counter()

    def line(self, step: int, values: dict) -> str:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        parts = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        eta = format_duration((self.total - step) / rate) if rate > 0 else "?"
        return f"step {step}/{self.total} | {parts} | {rate * self.batch:.1f} samples/s | ETA {eta}"
