"""glibc malloc settings that keep freed host memory for reuse instead of returning it to the OS.

XLA:CPU allocates all temporaries of one execution as one block and frees it when the execution ends (223 MB
for the tiny train step of `jaxground bench train`). glibc serves a block that large with a fresh `mmap` and
unmaps it on free, so every step page-faults the whole block in again, zero-filled by the kernel (57,000
faults per tiny step on the development machine). Three `mallopt` settings stop
that: one arena (threads of other arenas get large blocks from `mmap` whatever the threshold), blocks of any
size from the heap, and no trimming of the heap's free top. The price is that the process keeps its peak
heap: memory freed by one step is held for the next, which is what a training loop wants.

Opt-in: `JAXGROUND_MALLOC=keep` makes `jaxground` apply them at start, before anything is allocated
(`cli.main`). Not the default: the bench's batch-32 step gains (README, Performance, "Page faults"), the embedded
default's training loop (batch 8, a smaller block) did not, and one arena serialises the allocations of every
thread. Not glibc (macOS, musl): nothing happens.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc <malloc.h>
_LARGEST = 2**31 - 1  # mallopt takes an int
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, _LARGEST), (M_TRIM_THRESHOLD, _LARGEST))
applied = False  # whether this process took them


def requested() -> str:
    """JAXGROUND_MALLOC: 'default' (unset) or 'keep'; anything else exits with the CLI's bad-invocation status."""
    setting = os.environ.get("JAXGROUND_MALLOC", "default")
    if setting not in ("default", "keep"):
        print(f"JAXGROUND_MALLOC must be 'default' or 'keep', got {setting!r}", file=sys.stderr)
        raise SystemExit(2)
    return setting


def keep_freed_memory() -> None:
    """Applies SETTINGS when JAXGROUND_MALLOC=keep and libc is glibc; `applied` says whether all were taken."""
    if requested() == "default" or platform.libc_ver()[0] != "glibc":
        return
    global applied
    libc = ctypes.CDLL("libc.so.6")
    applied = all([libc.mallopt(option, value) == 1 for option, value in SETTINGS])  # a list: try every one
