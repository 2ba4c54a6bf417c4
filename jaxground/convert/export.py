"""JAX -> PyTorch: write a converted checkpoint back as safetensors under the torch key names it came from.

`torch_layout.json` (written by the conversion) holds, per torch key, the NNX path (and row of a stacked
parameter), the name of the forward transform, the torch shape and the source dtype. Export applies the inverse
transform and casts back to the source dtype, so torch -> JAX -> torch is bit-exact whenever the JAX dtype holds
the source values (float32 always; bfloat16 for bfloat16 sources). Shards are written one at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxground.convert.sam import conv_transpose2d, flatten, qkv_bias, qkv_kernel
from jaxground.convert.table import conv2d, identity, transpose

# forward transform -> (name, inverse on the JAX-side array); the result is reshaped to the recorded torch shape
_TRANSFORMS: dict[Callable, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    identity: ("identity", lambda x: x),
    transpose: ("transpose", lambda x: x.T),
    conv2d: ("conv2d", lambda x: x.transpose(3, 2, 0, 1)),  # [kh, kw, in, out] -> [out, in, kh, kw]
    conv_transpose2d: ("conv_transpose2d", lambda x: x.transpose(2, 3, 0, 1)),  # -> [in, out, kh, kw]
    flatten: ("flatten", lambda x: x),
    qkv_kernel: ("qkv_kernel", lambda x: x.reshape(x.shape[0], -1).T),  # [D, 3, D] -> [3D, D]
    qkv_bias: ("qkv_bias", lambda x: x),
}
INVERSES = {name: inverse for name, inverse in _TRANSFORMS.values()}


def transform_name(transform: Callable) -> str:
    """The registered name of a rule's transform (a wrapper exposes the transform it wraps as `.base`)."""
    base = getattr(transform, "base", transform)
    if base not in _TRANSFORMS:
        raise ValueError(f"transform {getattr(base, '__name__', base)!r} has no registered inverse; add it to "
                         "jaxground.convert.export so that exported checkpoints stay loadable")
    return _TRANSFORMS[base][0]


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def to_torch(entry: dict, array: np.ndarray):
    """One layout entry's JAX array -> the torch tensor under `entry["key"]`."""
    import torch

    x = array[entry["index"]] if entry["index"] is not None else array
    x = np.ascontiguousarray(INVERSES[entry["transform"]](np.asarray(x))).reshape(entry["shape"])
    if x.dtype.name == "bfloat16":  # torch.from_numpy has no bfloat16: go through the raw bits
        t = torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(x.copy())
    return t.to(_torch_dtype(entry["dtype"]))


def _weight_files(directory: Path) -> list[Path]:
    """The files of an earlier export in `directory`: HF would load a stale `model.safetensors` before an index."""
    return sorted(directory.glob("model*.safetensors")) + sorted(directory.glob("model.safetensors.index.json"))


def export(checkpoint: str | Path, out: str | Path, *, shard_bytes: int = 2 << 30, progress=None,
           overwrite: bool = False) -> list[Path]:
    """Writes `out/model-0000K-of-0000N.safetensors` (+ `model.safetensors.index.json` when sharded) from a
    `jaxground convert` output. Arrays are read one shard at a time into a hidden directory in `out` and moved
    into place at the end, so a crash leaves no half set. Other files in `out` (config.json, tokenizer) stay; weight files
    of an earlier export are refused, or replaced with `overwrite`."""
    from orbax.checkpoint.experimental import v1 as ocp

    from jaxground.convert.store import MODEL_DIR, read_config, read_layout

    checkpoint, out = Path(checkpoint).absolute(), Path(out)  # Orbax reads only absolute paths
    read_config(checkpoint)  # a clear error when this is not a converted checkpoint
    layout = read_layout(checkpoint)
    meta = _flat_meta(ocp.metadata(checkpoint / MODEL_DIR).metadata)
    shards, current, size = [], [], 0
    for entry in layout:
        n = int(np.prod(entry["shape"])) * np.dtype(meta[entry["path"]].dtype).itemsize
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    shards.append(current)
    stale = _weight_files(out) if out.is_dir() else []
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds exported weights ({stale[0].name}); choose another --out "
                              "(or pass --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".export.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        names = _write_shards(checkpoint, staging, layout, meta, shards, progress)
        for f in stale:
            f.unlink()
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in names if name.endswith(".safetensors")]


def _write_shards(checkpoint: Path, out: Path, layout: list[dict], meta: dict, shards: list[list[dict]],
                  progress) -> list[str]:
    """Writes the safetensors shards (+ index when more than one) into `out`; returns the file names."""
    from orbax.checkpoint.experimental import v1 as ocp
    from safetensors.torch import save_file

    from jaxground.convert.store import MODEL_DIR, _nest

    files, weight_map, done = [], {}, 0
    for k, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        paths = sorted({e["path"] for e in shard})
        abstract = {p: meta[p] for p in paths}
        context = ocp.Context()
        context.pytree.loading.partial_load = True  # only this shard's arrays
        with context:
            arrays = _flat_meta(ocp.load(checkpoint / MODEL_DIR, _nest(_targets(abstract))))
        tensors = {e["key"]: to_torch(e, np.asarray(arrays[e["path"]])) for e in shard}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(tensors, name))
        done += len(shard)
        del arrays, tensors
        if progress is not None:
            progress(done, len(layout))
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2))
        files.append("model.safetensors.index.json")
    return files


def _flat_meta(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat_meta(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}



def _targets(meta: dict) -> dict:
    """Restore targets on the default device for the saved shapes and dtypes."""
    import jax

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device) for p, m in meta.items()}
