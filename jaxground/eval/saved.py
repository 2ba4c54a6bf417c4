"""An evaluation's results saved split by split in OUT, so a crashed or preempted `jaxground eval` loses at most
the split it was on and `--resume` evaluates only what is missing.

When a (task, split) ends, process 0 writes `OUT/splits/TASK.SPLIT.json` = {"run": what decides its figures,
"figures": {...}, "rows": [...]} and rewrites `OUT/eval.json` with every split so far, each file whole or not at
all (written aside, then renamed). "run" is what decides the split's figures: the checkpoint (for a run's workdir,
the step it resolved to), `--max-new-tokens`, the split's dataset entry, the rest of the config without
`NOT_DECIDING`, and the jaxground code (`code_id`); a split saved by another checkpoint, config or code is refused
on `--resume`, never mixed in."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

SPLITS = "splits"
# config keys that do not decide a split's figures: the speed (the figures do not depend on the mesh or batch
# size), which tasks run, and the other splits (each split's own dataset entry is kept)
NOT_DECIDING = (("mesh",), ("eval", "batch_size"), ("eval", "tasks"), ("eval", "datasets"))


class ResumeError(ValueError):
    """A saved split that does not belong to this evaluation."""


def write_text(path: Path, text: str) -> None:
    """`path` holds `text` whole or keeps what it held: written aside, flushed, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(path.name + ".partial")
    with open(aside, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(aside, path)


class Store:
    """The splits saved in `out` for the evaluation of `checkpoint` under `config` (and `--max-new-tokens`)."""

    def __init__(self, out: str | Path, config, checkpoint: str, max_new_tokens: int | None):
        self.out = Path(out)
        self.datasets = json.loads(config.eval.datasets.to_json_best_effort())
        cfg = json.loads(config.to_json_best_effort())
        for *parents, key in NOT_DECIDING:
            node = cfg
            for p in parents:
                node = node.get(p, {})
            node.pop(key, None)
        self.run = {"checkpoint": _checkpoint_id(checkpoint), "max_new_tokens": max_new_tokens, "config": cfg,
                    "code": code_id()}

    def path(self, task: str, split: str) -> Path:
        return self.out / SPLITS / re.sub(r"[^\w.+-]", "_", f"{task}.{split}.json")

    def _run(self, split: str) -> dict:
        return self.run | {"dataset": self.datasets[split]}

    def save(self, task: str, split: str, figures: dict, rows: list[dict]) -> None:
        write_text(self.path(task, split), json.dumps({"run": self._run(split), "figures": figures, "rows": rows}))

    def load(self, pairs) -> dict:
        """{(task, split): (figures, rows)} of the `pairs` saved. Raises ResumeError, naming the first keys that
        differ, for a split saved with another checkpoint, flag or config."""
        done = {}
        for task, split in pairs:
            path = self.path(task, split)
            if not path.is_file():
                continue
            saved = json.loads(path.read_text())
            if saved["run"] != self._run(split):
                diff = _differences(saved["run"], self._run(split))
                raise ResumeError(f"{path} was evaluated with another {', '.join(diff[:4])}"
                                  f"{', ...' if len(diff) > 4 else ''}; drop --resume or choose another --out")
            done[(task, split)] = (saved["figures"], saved["rows"])
        return done


@functools.cache
def code_id() -> str:
    """The jaxground code that computes the figures: a SHA-256 over the package's Python sources (relative paths
    and bytes), 16 hex digits. Any edit or upgrade changes it, so a split evaluated by other code is not taken."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _checkpoint_id(checkpoint: str) -> str:
    """The checkpoint as an absolute path; for a run's workdir or checkpoint dir, the step it resolves to."""
    from jaxground import checkpoint as ckpt
    from jaxground.convert.store import CONFIG_FILE

    if (Path(checkpoint) / CONFIG_FILE).is_file():
        return str(Path(checkpoint).resolve())
    directory, step = ckpt.resolve(checkpoint)
    return str(Path(directory).resolve() / str(step))


def _differences(a, b, prefix: str = "") -> list[str]:
    """The dotted keys where JSON values a and b differ ("config.eval.max_new_tokens", "checkpoint")."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]
