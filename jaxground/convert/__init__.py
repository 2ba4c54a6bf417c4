"""PyTorch -> JAX conversion. `from_torch(source, kind=None, config=None)` returns an NNX module.

`source` is a path (HF directory, `.safetensors`, `.bin`, `.pth`) or an in-memory state dict; `config` is
the HF config (object or dict) or, for kinds without one (official SAM), a jaxground config. Each kind lives
in its own module `jaxground/convert/<kind>.py` with `detect(keys_and_shapes) -> bool` and
`build(source, config, **kw) -> nnx.Module`; `kind=None` picks the first kind whose `detect` says yes.
"""

from __future__ import annotations

import importlib

from jaxground.convert.table import ConversionError  # noqa: F401  (public)

# detection order matters: the composite NExT-Chat layout contains LLaMA / CLIP / SAM keys
KINDS = ("nextchat", "sam", "llama", "clip")


def _kind_module(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")
    return importlib.import_module(f"jaxground.convert.{kind}")


def detect_kind(source) -> str:
    from jaxground.convert.reader import keys_and_shapes

    shapes = keys_and_shapes(source)
    for kind in KINDS:
        try:
            module = _kind_module(kind)
        except ModuleNotFoundError:
            continue
        if module.detect(shapes):
            return kind
    sample = ", ".join(list(shapes)[:8])
    raise ValueError(f"cannot tell what checkpoint this is (first keys: {sample})")


def from_torch(source, kind: str | None = None, config=None, **kwargs):
    kind = kind or detect_kind(source)
    return _kind_module(kind).build(source, config, **kwargs)
