"""Orbax checkpoints of a training run: model state, optimizer state, data-iterator state and config.

Layout: `DIR/<step>/model` (every model variable), `DIR/<step>/opt` (step counter + optax state over the
trainable subset), `DIR/<step>/data/process_<i>-of-<n>.json` (each process's data-iterator state, written by
that process), `DIR/<step>/meta` (JSON: step, config). Saves are asynchronous
(training continues while the files are written) and atomic (Orbax writes a temporary directory and renames
it); the last `keep` are kept. Restoring places every array straight into the shardings of the current mesh,
whatever mesh saved it. `--init-from` reads only `model`, so a stage-3 run can start from a stage-1 run whose
optimizer covered other parameters.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxground.train.state import TrainState


class CheckpointMismatch(ValueError):
    """A checkpoint whose arrays do not fit the model being trained."""


class CheckpointDamaged(CheckpointMismatch):
    """A checkpoint whose saved array data cannot be read (files cut short, missing or altered)."""


@contextlib.contextmanager
def reading_arrays(where: str | Path):
    """Raises Orbax's failure to read an array's data (a bare Exception over TensorStore's error) inside the block
    as CheckpointDamaged naming `where` and TensorStore's reason."""
    try:
        yield
    except Exception as e:
        if type(e) is not Exception or "error while reading" not in str(e):
            raise
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        _quiet_abandoned_reads()
        raise CheckpointDamaged(f"{where}: its saved arrays cannot be read, the files are damaged or incomplete "
                                f"({str(cause).splitlines()[0]})") from None


def _quiet_abandoned_reads() -> None:
    """The reads Orbax still had in flight when one failed finish after it closed its event loop; their errors
    ("Event loop is closed", a coroutine never awaited) are unraisable, and Python would print each as a traceback
    under the one-line refusal. Drops those two, from now on; every other unraisable error is printed as before."""
    default = sys.unraisablehook
    if getattr(default, "quiets_abandoned_reads", False):
        return

    def hook(unraisable):
        message = str(unraisable.exc_value)
        if message == "Event loop is closed" or "_read_array_index_and_device_put" in repr(unraisable.object):
            return
        default(unraisable)
    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook


def _restore(manager: ocp.CheckpointManager, step: int, args):
    with reading_arrays(manager.directory / str(step)):
        return manager.restore(step, args=args)


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"a/b/value": shape} for arrays, ShapeDtypeStructs and Orbax ArrayMetadata leaves alike."""
    # NNX variables have a `shape` too; they stop the walk, so their saved "/value" level is dropped
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    names = ("/".join(_key_name(k) for k in path) for path, _ in leaves)
    return {n.removesuffix("/value"): tuple(x.shape) for n, (_, x) in zip(names, leaves)}


def encode_data_state(state):
    """Grain iterators give a dict (datasets API) or JSON bytes (DataLoader); both go into the JSON item."""
    if isinstance(state, bytes):
        return {"__bytes__": base64.b64encode(state).decode("ascii")}
    return state


def decode_data_state(state):
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


def check_model_shapes(saved, abstract, where: str, *, fresh: tuple[str, ...] | None = None) -> None:
    """Raises CheckpointMismatch listing every missing, unexpected and mis-shaped array; for an `--init-from`
    checkpoint (`fresh`: its run's train.fresh), with the train.fresh that starts the missing ones fresh."""
    have, want = _shapes(saved), _shapes(abstract)
    problems = [f"missing in checkpoint: {k} {want[k]}" for k in sorted(want.keys() - have.keys())]
    problems += [f"not in the model: {k} {have[k]}" for k in sorted(have.keys() - want.keys())]
    problems += [
        f"shape {k}: checkpoint {have[k]} vs model {want[k]}"
        for k in sorted(want.keys() & have.keys())
        if have[k] != want[k]
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else "")
        missing = sorted({k.split("/")[0] for k in want.keys() - have.keys()})
        hint = ""
        if fresh is not None and missing:
            hint = ("\nto start the arrays it lacks from a fresh initialisation, list their prefixes in train.fresh: "
                    f"train.fresh=\"{tuple(dict.fromkeys((*fresh, *missing)))}\"")
        raise CheckpointMismatch(f"checkpoint {where} does not fit this model:\n  {shown}{hint}")


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class ProcessJsonHandler(ocp.CheckpointHandler):
    """JSON written and read by every process under its own name. Each host's data iterator stands at its own
    place in its own shard (Grain's state names the shard), so process 0's copy would not do for the others.
    A synchronous handler: the Composite save calls it on every process (Orbax's JSON handler writes on the
    primary one only), as Grain's own iterator handler does."""

    def save(self, directory, args: ProcessJsonSave):
        (directory / _process_file()).write_text(json.dumps(args.item))

    def restore(self, directory, args: ProcessJsonRestore | None = None):
        path = directory / _process_file()
        if not path.exists():
            saved = sorted(p.name for p in directory.glob("process_*.json"))
            raise CheckpointMismatch(
                f"{directory} holds the data-iterator states {saved}, none for this run's {_process_file()}: a run "
                "resumes only on the number of processes that saved it (each host's data shard depends on it); "
                "resume with that many, or start a new workdir with --init-from to keep the weights only")
        return json.loads(path.read_text())


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: object


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    item: object = None


def _handlers() -> dict:
    # registered up front so that a fresh process can read metadata before its first save or restore
    return {"model": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
            "data": ProcessJsonHandler(), "meta": ocp.JsonCheckpointHandler()}


def _saved_model(manager: ocp.CheckpointManager, step: int):
    saved = manager.item_metadata(step)["model"]
    if saved is None:
        raise CheckpointMismatch(f"checkpoint {manager.directory / str(step)} has no readable model item")
    return saved.tree if hasattr(saved, "tree") else saved


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


class Checkpointer:
    """One run's checkpoint directory."""

    def __init__(self, directory: str | Path, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.save_every = save_every  # 0: only forced saves (the end of a run, preemption)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, save_every), max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `step` is on the save interval (never when `save_every` is 0)."""
        return self.save_every > 0 and self.manager.should_save(step)

    def save(self, step: int, state: TrainState, *, data_state=None, config: dict | None = None,
             tokenizer: str | None = None, force: bool = False) -> bool:
        """Starts an asynchronous save when `step` is on the interval (or `force`); returns whether it did.
        `tokenizer`: the training data's `vocabulary_id`, kept in `meta` with the run config."""
        if not force and self.save_every <= 0:
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(state.model),
                opt=ocp.args.StandardSave({"step": state.step, "opt": state.opt}),
                data=ProcessJsonSave(encode_data_state(data_state)),
                meta=ocp.args.JsonSave({"step": int(step), "config": config, "tokenizer": tokenizer}),
            ),
            force=force,
        )

    def check(self, step: int, abstract: TrainState) -> None:
        check_model_shapes(_saved_model(self.manager, step), abstract.model, str(self.directory / str(step)))

    def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, object, dict]:
        """(state in `shardings`, this process's data-iterator state, saved config) of checkpoint `step`."""
        self.check(step, abstract)
        target = _with_shardings(abstract, shardings)
        where = self.directory / str(step)
        if not (where / "data").is_dir():
            # written before the per-process data item (2026-12-03); its state also names Grain's old sampler
            raise CheckpointMismatch(f"{where} was written by an older jaxground (no per-process data-iterator "
                                     f"state): keep its weights with a new workdir and --init-from {where}")
        items = dict(model=ocp.args.StandardRestore(target.model),
                     opt=ocp.args.StandardRestore({"step": target.step, "opt": target.opt}),
                     data=ProcessJsonRestore(), meta=ocp.args.JsonRestore())
        try:
            out = _restore(self.manager, step, ocp.args.Composite(**items))
        except CheckpointMismatch:
            raise
        except (ValueError, KeyError) as e:
            raise CheckpointMismatch(
                f"optimizer state in {self.directory / str(step)} does not fit (was the trainable set or the "
                f"optimizer changed?): {e}"
            ) from None
        state = TrainState(step=out.opt["step"], model=out.model, opt=out.opt["opt"])
        return state, decode_data_state(out.data), out.meta["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def resolve(path: str | Path) -> tuple[Path, int]:
    """A run's workdir, its checkpoint directory, or one `<step>` directory -> (checkpoint dir, step)."""
    path = Path(path).absolute()
    if (path / "model").is_dir():
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = saved_steps(path)
    if not steps:
        raise FileNotFoundError(f"no checkpoint found at {path}")
    return path, steps[-1]


def saved_steps(directory: str | Path) -> list[int]:
    """The steps saved in a checkpoint directory (its `<step>/model` folders), in order; [] when there is none."""
    return sorted(int(p.name) for p in Path(directory).glob("*") if p.name.isdigit() and (p / "model").is_dir())


def identity(path: str | Path) -> str:
    """What `load_model(path)` would read, named the same on every host that holds the same checkpoint: "step N"
    for a training checkpoint (the step `resolve` picks: a host with an older copy names another), "converted
    model <hash>" for a `jaxground convert` output (its saved config's). FileNotFoundError when neither is there."""
    from jaxground.convert.store import CONFIG_FILE

    config = Path(path) / CONFIG_FILE
    if config.is_file():
        return f"converted model {hashlib.sha256(config.read_bytes()).hexdigest()[:12]}"
    return f"step {resolve(path)[1]}"


def _meta(path: str | Path) -> tuple[Path, dict]:
    """(the `<step>` directory, its `meta` item: step, run config, tokenizer) of a training checkpoint."""
    directory, step = resolve(path)
    with ocp.CheckpointManager(directory, item_handlers=_handlers()) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return directory / str(step), meta or {}


def saved_config(path: str | Path) -> tuple[Path, dict]:
    """(the `<step>` directory, the run config saved with it) of a training checkpoint (`resolve`'s paths)."""
    where, meta = _meta(path)
    if not meta.get("config"):
        raise CheckpointMismatch(f"{where} holds no run config (meta)")
    return where, meta["config"]


def check_tokenizer(path: str | Path, vocabulary: str, tokenizer_dir: str) -> None:
    """Refuses to use the training checkpoint `path` with a tokenizer (at `tokenizer_dir`, `vocabulary_id`
    `vocabulary`) other than the one it was trained with: every token id would mean another word. Converted
    models and checkpoints saved before 2026-12-05 carry no tokenizer id and pass."""
    from jaxground.convert.store import CONFIG_FILE

    if (Path(path) / CONFIG_FILE).is_file():
        return
    where, meta = _meta(path)
    saved = meta.get("tokenizer")
    if saved is not None and saved != vocabulary:
        raise CheckpointMismatch(
            f"{where} was trained with another tokenizer (vocabulary {saved}) than {tokenizer_dir} (vocabulary "
            f"{vocabulary}): its token ids would mean other words; point data.tokenizer (or the shapes data it "
            "comes from) at the training run's tokenizer")


def load_model(path: str | Path, abstract_model, shardings, *, fresh: tuple[str, ...] | None = None):
    """The model state of a checkpoint (`--init-from`), checked against and placed like `abstract_model`.
    Variables under a `fresh` prefix ("mask_head", "sam": parts a stage adds) may be absent from the
    checkpoint; only what it holds is returned (merge it over a freshly initialised state). None: not a training
    run's `--init-from` (prediction, evaluation), whose refusal then does not suggest train.fresh."""
    from flax import nnx

    from jaxground.convert.store import CONFIG_FILE

    if (Path(path) / CONFIG_FILE).is_file():  # a `jaxground convert` output
        return _load_converted_state(Path(path), abstract_model, shardings, fresh)
    directory, step = resolve(path)
    with ocp.CheckpointManager(directory, item_handlers=_handlers()) as manager:
        saved = _saved_model(manager, step)
        have = _shapes(saved)

        def keep(var_path, _):
            name = "/".join(map(str, var_path))
            return name in have or not (fresh and name.startswith(fresh))

        wanted, _ = nnx.split_state(abstract_model, keep, ...)
        check_model_shapes(saved, wanted, str(directory / str(step)), fresh=fresh)
        wanted_shardings, _ = nnx.split_state(shardings, keep, ...)
        out = _restore(manager, step, ocp.args.Composite(
            model=ocp.args.StandardRestore(_with_shardings(wanted, wanted_shardings), strict=not fresh)))
    return out.model


def load_models(sources, abstract_model, shardings, *, fresh: tuple[str, ...] = (),
                tokenizer: tuple[str, str] | None = None):
    """`load_model` over several sources merged in order, a later one winning where two hold the same array
    (e.g. stage 3: the composed stage-0 conversion for SAM, then the stage-2 run for everything it trained).
    Each source may hold any part of the model; together with the `fresh` prefixes they must cover it.
    `tokenizer`: (vocabulary id, directory) the sources must have been trained with (`check_tokenizer`), checked
    for every source before any is read."""
    from flax import nnx

    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    for source in sources if tokenizer else ():
        check_tokenizer(source, *tokenizer)
    if len(sources) == 1:
        return load_model(sources[0], abstract_model, shardings, fresh=fresh)
    merged = None
    for source in sources:
        part = load_model(source, abstract_model, shardings, fresh=("",))
        merged = part if merged is None else nnx.merge_state(merged, part)
    have = _shapes(merged)
    missing = [k for k in sorted(_shapes(abstract_model)) if k not in have and not (fresh and k.startswith(fresh))]
    if missing:
        raise CheckpointMismatch(f"{', '.join(map(str, sources))} together lack {len(missing)} arrays of this model "
                                 f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); add a source "
                                 "that holds them, or list their prefix in train.fresh")
    return merged


def _load_converted_state(path: Path, abstract_model, shardings, fresh: tuple[str, ...] | None):
    """`load_model` for a `jaxground convert` output: read it, check it like a training checkpoint, place it."""
    from flax import nnx

    from jaxground.convert.store import load_converted

    # read straight into the mesh's shards (a 7B model never sits whole on one device)
    mesh = next((s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, jax.sharding.NamedSharding)), None)
    model, _ = load_converted(path, mesh=mesh)
    saved = nnx.state(model)
    in_model = _shapes(abstract_model).keys()
    skipped = sorted(_shapes(saved).keys() - in_model)
    if skipped:  # e.g. the SAM of a composed stage-0 conversion, for stage 1 (which has none)
        saved, _ = nnx.split_state(saved, lambda p, _: "/".join(map(str, p)) in in_model, ...)
        print(f"{path}: skipped {len(skipped)} arrays this model does not have (under "
              f"{', '.join(sorted({k.split('/')[0] for k in skipped}))})", file=sys.stderr)
    have = _shapes(saved)

    def keep(var_path, _):
        name = "/".join(map(str, var_path))
        return name in have or not (fresh and name.startswith(fresh))

    wanted, _ = nnx.split_state(abstract_model, keep, ...)
    check_model_shapes(saved, wanted, str(path), fresh=fresh)
    wanted_shardings, _ = nnx.split_state(shardings, keep, ...)
    kept, _ = nnx.split_state(saved, keep, ...)
    return jax.tree.map(lambda x, w, s: jax.device_put(x.astype(w.dtype), s), kept, wanted, wanted_shardings)
