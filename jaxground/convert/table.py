"""Converters are tables: torch key pattern -> NNX parameter path + array transform.

A `Rule` fully matches a torch key with a regex; its `target` is the dotted NNX path with `\\1`-style group
references; a target ending in `[i]` (after substitution) writes row i of a stacked (scanned) parameter.
`target=None` drops the key on purpose (e.g. rotary `inv_freq` buffers). `load_into` reads each tensor once,
transforms and places it, and raises one `ConversionError` listing every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> kernel [in, out]."""
    return x.T


def conv2d(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> flax [kh, kw, in, out]."""
    return x.transpose(2, 3, 1, 0)


class ConversionError(ValueError):
    """A checkpoint that does not map onto the model; lists every problem at once."""

    def __init__(self, missing=(), unexpected=(), misshaped=(), context: str = ""):
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
        lines = [f"checkpoint does not match the model{f' ({context})' if context else ''}:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.misshaped:
            lines.append(f"  mis-shaped ({len(self.misshaped)}): " + ", ".join(self.misshaped))
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str | None
    transform: Transform = identity
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def match(self, key: str) -> tuple[bool, str | None]:
        m = self._regex.fullmatch(key)
        if m is None:
            return False, None
        return True, (None if self.target is None else m.expand(self.target))


_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(module: nnx.Module, kind=nnx.Param) -> dict[str, nnx.Variable]:
    """Dotted path -> variable, for every variable of `kind` in `module`."""
    return {_path_str(path): var for path, var in nnx.to_flat_state(nnx.state(module, kind))}


def load_into(
    module: nnx.Module,
    tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
    rules: Iterable[Rule],
    *,
    kind=nnx.Param,
    allow_missing: Callable[[str], bool] = lambda path: False,
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    context: str = "",
) -> nnx.Module:
    """Fills `module`'s variables from `(torch_key, load_fn)` pairs through `rules`, in place.

    `load_fn()` returns the tensor as a NumPy array; it is called once per key, so callers can stream from
    memory-mapped files. Stacked targets (`path[i]`) are assembled on the host before placement.
    `allow_missing(path)` marks parameters that may stay at their initial values (e.g. fresh heads).
    """
    rules = list(rules)
    params = flat_params(module, kind)
    filled: dict[str, set[int] | bool] = {}
    stacked: dict[str, np.ndarray] = {}
    missing, unexpected, misshaped = [], [], []

    for key, load in tensors:
        target = None
        for rule in rules:
            matched, target = rule.match(key)
            if matched:
                break
        else:
            unexpected.append(key)
            continue
        if target is None:
            continue
        m = _INDEX.match(target)
        path, index = (m.group(1), int(m.group(2))) if m else (target, None)
        if path not in params:
            unexpected.append(f"{key} (-> {target}: no such parameter)")
            continue
        var = params[path]
        want = tuple(var.get_value().shape)
        array = np.asarray(rule.transform(np.asarray(load())))
        if index is not None:
            if not want or index >= want[0] or array.shape != want[1:]:
                misshaped.append(f"{key} {tuple(array.shape)} -> {path}[{index}] of {want}")
                continue
            buf = stacked.setdefault(path, np.zeros(want, dtype=array.dtype))
            buf[index] = array
            filled.setdefault(path, set()).add(index)
            continue
        if tuple(array.shape) != want:
            misshaped.append(f"{key} {tuple(array.shape)} -> {path} {want}")
            continue
        _place(var, array, shardings, path)
        filled[path] = True

    for path, buf in stacked.items():
        if len(filled[path]) == buf.shape[0]:
            _place(params[path], buf, shardings, path)
        else:
            absent = sorted(set(range(buf.shape[0])) - filled[path])
            missing.append(f"{path} rows {absent}")
    for path in params:
        if path not in filled and not allow_missing(path):
            missing.append(path)
    if missing or unexpected or misshaped:
        raise ConversionError(missing, unexpected, misshaped, context)
    return module


def _place(var: nnx.Variable, array: np.ndarray, shardings, path: str) -> None:
    dtype = var.get_value().dtype
    value = array.astype(dtype) if array.dtype != dtype else array
    sharding = shardings.get(path) if shardings else None
    var.set_value(jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value))
