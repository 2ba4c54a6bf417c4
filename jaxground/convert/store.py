"""The converted checkpoint on disk: write it tensor by tensor, read it back as a model.

Layout of `DIR` (what `jaxground convert` writes and `load_converted(DIR)` reads):
  `model/`                 Orbax checkpoint of every parameter / buffer, a nested dict keyed by NNX path parts
  `jaxground_config.json`  {"kind": nextchat|llama|clip|sam, "config": the jaxground config as JSON}
  `torch_layout.json`      how each array maps back to a torch key (`jaxground export` reads it)

Writing streams: arrays are buffered up to `flush_bytes` and appended with Orbax partial saves, so a conversion
never holds the whole model. Everything is written into a hidden sibling directory that is renamed to `DIR`
only once complete: an interrupted conversion leaves no `DIR` (and no `jaxground_config.json` in the aside copy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Self

import jax
import numpy as np
from flax import nnx

CONFIG_FILE = "jaxground_config.json"
LAYOUT_FILE = "torch_layout.json"
MODEL_DIR = "model"
CHUNK_BYTES = 64 << 20


# ---- configs ---------------------------------------------------------------------------------------------

def config_to_json(kind: str, cfg) -> dict:
    return {"kind": kind, "config": dataclasses.asdict(cfg)}


def config_from_json(data: dict):
    """{"kind", "config"} -> (kind, jaxground config dataclass)."""
    from jaxground.models.clip import ClipVisionConfig
    from jaxground.models.llama import LlamaConfig
    from jaxground.models.sam.config import SamConfig

    kind, c = data["kind"], dict(data["config"])

    def sam(d):
        return SamConfig(**{**d, "global_attn_indexes": tuple(d["global_attn_indexes"])})

    if kind == "llama":
        return kind, LlamaConfig(**c)
    if kind == "clip":
        return kind, ClipVisionConfig(**c)
    if kind == "sam":
        return kind, sam(c)
    if kind == "nextchat":
        from jaxground.models.nextchat import NextChatConfig
        from jaxground.tokens import TokenIds

        c.update(llm=LlamaConfig(**c["llm"]), vision=ClipVisionConfig(**c["vision"]), tokens=TokenIds(**c["tokens"]),
                 sam=None if c.get("sam") is None else sam(c["sam"]))
        return kind, NextChatConfig(**c)
    raise ValueError(f"{CONFIG_FILE}: unknown kind {kind!r}")


def model_factory(kind: str, cfg, seed: int = 0):
    """A no-argument function building the (random) model of `kind` for `cfg`; use under `nnx.eval_shape`."""
    if kind == "llama":
        from jaxground.models.llama import Llama

        return lambda: Llama(cfg, rngs=nnx.Rngs(seed))
    if kind == "clip":
        from jaxground.models.clip import ClipVision

        return lambda: ClipVision(cfg, rngs=nnx.Rngs(seed))
    if kind == "sam":
        from jaxground.models.sam.sam import Sam

        return lambda: Sam(cfg, rngs=nnx.Rngs(seed))
    if kind == "nextchat":
        from jaxground.models.nextchat import NextChat

        return lambda: NextChat(cfg, rngs=nnx.Rngs(seed))
    raise ValueError(f"unknown model kind {kind!r}")


def stored_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    """Dotted path -> variable for everything a checkpoint holds (parameters and SAM's buffers)."""
    from jaxground.convert.table import flat_params
    from jaxground.models.sam.common import Buffer

    return flat_params(module, (nnx.Param, Buffer))


def _nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


# ---- writing ---------------------------------------------------------------------------------------------

class StoreWriter:
    """Context manager that writes a converted checkpoint to `out` atomically.

    `add(path, array)` queues one array (already in its final dtype); `commit(kind, cfg, layout)` writes the
    rest, the JSON files, and renames the aside directory to `out`. Leaving the block without `commit` (an
    exception, a kill) removes or abandons the aside directory; `out` never appears half-written.
    """

    def __init__(self, out: str | Path, *, flush_bytes: int = 256 << 20, overwrite: bool = False):
        self.out = Path(out).absolute()
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists; choose another --out (or pass --overwrite)")
        if self.out.exists() and not (self.out / CONFIG_FILE).is_file():
            # --overwrite deletes the old directory: only ever one this command wrote
            raise FileExistsError(f"{self.out} exists and is not a converted checkpoint (no {CONFIG_FILE}); "
                                  "--overwrite replaces only those")
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.flush_bytes = flush_bytes
        self.overwrite = overwrite
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self.written = 0

    def __enter__(self) -> Self:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, path: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.flush_bytes:
            self.flush()  # a large tensor goes out alone, never on top of a full buffer
        self._pending[path] = array
        self._pending_bytes += array.nbytes
        if self._pending_bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        from orbax.checkpoint.experimental import v1 as ocp

        context = ocp.Context()
        # chunked storage bounds the writer's own copies to one chunk at a time, not one whole array
        context.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
        with context:
            # numpy leaves only: partial saves of jax arrays do not merge their sharding files in this Orbax
            ocp.partial.save(self.tmp / MODEL_DIR, _nest({k: np.asarray(v) for k, v in self._pending.items()}))
        self.written += len(self._pending)
        self._pending, self._pending_bytes = {}, 0

    def commit(self, kind: str, cfg, layout: list[dict]) -> Path:
        from orbax.checkpoint.experimental import v1 as ocp

        self.flush()
        if self.written == 0:
            raise ValueError("nothing to write: the conversion produced no arrays")
        ocp.partial.finalize(self.tmp / MODEL_DIR)
        (self.tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=0))
        # the config is written last: a directory without it is never taken for a checkpoint
        (self.tmp / CONFIG_FILE).write_text(json.dumps(config_to_json(kind, cfg), indent=2))
        if self.out.exists() and self.overwrite:
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out


# ---- reading ---------------------------------------------------------------------------------------------

def read_config(directory: str | Path):
    """(kind, jaxground config) of a converted checkpoint; a clear error when `directory` is not one."""
    directory = Path(directory)
    file = directory / CONFIG_FILE
    if not file.is_file() or not (directory / MODEL_DIR).is_dir():
        raise FileNotFoundError(f"{directory} is not a converted checkpoint (no {CONFIG_FILE} and {MODEL_DIR}/); "
                                "make one with `jaxground convert`")
    return config_from_json(json.loads(file.read_text()))


def read_layout(directory: str | Path) -> list[dict]:
    return json.loads((Path(directory) / LAYOUT_FILE).read_text())


def load_converted(directory: str | Path, *, mesh: jax.sharding.Mesh | None = None, **config_overrides):
    """(model, config) from a `jaxground convert` output. With `mesh`, every array is read straight into
    its sharding (logical axes -> `jaxground.parallel` rules); otherwise onto the default device.
    `config_overrides` replace top-level fields of the saved config (e.g. `freeze_vision=False`)."""
    from orbax.checkpoint.experimental import v1 as ocp

    from jaxground.checkpoint import reading_arrays
    from jaxground.parallel import RULES, state_shardings

    directory = Path(directory).absolute()  # Orbax reads only absolute paths
    kind, cfg = read_config(directory)
    if config_overrides:
        cfg = dataclasses.replace(cfg, **config_overrides)
    with nnx.logical_axis_rules(RULES):  # also under a mesh set by the caller (the training loop)
        model = nnx.eval_shape(model_factory(kind, cfg))
    variables = stored_variables(model)
    if mesh is not None:
        with nnx.logical_axis_rules(RULES):
            state = nnx.state(model)
        shardings = {".".join(map(str, p)): s.get_value() if isinstance(s, nnx.Variable) else s
                     for p, s in nnx.to_flat_state(state_shardings(state, mesh))}
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = dict.fromkeys(variables, device)
    abstract = {p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=shardings[p])
                for p, v in variables.items()}
    saved = _flatten(ocp.metadata(directory / MODEL_DIR).metadata)
    missing, extra = sorted(abstract.keys() - saved.keys()), sorted(saved.keys() - abstract.keys())
    if missing or extra:
        raise ValueError(f"{directory} does not fit its config's model: missing {missing[:10]}"
                         f"{'...' if len(missing) > 10 else ''}, unexpected {extra[:10]}")
    with reading_arrays(directory / MODEL_DIR):
        arrays = _flatten(ocp.load(directory / MODEL_DIR, _nest(abstract)))
    for path, var in variables.items():
        var.set_value(arrays[path])
    return model, cfg


# ---- streaming conversion: sources -> a sink (the store, or a model in memory) ---------------------------

@dataclasses.dataclass(frozen=True)
class Part:
    """One source checkpoint, its rule table, and how its keys are named on export (`rename`)."""

    source: object  # path or in-memory state dict
    rules: tuple
    rename: object = None  # source key -> export key; None keeps the source name
    label: str = ""

    def export_key(self, key: str) -> str:
        return key if self.rename is None else self.rename(key)


@dataclasses.dataclass(frozen=True)
class Assignment:
    part: int
    key: str  # source key
    path: str  # NNX path
    index: int | None  # row of a stacked parameter
    rule: object
    entry: dict  # the torch_layout.json record


def _describe(source) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, torch dtype name) without reading tensor data where the format allows."""
    from collections.abc import Mapping

    from jaxground.convert.reader import _pickle, open_safetensors, weight_files

    if isinstance(source, Mapping):
        return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in source.items()}
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64"}
    out = {}
    for file in weight_files(Path(source)):
        if file.suffix == ".safetensors":
            with open_safetensors(file) as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    s = f.get_slice(key)
                    out[key] = (tuple(s.get_shape()), names.get(s.get_dtype(), s.get_dtype().lower()))
        else:
            for key, load in _pickle(file):
                t = load.__defaults__[0]  # the tensor itself (memory-mapped), not a copy
                out[key] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
    return out


def plan(variables: dict[str, nnx.Variable], parts: list[Part], *, fresh=(), context: str = "") -> list[Assignment]:
    """Matches every source key against its part's rules using shapes only, before any tensor is read; raises
    one `ConversionError` listing every missing, unexpected and mis-shaped key. `fresh` paths are filled
    elsewhere (new heads)."""
    from jaxground.convert.export import transform_name
    from jaxground.convert.table import _INDEX, ConversionError

    assignments, unexpected, misshaped = [], [], []
    filled: dict[str, set] = {}
    for i, part in enumerate(parts):
        for key, (shape, dtype) in _describe(part.source).items():
            for rule in part.rules:
                matched, target = rule.match(key)
                if matched:
                    break
            else:
                unexpected.append(f"{key}{f' ({part.label})' if part.label else ''}")
                continue
            if target is None:
                continue
            m = _INDEX.match(target)
            path, index = (m.group(1), int(m.group(2))) if m else (target, None)
            if path not in variables:
                unexpected.append(f"{key} (-> {target}: no such parameter)")
                continue
            want = tuple(variables[path].get_value().shape)
            got = tuple(rule.transform(np.broadcast_to(np.zeros((), np.float32), shape)).shape)
            if (index is None and got != want) or (index is not None and (not want or index >= want[0]
                                                                           or got != want[1:])):
                misshaped.append(f"{key} {shape} -> {target} of {want}")
                continue
            torch_shape = getattr(rule.transform, "torch_shape", lambda s: s)(shape)
            entry = {"key": part.export_key(key), "path": path, "index": index, "transform": transform_name(rule.transform),
                     "shape": list(torch_shape), "dtype": dtype}
            assignments.append(Assignment(i, key, path, index, rule, entry))
            filled.setdefault(path, set()).add(index)
    missing = []
    for path, var in variables.items():
        if path in fresh:
            continue
        rows = filled.get(path)
        if rows is None:
            missing.append(path)
        elif None not in rows and len(rows) != var.get_value().shape[0]:
            missing.append(f"{path} rows {sorted(set(range(var.get_value().shape[0])) - rows)}")
    if missing or unexpected or misshaped:
        raise ConversionError(missing, unexpected, misshaped, context)
    return assignments


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read_safetensors(path: Path):
    """`(key, load_fn)` over a safetensors file read with plain reads, not a memory map: a mapped file's touched
    pages stay in the process's resident set until it is closed, i.e. a whole shard; read pages do not."""
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, info in header.items():
            def load(info=info, key=key):
                name = _SAFETENSORS_DTYPES[info["dtype"]]
                buf = np.empty(info["shape"], getattr(ml_dtypes, name) if name == "bfloat16" else np.dtype(name))
                f.seek(8 + n + info["data_offsets"][0])
                if buf.nbytes and f.readinto(buf.reshape(-1).view(np.uint8)) != buf.nbytes:
                    raise ValueError(f"{path}: tensor {key} is truncated")
                return buf

            yield key, load


def _stream(source):
    from collections.abc import Mapping

    from jaxground.convert.reader import stream, weight_files

    if isinstance(source, Mapping):
        yield from stream(source)
        return
    for file in weight_files(Path(source)):
        yield from (_read_safetensors(file) if file.suffix == ".safetensors" else stream(file))


def run(variables: dict[str, nnx.Variable], parts: list[Part], assignments: list[Assignment], sink,
        progress=None) -> None:
    """Reads each planned tensor once, transforms and casts it to its variable's dtype, and hands
    `(path, array)` to `sink`; stacked rows are assembled first. `progress(done, total, bytes)` is called
    after each tensor."""
    by_key = {(a.part, a.key): a for a in assignments}
    stacked: dict[str, np.ndarray] = {}
    rows_left = {a.path: 0 for a in assignments if a.index is not None}
    for a in assignments:
        if a.index is not None:
            rows_left[a.path] += 1
    done, nbytes = 0, 0
    for i, part in enumerate(parts):
        for key, load in _stream(part.source):
            a = by_key.get((i, key))
            if a is None:
                continue
            dtype = variables[a.path].get_value().dtype
            array = np.asarray(a.rule.transform(load()))
            array = np.ascontiguousarray(array.astype(dtype, copy=False))
            done, nbytes = done + 1, nbytes + array.nbytes
            if a.index is None:
                sink(a.path, array)
            else:
                buf = stacked.setdefault(a.path, np.zeros(variables[a.path].get_value().shape, dtype))
                buf[a.index] = array
                rows_left[a.path] -= 1
                if rows_left[a.path] == 0:
                    sink(a.path, stacked.pop(a.path))
            del array
            if progress is not None:
                progress(done, len(assignments), nbytes)


def place_into(variables: dict[str, nnx.Variable]):
    """A sink that sets the (abstract) model's variables in memory."""
    import jax.numpy as jnp

    return lambda path, array: variables[path].set_value(jnp.asarray(array))
