"""The training loop: exact resume after a crash, SIGTERM, divergence, mismatched checkpoints, other meshes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
import toy
import toy_run

from jaxground import checkpoint, parallel
from jaxground.train import loop
from jaxground.train import state as st

HERE = Path(__file__).parent


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def final_params(workdir, step):
    with jax.set_mesh(parallel.make_mesh((1, -1, 1))):
        c = toy_run.config()
        _, abstract, sh = st.plan(lambda: toy.Toy(nnx.Rngs(0)), st.make_optimizer(c.optim, c.train.steps),
                                  st.PathFilter(c.train.trainable, c.train.frozen), parallel.make_mesh((1, -1, 1)))
        model = checkpoint.load_model(Path(workdir) / "checkpoints" / str(step), abstract.model, sh.model)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(model)}


def run_script(*args):
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]))
    return subprocess.run([sys.executable, str(HERE / "run_toy.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_crash_and_resume_is_exact(tmp_path):
    full = toy_run.fit(tmp_path / "full", steps=6)
    assert full.status == "done" and full.step == 6
    killed = run_script(tmp_path / "crash", "--kill-at", 4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoint.resolve(tmp_path / "crash")[1] == 3
    resumed = run_script(tmp_path / "crash")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    a, b = losses(tmp_path / "full"), losses(tmp_path / "crash")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:
        assert a[s] == b[s], (s, a[s], b[s])
    pa, pb = final_params(tmp_path / "full", 6), final_params(tmp_path / "crash", 6)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert a[6] < a[1]  # and it learns
    assert json.loads((tmp_path / "full" / "eval.json").read_text())["acc"] > 0


def test_resume_drops_metrics_logged_after_its_checkpoint(tmp_path):
    """Steps run again after a crash are logged once: lines past the restored step (and a torn last line) go."""
    from jaxground.train.metrics import MetricsWriter

    first = MetricsWriter(tmp_path)
    for step in range(1, 6):
        first.write(step, {"loss": float(step)})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "spl')
    again = MetricsWriter(tmp_path, resume_step=3)
    again.write(4, {"loss": 40.0})
    again.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_metrics_hold_each_step_once_after_a_fresh_start_or_a_rerun(tmp_path):
    """A run that never saved left lines behind (killed before its first checkpoint): a fresh start drops them
    (they were kept, and its steps appeared twice). Running a finished run's command again evaluates it again:
    the final evaluation's line is replaced, not added."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", "loss": 9.0}) + "\n"
                                                    for s in (1, 2, 3)))
    toy_run.fit(tmp_path, steps=2)
    toy_run.fit(tmp_path, steps=2)  # restored at its last step: nothing to train, the final evaluation again
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval")]
    assert rows[0]["loss"] != 9.0


def test_sigterm_saves_and_restores(tmp_path):
    def term(step, state, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = toy_run.fit(tmp_path, steps=6, save_every=100, hooks=[term])
    assert stopped.status == "preempted" and stopped.step == 2
    assert checkpoint.resolve(tmp_path)[1] == 2
    assert not (tmp_path / "eval.json").exists()
    resumed = toy_run.fit(tmp_path, steps=6, save_every=100)
    assert resumed.status == "done" and resumed.step == 6
    assert checkpoint.resolve(tmp_path)[1] == 6


def test_resume_names_the_settings_changed_since_the_checkpoint(tmp_path, capsys):
    """A run resumed with another config says what differs (a longer train.steps reshapes the learning-rate
    schedule); the same config says nothing."""
    assert toy_run.fit(tmp_path, steps=2).step == 2
    assert toy_run.fit(tmp_path, steps=2).step == 2
    assert "differs" not in capsys.readouterr().out
    assert toy_run.fit(tmp_path, steps=3, lr=1e-2).step == 3
    out = capsys.readouterr().out
    assert ("the run config differs from the one saved with that checkpoint: optim.lr: 0.03 -> 0.01; "
            "train.steps: 2 -> 3\n") in out, out
    assert loop.config_changes({"a": {"b": 1, "c": [1, 2]}}, {"a": {"c": [1, 2]}, "d": "x"}) == [
        "a.b: 1 -> (none)", 'd: (none) -> "x"']


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler, as in a terminal (a test worker may ignore SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_and_stops_and_a_second_stops_at_once(tmp_path, ctrl_c_raises, capfd):
    def interrupt(times):
        def hook(step, state, metrics):
            if step == 2:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
        return hook

    stopped = toy_run.fit(tmp_path / "once", steps=6, save_every=100, hooks=[interrupt(1)])
    assert stopped.status == "interrupted" and stopped.step == 2
    assert checkpoint.resolve(tmp_path / "once")[1] == 2
    assert "Ctrl-C: saving after this step" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    resumed = toy_run.fit(tmp_path / "once", steps=6, save_every=100)
    assert resumed.status == "done" and resumed.step == 6

    with pytest.raises(KeyboardInterrupt):
        toy_run.fit(tmp_path / "twice", steps=6, save_every=100, hooks=[interrupt(2)])
    assert not (tmp_path / "twice" / "checkpoints" / "2").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nan_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    original = toy.make_batch

    def make_batch(seed, n):
        b = original(seed, n)
        if seed >= 3:
            b["x"][:] = np.nan
        return b

    toy.make_batch = make_batch
    try:
        with pytest.raises(loop.Diverged, match="step 4") as e:
            toy_run.fit(tmp_path, steps=6)
    finally:
        toy.make_batch = original
    assert str(tmp_path / "checkpoints" / "3") in str(e.value)
    assert checkpoint.resolve(tmp_path)[1] == 3


def test_other_model_shape_in_workdir_is_refused_before_training(tmp_path):
    toy_run.fit(tmp_path, steps=1)

    class Wider(toy.Toy):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.box = nnx.Linear(toy.D, 5, rngs=rngs)

    c = toy_run.config(steps=3)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"shape box/kernel: checkpoint \(16, 4\) vs model \(16, 5\)"):
        loop.fit(toy_run.task(factory=lambda: Wider(nnx.Rngs(0))), c, tmp_path)
    assert checkpoint.resolve(tmp_path)[1] == 1


def test_data_state_of_another_pipeline_is_refused_naming_init_from(tmp_path):
    """A loader that rejects the saved state (Grain: another sampler or dataset sizes) stops the resume with the
    way to keep the weights, before any step, and leaves the checkpoint alone."""
    toy_run.fit(tmp_path, steps=2)
    c = toy_run.config(steps=4)
    t = toy_run.task(c.train.batch_size)
    t.train_batches = toy.ToyIterator(c.train.batch_size, shard=1, num_shards=2)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"state of shard \[0, 1\].*--init-from .*checkpoints/2"):
        loop.fit(t, c, tmp_path)
    assert checkpoint.resolve(tmp_path)[1] == 2


def test_restore_onto_another_mesh(tmp_path):
    toy_run.fit(tmp_path, steps=2, mesh=(1, 4, 2))
    saved = final_params(tmp_path, 2)
    mesh = parallel.make_mesh((2, 1, 4))
    c = toy_run.config()
    with jax.set_mesh(mesh):
        _, abstract, sh = st.plan(lambda: toy.Toy(nnx.Rngs(0)), st.make_optimizer(c.optim, 6),
                                  st.PathFilter(c.train.trainable, c.train.frozen), mesh)
        ck = checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=1, keep=3)
        state, data_state, config = ck.restore(2, abstract, sh)
        ck.close()
    assert data_state == {"index": 2, "shard": [0, 1]} and config["train"]["steps"] == 2
    up = state.model["up"]["kernel"][...]
    assert up.sharding.mesh.shape == mesh.shape and up.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.model)}
    for k in saved:
        np.testing.assert_array_equal(saved[k], got[k], err_msg=k)


def test_skipped_samples_are_logged_with_the_metrics(tmp_path):
    """A loader's bad-sample count (`DataIterator.skipped`) reaches metrics.jsonl at every logged step."""
    from collections import Counter

    c = toy_run.config(steps=3)
    t = toy_run.task(c.train.batch_size)
    t.train_batches.skipped = Counter({"unreadable record": 2})
    loop.fit(t, c, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_skipped"] for r in rows if r["split"] == "train"] == [2.0, 2.0, 2.0]
