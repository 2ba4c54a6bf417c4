"""One process of the two-process test: 4 CPU devices here, 8 in the global mesh, collectives over gloo."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).parent))

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

jax.config.update("jax_default_matmul_precision", "highest")

import toy
from test_step import OPTIM, TRAINABLE

from jaxground import distributed, parallel
from jaxground.train import state as st
from jaxground.train import step as stp


def main():
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    how = distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    assert how == "explicit" and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = parallel.make_mesh((1, 4, 2))
    tx = st.make_optimizer(OPTIM, 10)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = st.create_sharded(lambda: toy.Toy(nnx.Rngs(0)), tx, TRAINABLE, mesh)
        fn = stp.jit_train_step(stp.make_train_step(graphdef, toy.loss_fn, tx, TRAINABLE), shardings, mesh)
        rows = toy.ToyIterator(16, shard=distributed.shard_index(), num_shards=distributed.shard_count())
        state, metrics = fn(state, parallel.global_batch(next(rows), mesh))
        params = multihost_utils.process_allgather(state.model, tiled=True)
    if pid == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out, loss=np.asarray(metrics["loss"]), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
