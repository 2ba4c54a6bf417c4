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


def test_batch_not_dividing_mesh():
    mesh = parallel.make_mesh((2, 2, 2))
    with pytest.raises(parallel.MeshError, match="batch 6"):
        parallel.check_batch(6, mesh)
