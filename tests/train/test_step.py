"""Train step: the same step on 1 device and on an 8-device (fsdp 4 x tensor 2) mesh, accumulation, frozen
parameters."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

sys.path.insert(0, str(Path(__file__).parent))
import toy

from jaxground import parallel
from jaxground.train import state as st
from jaxground.train import step as stp

OPTIM = ConfigDict(dict(lr=1e-2, warmup_ratio=0.0, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=0.01, clip_norm=1.0))
TRAINABLE = st.PathFilter([".*"], frozen=["^vision/"])


def run_steps(mesh_spec, devices, n_steps=1, micro_steps=1, batch=16):
    mesh = parallel.make_mesh(mesh_spec, devices=devices)
    tx = st.make_optimizer(OPTIM, 10)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = st.create_sharded(lambda: toy.Toy(nnx.Rngs(0)), tx, TRAINABLE, mesh)
        before = jax.device_get(state.model)
        fn = stp.jit_train_step(stp.make_train_step(graphdef, toy.loss_fn, tx, TRAINABLE, micro_steps=micro_steps),
                                shardings, mesh)
        metrics = []
        for i in range(n_steps):
            state, m = fn(state, parallel.global_batch(toy.make_batch(i, batch), mesh))
            metrics.append(jax.device_get(m))
    return before, jax.device_get(state), metrics, state


def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_sharded_step_matches_one_device():
    _, one, m1, _ = run_steps((1, 1, 1), jax.devices()[:1], n_steps=2)
    _, eight, m8, sharded = run_steps((1, 4, 2), jax.devices(), n_steps=2)
    kernel = sharded.model["up"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-5, rtol=0)
    fa, fb = flat(one.model), flat(eight.model)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], atol=1e-5, rtol=0, err_msg=k)


def test_flat_step_matches_the_state_step():
    """The loop's step over the state's leaves computes what the step over the state does, sharded too."""
    _, ref, m_ref, _ = run_steps((1, 4, 2), jax.devices(), n_steps=2)
    mesh = parallel.make_mesh((1, 4, 2), devices=jax.devices())
    tx = st.make_optimizer(OPTIM, 10)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = st.create_sharded(lambda: toy.Toy(nnx.Rngs(0)), tx, TRAINABLE, mesh)
        leaves, treedef = jax.tree.flatten(state)
        fn = stp.jit_flat_train_step(stp.make_train_step(graphdef, toy.loss_fn, tx, TRAINABLE), shardings, mesh,
                                     treedef)
        for i in range(2):
            leaves, m = fn(leaves, parallel.global_batch(toy.make_batch(i, 16), mesh))
            assert jax.device_get(m) == m_ref[i]
        out = jax.tree.unflatten(treedef, leaves)
    assert out.model["up"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for k, v in flat(ref).items():
        np.testing.assert_array_equal(v, flat(jax.device_get(out))[k], err_msg=k)


def test_accumulation_matches_full_batch():
    _, full, mf, _ = run_steps((1, 2, 1), jax.devices()[:2])
    _, acc, ma, _ = run_steps((1, 2, 1), jax.devices()[:2], micro_steps=2)
    np.testing.assert_allclose(mf[0]["loss"], ma[0]["loss"], atol=1e-6)
    for k, v in flat(full.model).items():
        np.testing.assert_allclose(v, flat(acc.model)[k], atol=1e-6, err_msg=k)


def test_frozen_parameters_bit_identical_and_trained_ones_move():
    before, after, metrics, _ = run_steps((1, 2, 2), jax.devices()[:4], n_steps=2)
    fb, fa = flat(before), flat(after.model)
    for k in fb:
        if "vision" in k:
            np.testing.assert_array_equal(fb[k], fa[k], err_msg=k)
        else:
            assert not np.array_equal(fb[k], fa[k]), k
    assert set(metrics[0]) == {"loss", "ce", "l1", "grad_norm"}


def test_path_filter_stage3_trains_only_mask_head():
    f = st.PathFilter(["^mask_head/"])
    p = nnx.Param(np.zeros(2))
    assert f(("mask_head", "mlp", "kernel"), p)
    assert not f(("llm", "mask_head_like", "kernel"), p)
    assert not f(("mask_head", "rng"), nnx.RngKey(jax.random.key(0)))


@pytest.mark.parametrize("bad", [(1, 3, 1), (2, 4, 2)])
def test_mesh_not_dividing_devices(bad):
    with pytest.raises(parallel.MeshError, match="devices"):
        parallel.make_mesh(bad)


@pytest.mark.parametrize("bad", [(0, -1, 1), (-2, -1, 1), (1, 1, 0)])
def test_mesh_sizes_below_one_are_refused(bad):  # (0, -1, 1) divided by zero
    with pytest.raises(parallel.MeshError, match="must be >= 1"):
        parallel.make_mesh(bad)


def test_batch_not_dividing_mesh():
    mesh = parallel.make_mesh((2, 2, 2))
    with pytest.raises(parallel.MeshError, match="batch 6"):
        parallel.check_batch(6, mesh)


def test_accumulation_averages_the_micro_batch_means():
    """With a masked mean over unequal counts (NExT-Chat's CE over supervised tokens), `micro_steps=M` takes the
    mean of the M micro-batch losses, as the released code's HF Trainer accumulation does; not the full-batch
    token mean."""
    import jax.numpy as jnp
    import optax

    def masked_ce(model, batch):
        logits, _ = model(batch["x"], batch["ids"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][..., None], -1)[..., 0]
        return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"]), {}

    batch = toy.make_batch(0, 4)
    batch["mask"] = np.ones((4, toy.T), np.float32)
    batch["mask"][1::2, 1:] = 0  # micro-step 1 (rows 1, 3) counts 2 tokens, micro-step 0 (rows 0, 2) 12
    model = toy.Toy(nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx, everything = optax.sgd(1.0), st.PathFilter([".*"])
    step = jax.jit(stp.make_train_step(graphdef, masked_ce, tx, everything, micro_steps=2))
    new, _ = step(st.init_state(params, tx, everything), batch)

    def grad_on(rows):
        return jax.grad(lambda p: masked_ce(nnx.merge(graphdef, p), {k: v[rows] for k, v in batch.items()})[0])(params)

    micro_mean = jax.tree.map(lambda a, b: (a + b) / 2, grad_on([0, 2]), grad_on([1, 3]))
    full = grad_on([0, 1, 2, 3])
    moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, new.model)  # sgd(1): the gradient
    flat_moved, flat_micro, flat_full = (jax.tree.leaves(t) for t in (moved, micro_mean, full))
    for m, g in zip(flat_moved, flat_micro):
        np.testing.assert_allclose(m, g, atol=1e-6)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(flat_micro, flat_full)) > 1e-3


@pytest.mark.parametrize("decay", ["hf", "all"])
def test_weight_decay_reaches_the_arrays_optim_decay_names(decay):
    """With zero gradients an AdamW update is the decay alone: "hf" (HF Trainer's) leaves biases and norm
    scales as they are, "all" shrinks every array."""
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)),
                           nnx.RMSNorm(4, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: x + 1.0, nnx.state(model, nnx.Param))  # nonzero biases
    tx = st.make_optimizer(ConfigDict(OPTIM.to_dict() | {"weight_decay": 0.5, "decay": decay}), 10)
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    moved = {st.path_string(p): bool(np.any(np.asarray(u) != 0))
             for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
    kernels = {k for k in moved if "kernel" in k}
    assert kernels and all(moved[k] for k in kernels)
    assert all(moved[k] == (decay == "all") for k in moved if k not in kernels), moved


def test_unknown_decay_is_refused():
    with pytest.raises(ValueError, match="optim.decay"):
        st.make_optimizer(ConfigDict(OPTIM.to_dict() | {"decay": "none"}), 10)
