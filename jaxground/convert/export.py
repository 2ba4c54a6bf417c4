"""JAX -> PyTorch: a converted or trained checkpoint as safetensors under torch key names (+ what the official
NExT-Chat loader reads beside them, `official`).

A torch layout holds, per torch key, the NNX path (and row of a stacked parameter), the name of the forward
transform, the torch shape and the dtype: `torch_layout.json` of a conversion (the source's own names and dtypes),
or for a training checkpoint the released NExT-Chat layout derived from the conversion table, in the saved dtype.
Export applies the inverse transform and casts to that dtype, so torch -> JAX -> torch is bit-exact whenever the
JAX dtype holds the source values (float32 always; bfloat16 for bfloat16 sources). Shards are written one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxground.convert.sam import conv_transpose2d, flatten, qkv_bias, qkv_kernel
from jaxground.convert.table import conv2d, identity, transpose

# forward transform -> (name, inverse on the JAX-side array, giving the torch shape: layouts derived from the
# rules take their torch shapes from it)
_TRANSFORMS: dict[Callable, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    identity: ("identity", lambda x: x),
    transpose: ("transpose", lambda x: x.T),
    conv2d: ("conv2d", lambda x: x.transpose(3, 2, 0, 1)),  # [kh, kw, in, out] -> [out, in, kh, kw]
    conv_transpose2d: ("conv_transpose2d", lambda x: x.transpose(2, 3, 0, 1)),  # -> [in, out, kh, kw]
    flatten: ("flatten", lambda x: x.reshape(1, -1)),  # [C] -> a one-row embedding table [1, C]
    qkv_kernel: ("qkv_kernel", lambda x: x.reshape(x.shape[0], -1).T),  # [D, 3, D] -> [3D, D]
    qkv_bias: ("qkv_bias", lambda x: x.reshape(-1)),  # [3, D] -> [3D]
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


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint to export: its saved arrays, their torch layout, and the files written beside the weights."""

    pytree: Path  # Orbax checkpoint directory of the model arrays
    checkpointable: str  # the model's name in it ("AUTO": the directory itself)
    saved: dict  # NNX path -> (name in the saved tree, array metadata)
    layout: list[dict]
    files: dict[str, bytes]  # config.json and the tokenizer, for NExT-Chat models


def _saved(pytree: Path, checkpointable: str) -> dict:
    """NNX path -> (saved name, metadata); a training checkpoint saves each NNX variable's array as `<path>.value`."""
    from orbax.checkpoint.experimental import v1 as ocp

    flat = _flat_meta(ocp.metadata(pytree, checkpointable_name=checkpointable).metadata)
    return {name.removesuffix(".value"): (name, meta) for name, meta in flat.items()}


def open_source(checkpoint: str | Path, tokenizer: str | Path | None = None) -> Source:
    """A `jaxground convert` output (layout from its torch_layout.json) or a `jaxground train` checkpoint (a NExT-Chat:
    layout derived from the conversion table). `tokenizer` (a NExT-Chat's; by default a training run's own) is
    copied with its added tokens."""
    from jaxground.convert import official, trained
    from jaxground.convert.store import CONFIG_FILE, MODEL_DIR, read_config, read_layout

    checkpoint = Path(checkpoint).absolute()  # Orbax reads only absolute paths
    extra_tokens = ()
    if (checkpoint / CONFIG_FILE).is_file():
        kind, cfg = read_config(checkpoint)
        pytree, name = checkpoint / MODEL_DIR, "AUTO"
        saved, layout = _saved(pytree, name), read_layout(checkpoint)
    else:
        pytree, cfg, run_tokenizer, extra_tokens = trained.read(checkpoint, tokenizer)
        kind, name, tokenizer = "nextchat", "model", tokenizer or run_tokenizer
        saved = _saved(pytree, name)
        layout = trained.layout(cfg, {p: meta for p, (_, meta) in saved.items()}, pytree)
    files = {}
    if kind == "nextchat":
        dtype = next(e["dtype"] for e in layout if e["key"] == "model.embed_tokens.weight")
        files["config.json"] = json.dumps(official.hf_config(cfg, dtype), indent=2).encode()
        if tokenizer is not None:
            files.update(official.tokenizer_files(Path(tokenizer), cfg, extra_tokens))
    elif tokenizer is not None:
        raise ValueError(f"--tokenizer is for NExT-Chat models; {checkpoint} holds a converted {kind}")
    return Source(pytree, name, saved, layout, files)


def _weight_files(directory: Path) -> list[Path]:
    """The files of an earlier export in `directory`: HF would load a stale `model.safetensors` before an index."""
    return sorted(directory.glob("model*.safetensors")) + sorted(directory.glob("model.safetensors.index.json"))


def export(checkpoint: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
           shard_bytes: int = 2 << 30, progress=None, overwrite: bool = False) -> list[Path]:
    """Writes `out/model-0000K-of-0000N.safetensors` (+ `model.safetensors.index.json` when sharded) from a
    `jaxground convert` output or a `jaxground train` checkpoint (`open_source`); for a NExT-Chat model also
    `config.json` for the official classes and the tokenizer when there is one. Arrays are read one shard at a time
    and everything is written into a hidden directory in `out`, moved into place at the end, so a crash leaves no
    half set. Files of an earlier export are refused, or replaced with `overwrite`; other files in `out` stay."""
    source = open_source(checkpoint, tokenizer)
    out = Path(out)
    shards, current, size = [], [], 0
    for entry in source.layout:
        n = int(np.prod(entry["shape"])) * np.dtype(source.saved[entry["path"]][1].dtype).itemsize
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    shards.append(current)
    stale = (_weight_files(out) + [out / f for f in source.files if (out / f).exists()]) if out.is_dir() else []
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds exported files ({stale[0].name}); choose another --out "
                              "(or pass --overwrite)")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".export.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        names = _write_shards(source, staging, shards, progress)
        for name, content in source.files.items():
            (staging / name).write_bytes(content)
        for f in stale:
            f.unlink()
        for name in [*names, *source.files]:
            os.replace(staging / name, out / name)
    except BaseException:
        if created:  # nothing of this export stays, not even the folder it made
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in names if name.endswith(".safetensors")]


def _new_file_mode() -> int:
    """The mode `open` gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_shards(source: Source, out: Path, shards: list[list[dict]], progress) -> list[str]:
    """Writes the safetensors shards (+ index when more than one) into `out`; returns the file names."""
    from orbax.checkpoint.experimental import v1 as ocp
    from safetensors.torch import save_file

    from jaxground.checkpoint import reading_arrays
    from jaxground.convert.store import _nest

    files, weight_map, done = [], {}, 0
    for k, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        abstract = dict(source.saved[e["path"]] for e in shard)  # saved name -> metadata
        context = ocp.Context()
        context.pytree.loading.partial_load = True  # only this shard's arrays
        with context, reading_arrays(source.pytree):
            arrays = _flat_meta(ocp.load(source.pytree, _nest(_targets(abstract)),
                                         checkpointable_name=source.checkpointable))
        tensors = {e["key"]: to_torch(e, np.asarray(arrays[source.saved[e["path"]][0]])) for e in shard}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        os.chmod(out / name, _new_file_mode())  # safetensors writes 0600, whatever the umask
        files.append(name)
        weight_map.update(dict.fromkeys(tensors, name))
        done += len(shard)
        del arrays, tensors
        if progress is not None:
            progress(done, len(source.layout))
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
