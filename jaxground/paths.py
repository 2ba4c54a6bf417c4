"""Checks of the paths a command will write, made before its work: a run must not compute for minutes (or hours)
and then fail on an output it could have refused at the start."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_dir(path: str | Path) -> str | None:
    """Why the folder `path` could not be made (if missing) and written into, or None if it can: it is a file, a
    folder on its way is a file, or the nearest folder that exists is read-only."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            return f"{path} is a file, not a folder"
        return _unwritable_from(path)
    except OSError as e:  # e.g. a name longer than the file system allows
        return f"{path}: {e.strerror}"


def unwritable_file(path: str | Path) -> str | None:
    """Why the file `path` could not be written (its folder made if missing), or None if it can."""
    path = Path(path)
    try:
        if path.is_dir():
            return f"{path} is a folder, not a file"
        return _unwritable_from(path.absolute().parent)
    except OSError as e:  # e.g. a name longer than the file system allows
        return f"{path}: {e.strerror}"


def _unwritable_from(folder: Path) -> str | None:
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write into {existing}"
    return None
