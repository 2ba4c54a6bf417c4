"""Where a jitted step's time goes on XLA:CPU: a `jax.profiler` trace of a few calls, summed per XLA op.

The trace's Chrome-format JSON (`*.trace.json.gz`, written next to the TensorBoard profile) holds one event per
executed op, on whichever thread ran it (XLA's pool, the client's, or the caller's for small programs); an
event counts when its name is an instruction of the compiled program's HLO, so runtime spans are left out.
Op names lose their numeric suffix (`copy_bitcast_fusion.27` -> `copy_bitcast_fusion`), so the table reads by kind (on XLA:CPU `ynn_fusion` holds the GEMMs and also many reductions; the other kinds are
elementwise and layout fusions).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path


def op_breakdown(fn, calls: int, out_dir: str | Path, hlo_text: str) -> tuple[float, list[tuple[str, float, float]]]:
    """Traces `calls` calls of fn() into out_dir; `hlo_text` is the program's compiled HLO
    (`jitted.lower(...).compile().as_text()`). Returns (summed op time per call in ms over all threads,
    [(op kind, ms per call, ops of that kind per call)] longest first)."""
    import jax

    out_dir = Path(out_dir)
    before = set(out_dir.rglob("*.trace.json.gz"))
    with jax.profiler.trace(str(out_dir)):
        for _ in range(calls):
            fn()
    traces = sorted(set(out_dir.rglob("*.trace.json.gz")) - before)
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {out_dir}")
    events = json.loads(gzip.decompress(traces[-1].read_bytes()))["traceEvents"]
    ops = set(re.findall(r"%([\w.\-]+) = ", hlo_text))
    total: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"] not in ops:
            continue
        kind = re.sub(r"\.\d+$", "", e["name"])
        total[kind] += e["dur"] / 1e3 / calls  # trace durations are in microseconds
        count[kind] += 1
    rows = sorted(((k, ms, count[k] / calls) for k, ms in total.items()), key=lambda r: -r[1])
    return sum(total.values()), rows
