"""The training loop: resume or initialise, step, log, evaluate, checkpoint, stop cleanly on SIGTERM or Ctrl-C.

Generic over what it trains: a `Task` gives the model factory, the loss, the training batches (an iterator of
this process's numpy rows with `get_state`/`set_state`) and optionally an evaluation. The config supplies
`mesh.{data,fsdp,tensor}`, `train.*` and `optim.*` (see `jaxground/train/defaults.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxground import checkpoint, parallel
from jaxground.train import state as st
from jaxground.train import step as stp
from jaxground.train.metrics import MetricsWriter, Progress


@dataclasses.dataclass
class Task:
    model_factory: Callable[[], object]  # () -> nnx.Module, deterministic (seeded inside)
    loss_fn: stp.LossFn
    train_batches: Iterator[dict]  # numpy rows of this process; has get_state() / set_state(state)
    eval_fn: stp.EvalFn | None = None  # (model, batch) -> sums over the batch's valid rows
    eval_batches: Callable[[], Iterable[dict]] | None = None  # a fresh pass over the held-out split
    summarize: Callable[[dict], dict] = dict  # sums over the split -> the reported figures
    check_rows: Callable[[dict], None] | None = None  # raises on training rows the step would mishandle
    tokenizer: tuple[str, str] | None = None  # (vocabulary_id, directory) of the training data's tokenizer


@dataclasses.dataclass
class Result:
    step: int
    status: str  # "done" | "preempted" (SIGTERM) | "interrupted" (Ctrl-C); both saved the last step
    eval: dict
    last_metrics: dict


class Diverged(RuntimeError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


class _Preemption:
    """SIGTERM, or a first Ctrl-C (SIGINT), sets a flag that the loop checks after each step (saving from inside a
    handler is unsafe); a second Ctrl-C raises KeyboardInterrupt at once. SIGINT is left alone where the process
    ignores it (a background job of a shell)."""

    STATUS = (None, "preempted", "interrupted")  # by the flag's value; the larger wins across hosts

    def __init__(self):
        self.requested = 0

    def __enter__(self):
        self.previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._handle)}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])  # the next Ctrl-C stops at once
            os.write(2, b"\nCtrl-C: saving after this step, then stopping (Ctrl-C again to stop without saving)\n")
        self.requested = max(self.requested, 2 if signum == signal.SIGINT else 1)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def agreed(self) -> str | None:
        """The status to stop with ("preempted" or "interrupted"), or None to go on. Every process stops at the
        same step: a flag raised on any host stops all of them."""
        requested = self.requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            requested = int(multihost_utils.process_allgather(np.int32(requested)).max())
        return self.STATUS[requested]


def _log(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def _next_rows(task: Task, step: int) -> dict:
    try:
        rows = next(task.train_batches)
    except StopIteration:
        raise RuntimeError(f"the training data ran out at step {step}; make it repeat") from None
    if task.check_rows is not None:
        task.check_rows(rows)
    return rows


def evaluate(task: Task, eval_step, model_state, mesh) -> dict:
    sums: dict[str, float] = {}
    for rows in task.eval_batches():
        out = jax.device_get(eval_step(model_state, parallel.global_batch(rows, mesh)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return task.summarize(sums)


def config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """`key: saved -> current` for every setting (nested keys dotted) in which two run configs (`config_json`)
    differ; a key only one of them has shows `(none)` on the other side."""
    missing = object()
    changes = []
    for key in sorted(saved.keys() | current.keys()):
        a, b = saved.get(key, missing), current.get(key, missing)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            a, b = ("(none)" if v is missing else json.dumps(v) for v in (a, b))
            changes.append(f"{prefix}{key}: {a} -> {b}")
    return changes


def _restore_data(batches, data_state, where: Path) -> None:
    """Puts the loader where the checkpoint left it; a state of another pipeline (other datasets or sizes, another
    sampler, another host count) is refused rather than silently starting the data order over."""
    try:
        batches.set_state(data_state)
    except ValueError as e:
        reason = str(e).splitlines()[0]
        raise checkpoint.CheckpointMismatch(
            f"{where}: its data-iterator state does not fit this run's data pipeline ({reason}); the datasets or "
            f"their sizes changed since it was saved, or it was written by an older jaxground. Keep its weights "
            f"with a new workdir and --init-from {where}") from None


def start_inputs(directory: Path, init_from: str | Sequence[str] | None) -> dict:
    """What every host of a run must find alike before it starts: the latest step saved in `directory` (it resumes
    there), else the checkpoints `init_from` names (`checkpoint.identity`: FileNotFoundError for one not there)."""
    steps = checkpoint.saved_steps(directory)
    if steps:
        return {"checkpoints (the step to resume from)": f"step {steps[-1]}"}
    sources = [init_from] if isinstance(init_from, (str, Path)) else list(init_from or ())
    return {"checkpoints (the step to resume from)": "none",
            "--init-from checkpoints": [checkpoint.identity(s) for s in sources]}


def fit(task: Task, config, workdir: str | Path, *, init_from: str | Sequence[str] | None = None,
        hooks: Iterable[Callable[[int, st.TrainState, dict], None]] = (), hosts=None) -> Result:
    """Trains `task` in `workdir` (resuming from its latest checkpoint, else starting from `init_from`). With
    `hosts` (`distributed.Hosts`, as `jaxground train` passes) the processes first compare what they would start
    from (`start_inputs`) and refuse together when they differ or one of them refused."""
    workdir = Path(workdir)
    tc = config.train
    mesh = parallel.make_mesh(dict(config.mesh))
    parallel.check_batch(tc.batch_size, mesh, micro_steps=tc.micro_steps, processes=jax.process_count())
    if "eval" in config and "batch_size" in config.eval:
        parallel.check_batch(config.eval.batch_size, mesh, processes=jax.process_count())
    if hosts is not None:  # before Orbax's first collective, the checkpoint manager's creation
        hosts.agree(start_inputs(workdir / "checkpoints", init_from))
    tx = st.make_optimizer(config.optim, tc.steps)
    trainable = st.PathFilter(tc.trainable, tc.frozen)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=tc.save_every, keep=tc.keep)

    with jax.set_mesh(mesh):
        graphdef, abstract, shardings = st.plan(task.model_factory, tx, trainable, mesh)
        latest = ckpt.latest_step()
        writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=0 if latest is None else latest)
        if latest is not None:
            if task.tokenizer:  # the token ids must mean what they meant in training
                checkpoint.check_tokenizer(ckpt.directory / str(latest), *task.tokenizer)
            state, data_state, saved = ckpt.restore(latest, abstract, shardings)
            if data_state is not None:
                _restore_data(task.train_batches, data_state, ckpt.directory / str(latest))
            _log(f"resumed from {ckpt.directory / str(latest)} at step {latest}")
            if saved and (changes := config_changes(saved, config_json(config))):
                # a changed train.steps also reshapes the learning-rate schedule from here on
                _log("the run config differs from the one saved with that checkpoint: " + "; ".join(changes))
        else:
            _, state, _ = st.create_sharded(task.model_factory, tx, trainable, mesh)
            if init_from:
                loaded = checkpoint.load_models(init_from, abstract.model, shardings.model, fresh=tuple(tc.fresh),
                                                tokenizer=task.tokenizer)
                state = dataclasses.replace(state, model=nnx.merge_state(state.model, loaded))
                n_fresh = len(nnx.to_flat_state(state.model)) - len(nnx.to_flat_state(loaded))
                names = init_from if isinstance(init_from, str) else " + ".join(map(str, init_from))
                _log(f"initialised the model from {names}" + (f" ({n_fresh} new arrays under {list(tc.fresh)})"
                                                              if n_fresh else ""))
        n_train = len(st.trainable_paths(abstract.model, trainable))
        _log(f"mesh {dict(mesh.shape)} on {jax.device_count()} devices, {jax.process_count()} process(es); "
             f"{n_train} trainable arrays")

        leaves, treedef = jax.tree.flatten(state)
        train_step = stp.jit_flat_train_step(
            stp.make_train_step(graphdef, task.loss_fn, tx, trainable, micro_steps=tc.micro_steps), shardings, mesh,
            treedef)
        eval_step = None
        if task.eval_fn is not None:
            eval_step = stp.jit_eval_step(stp.make_eval_step(graphdef, task.eval_fn), shardings.model, mesh)

        step = int(jax.device_get(state.step))
        del state  # its arrays are donated to the first step: the loop carries `leaves`
        progress = Progress(tc.steps, tc.batch_size, step)
        metrics: dict = {}
        figures: dict = {}
        status = "done"
        with _Preemption() as preemption:
            rows = _next_rows(task, step) if step < tc.steps else None
            while step < tc.steps:
                leaves, out = train_step(leaves, parallel.global_batch(rows, mesh))
                data_state = task.train_batches.get_state()
                step += 1
                if step < tc.steps:  # read the next batch while the step computes
                    rows = _next_rows(task, step)
                metrics = {k: float(v) for k, v in jax.device_get(out).items()}
                if not all(math.isfinite(v) for v in metrics.values()):
                    ckpt.wait()
                    last = ckpt.latest_step()
                    raise Diverged(f"non-finite loss at step {step}: {metrics}; last good checkpoint: "
                                   f"{'none' if last is None else ckpt.directory / str(last)}")
                if hooks:
                    current = jax.tree.unflatten(treedef, leaves)
                    for hook in hooks:
                        hook(step, current, metrics)
                if step % tc.log_every == 0 or step == tc.steps:
                    metrics["lr"] = float(st.make_schedule(config.optim, tc.steps)(step - 1))
                    skipped = getattr(task.train_batches, "skipped", None)  # bad samples so far (this process)
                    if skipped:
                        metrics["data_skipped"] = float(sum(skipped.values()))
                    _log(progress.line(step, metrics))
                    writer.write(step, metrics)
                if eval_step is not None and tc.eval_every > 0 and step % tc.eval_every == 0 and step < tc.steps:
                    figures = evaluate(task, eval_step, jax.tree.unflatten(treedef, leaves).model, mesh)
                    _log(f"eval step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in figures.items()))
                    writer.write(step, figures, split="eval")
                preempted = preemption.agreed()
                if preempted or step == tc.steps or ckpt.due(step):
                    ckpt.save(step, jax.tree.unflatten(treedef, leaves), data_state=data_state,
                              config=config_json(config), tokenizer=task.tokenizer and task.tokenizer[0], force=True)
                if preempted:
                    status = preempted
                    _log(f"{'SIGTERM' if preempted == 'preempted' else 'Ctrl-C'}: saved step {step} to "
                         f"{ckpt.directory / str(step)}; stopping")
                    break
        ckpt.wait()
        if status == "done" and eval_step is not None:
            figures = evaluate(task, eval_step, jax.tree.unflatten(treedef, leaves).model, mesh)
            _log("eval final | " + " ".join(f"{k} {v:.4f}" for k, v in figures.items()))
            writer.write(step, figures, split="eval", replace=True)
            if jax.process_index() == 0:
                (workdir / "eval.json").write_text(json.dumps({"step": step, **figures}, indent=2) + "\n")
    writer.close()
    ckpt.close()
    return Result(step=step, status=status, eval=figures, last_metrics=metrics)
