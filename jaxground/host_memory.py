"""How glibc's malloc serves XLA:CPU's per-step block of temporaries: transparent huge pages by default.

XLA:CPU allocates all temporaries of one execution as one block and frees it when the execution ends (223 MB
for the tiny train step of `jaxground bench train`). glibc serves a block that large with a fresh `mmap` and
unmaps it on free, so every step page-faults the whole block in again, 4 KiB at a time, zero-filled by the
kernel (63,700 faults per tiny step on the development machine). `JAXGROUND_MALLOC` picks what to do about it:

- `hugepages` (the default): the command re-executes itself once with `glibc.malloc.hugetlb=1` added to
  `GLIBC_TUNABLES` (glibc reads tunables only when a process starts), so malloc asks for transparent huge pages
  on the memory it maps and the block faults in 2 MiB at a time (about 440 faults per tiny step). Needs glibc
  >= 2.35 and the kernel's THP mode `madvise` or `always`; otherwise nothing changes.
- `keep`: three `mallopt` settings, applied in this process: one arena (threads of other arenas get large
  blocks from `mmap` whatever the threshold), blocks of any size from the heap, and no trimming of the heap's
  free top, so freed memory is reused and never faulted in again. The process keeps its peak heap, and the one
  arena serialises the allocations of every thread.
- `glibc`: glibc's own behaviour, nothing changed.

`cli.main` calls `configure` first, before JAX allocates anything; it re-executes only when it runs as the
process's own command line. docs/performance_runs.md, "Page faults", has the measurements. Not glibc (macOS, musl):
nothing happens.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from pathlib import Path

SETTINGS_NAMES = ("hugepages", "keep", "glibc")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc <malloc.h>
_LARGEST = 2**31 - 1  # mallopt takes an int
KEEP_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, _LARGEST), (M_TRIM_THRESHOLD, _LARGEST))
HUGETLB = "glibc.malloc.hugetlb"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
state = "not configured"  # what `configure` did in this process, for the benchmarks' header line


def requested() -> str:
    """JAXGROUND_MALLOC: 'hugepages' (unset), 'keep' or 'glibc'; anything else exits with the CLI's bad-invocation
    status."""
    setting = os.environ.get("JAXGROUND_MALLOC", "hugepages")
    if setting not in SETTINGS_NAMES:
        print(f"JAXGROUND_MALLOC must be one of {', '.join(SETTINGS_NAMES)}; got {setting!r}", file=sys.stderr)
        raise SystemExit(2)
    return setting


def _glibc_version() -> tuple[int, ...] | None:
    name, version = platform.libc_ver()
    return tuple(int(p) for p in re.findall(r"\d+", version)) if name == "glibc" else None


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or 'absent'."""
    try:
        m = re.search(r"\[(\w+)\]", THP_MODE_FILE.read_text())
    except OSError:
        return "absent"
    return m.group(1) if m else "absent"


def _hugetlb_tunable() -> str | None:
    """The value GLIBC_TUNABLES gives glibc.malloc.hugetlb, if any."""
    for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        key, _, value = item.partition("=")
        if key == HUGETLB:
            return value
    return None


def _huge_pages(version: tuple[int, ...], command_line: bool) -> str:
    """Re-executes this process with the tunable set when it can; returns the state otherwise."""
    if version < (2, 35):
        return f"hugepages not in effect: glibc {'.'.join(map(str, version))} has no {HUGETLB} (needs 2.35)"
    mode = _thp_mode()
    if mode not in ("madvise", "always"):
        return f"hugepages not in effect: the kernel's transparent huge pages are {mode!r}"
    value = _hugetlb_tunable()
    if value is not None:
        return (f"hugepages in effect: GLIBC_TUNABLES sets {HUGETLB}=1" if value == "1"
                else f"hugepages not applied: GLIBC_TUNABLES sets {HUGETLB}={value}, left as set")
    if not command_line:
        return "hugepages not in effect: called in-process, GLIBC_TUNABLES takes effect only at a process's start"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB}=1" if tunables else f"{HUGETLB}=1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError as e:  # then run on, as glibc is
        os.environ["GLIBC_TUNABLES"] = tunables
        return f"hugepages not in effect: re-executing failed ({e})"


def _keep() -> str:
    libc = ctypes.CDLL("libc.so.6")
    taken = [libc.mallopt(option, value) == 1 for option, value in KEEP_SETTINGS]  # a list: try every one
    return "keep in effect" if all(taken) else "keep not in effect: mallopt refused a setting"


def configure(command_line: bool) -> None:
    """Applies JAXGROUND_MALLOC; `command_line`: this is the process's own command, which may re-execute itself.
    Sets `state`."""
    global state
    setting, version = requested(), _glibc_version()
    if setting == "glibc":
        tunables = os.environ.get("GLIBC_TUNABLES")
        state = "glibc's own settings" + (f", GLIBC_TUNABLES={tunables}" if tunables else "")
    elif version is None:
        state = f"{setting} not in effect: the C library is not glibc"
    else:
        state = _keep() if setting == "keep" else _huge_pages(version, command_line)
