"""checkpoint.py: `--init-from` with parts the checkpoint lacks, mismatch errors, iterator states as JSON."""

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent / "train"))
import toy
import toy_run

from jaxground import checkpoint, parallel
from jaxground.models.layers import linear
from jaxground.train import state as st


class WithHead(toy.Toy):
    def __init__(self, rngs):
        super().__init__(rngs)
        self.mask_head = linear(toy.D, 8, ("embed", "mlp"), rngs=rngs)


def plan(factory, mesh):
    c = toy_run.config()
    return st.plan(factory, st.make_optimizer(c.optim, 6), st.PathFilter([".*"]), mesh)


def test_init_from_with_fresh_parts(tmp_path):
    toy_run.fit(tmp_path, steps=1)
    mesh = parallel.make_mesh((1, -1, 1))
    with jax.set_mesh(mesh):
        _, abstract, sh = plan(lambda: WithHead(nnx.Rngs(0)), mesh)
        with pytest.raises(checkpoint.CheckpointMismatch, match="missing in checkpoint: mask_head/kernel") as refused:
            checkpoint.load_model(tmp_path, abstract.model, sh.model)
        # not a training run's --init-from (predict, eval): train.fresh is no help there and is not suggested
        assert "train.fresh" not in str(refused.value)
        loaded = checkpoint.load_model(tmp_path, abstract.model, sh.model, fresh=("mask_head",))
        _, small, small_sh = plan(lambda: toy.Toy(nnx.Rngs(0)), mesh)
        saved = checkpoint.load_model(tmp_path, small.model, small_sh.model)
    assert "mask_head" not in loaded and set(loaded) == set(saved)
    np.testing.assert_array_equal(loaded["up"]["kernel"][...], saved["up"]["kernel"][...])


def test_fresh_does_not_hide_other_missing_parts(tmp_path):
    toy_run.fit(tmp_path, steps=1)
    mesh = parallel.make_mesh((1, -1, 1))
    with jax.set_mesh(mesh):
        _, abstract, sh = plan(lambda: WithHead(nnx.Rngs(0)), mesh)
        with pytest.raises(checkpoint.CheckpointMismatch, match="missing in checkpoint: mask_head") as refused:
            checkpoint.load_model(tmp_path, abstract.model, sh.model, fresh=("sam",))
    # the refusal names the train.fresh that would start them fresh, the run's own prefixes kept
    assert str(refused.value).endswith("""train.fresh="('sam', 'mask_head')\"""")


def test_resolve_and_data_state_roundtrip(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.resolve(tmp_path)
    state = b'{"loader": "x", "done": false}'
    assert checkpoint.decode_data_state(checkpoint.encode_data_state(state)) == state
    assert checkpoint.decode_data_state(checkpoint.encode_data_state({"index": 3})) == {"index": 3}


def test_identity_names_the_step_or_the_converted_config(tmp_path):
    """What multi-host eval and predict compare between hosts: the step a training checkpoint resolves to (a host
    with an older copy names another), or a hash of a converted model's saved config; nothing there is refused."""
    from jaxground.convert.store import CONFIG_FILE

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.identity(tmp_path / "run")
    ck = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", save_every=1, keep=3, async_save=False)
    state = st.TrainState(step=np.int32(0), model={"w": np.ones(3, np.float32)}, opt={})
    ck.save(2, state, force=True)
    ck.save(5, state, force=True)
    ck.close()
    assert checkpoint.identity(tmp_path / "run") == checkpoint.identity(tmp_path / "run" / "checkpoints") == "step 5"
    assert checkpoint.identity(tmp_path / "run" / "checkpoints" / "2") == "step 2"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / CONFIG_FILE).write_text('{"kind": "nextchat", "width": 1}')
    (tmp_path / "b" / CONFIG_FILE).write_text('{"kind": "nextchat", "width": 2}')
    a, b = checkpoint.identity(tmp_path / "a"), checkpoint.identity(tmp_path / "b")
    assert a.startswith("converted model ") and a != b
    (tmp_path / "b" / CONFIG_FILE).write_text('{"kind": "nextchat", "width": 1}')
    assert checkpoint.identity(tmp_path / "b") == a


def test_save_every_zero_saves_only_when_forced(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path, save_every=0, keep=2, async_save=False)
    state = st.TrainState(step=np.int32(0), model={"w": np.ones(3, np.float32)}, opt={})
    assert not any(ck.due(step) for step in range(1, 5))
    assert not ck.save(1, state)
    assert ck.save(4, state, force=True)
    assert ck.latest_step() == 4
    assert checkpoint.Checkpointer(tmp_path / "every2", save_every=2, keep=2).due(2)


def test_data_state_per_process_and_the_older_layout(tmp_path):
    """Each process's iterator state is its own file; a checkpoint of the older layout (process 0's state in
    `meta`, Grain's old sampler) is refused naming --init-from."""
    ck = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2, async_save=False)
    state = st.TrainState(step=np.int32(1), model={"w": np.ones(4, np.float32)}, opt={})
    ck.save(1, state, data_state={"index": 1}, config={"k": 1})
    step_dir = tmp_path / "1"
    assert json.loads((step_dir / "data" / "process_0-of-1.json").read_text()) == {"index": 1}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
    shardings = jax.tree.map(lambda _: sharding, state)
    assert ck.restore(1, abstract, shardings)[1:] == ({"index": 1}, {"k": 1})
    shutil.rmtree(step_dir / "data")
    meta = step_dir / "meta" / "metadata"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"data": {"index": 1}}))
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"older jaxground.*--init-from .*1"):
        ck.restore(1, abstract, shardings)
    ck.close()
