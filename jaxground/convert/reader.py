"""Streaming readers: each yields `(key, load_fn)` so that a tensor is read only when it is placed.

Sources: a `.safetensors` file (memory-mapped), a `.bin` / `.pth` / `.pt` pickle (torch.load with
`weights_only=True` and `mmap=True`: a pickle carrying code is refused), a directory holding either (sharded
HF checkpoints included), or an in-memory mapping of arrays / tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

TensorStream = Iterator[tuple[str, Callable[[], np.ndarray]]]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class UnsafeCheckpointError(ValueError):
    """A pickle that needs arbitrary code to load; it is never executed."""


class UnreadableCheckpointError(ValueError):
    """A weight file that is not a checkpoint (torch.load fails on it)."""


def to_numpy(t) -> np.ndarray:
    """torch tensor / array -> float32-or-native NumPy array (bfloat16 goes through float32)."""
    if isinstance(t, np.ndarray):
        return t
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint path (a file, or every weight file in a directory)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("training_args"))
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    files = safetensors or files
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    return files


def open_safetensors(path: Path):
    """safetensors' handle on `path`; a file it cannot read (empty, cut short, another format) raises
    UnreadableCheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise UnreadableCheckpointError(f"{path}: not a safetensors file it can read ({e})") from None


def _safetensors(path: Path) -> TensorStream:
    with open_safetensors(path) as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            yield key, (lambda k=key: to_numpy(f.get_tensor(k)))


def _pickle(path: Path) -> TensorStream:
    import torch

    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # pre-1.6 (non-zip) pickles cannot be memory-mapped; still weights only
            if "mmap" not in str(e):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises anything for a file that is not a checkpoint
        cause = _cause(str(e))
        if "Unsupported global" in cause:  # weights_only's refusal of a pickle that names code
            raise UnsafeCheckpointError(f"{path}: refused to load, the pickle needs code beyond plain tensors (loaded "
                                        f"with weights_only=True; nothing in it was executed): {cause}") from None
        raise UnreadableCheckpointError(f"{path}: not a checkpoint torch.load can read "
                                        f"({type(e).__name__}{': ' + cause if cause else ''})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    yield from stream_mapping(state)


def _cause(message: str) -> str:
    """The cause in torch.load's error, without the advice around it: weights_only's own line after "WeightsUnpickler
    error:" ("Unsupported global: GLOBAL m.Foo ...", "Unsupported operand 123"), else the message's first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "")
    return lines[0] if lines else ""


def stream_mapping(state: Mapping) -> TensorStream:
    for key, value in state.items():
        yield key, (lambda v=value: to_numpy(v))


def stream(source) -> TensorStream:
    """`(key, load_fn)` over a path (file or directory) or an in-memory mapping."""
    if isinstance(source, Mapping):
        yield from stream_mapping(source)
        return
    for file in weight_files(Path(source)):
        yield from (_safetensors(file) if file.suffix == ".safetensors" else _pickle(file))


def keys_and_shapes(source) -> dict[str, tuple[int, ...]]:
    """Key -> shape without reading tensor data where the format allows (used for detection)."""
    if isinstance(source, Mapping):
        return {k: tuple(np.shape(v)) if not hasattr(v, "shape") else tuple(v.shape) for k, v in source.items()}
    out = {}
    for file in weight_files(Path(source)):
        if file.suffix == ".safetensors":
            with open_safetensors(file) as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    out[key] = tuple(f.get_slice(key).get_shape())
        else:
            for key, load in _pickle(file):
                out[key] = tuple(load().shape)
    return out
