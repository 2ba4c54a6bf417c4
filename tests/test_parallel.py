"""parallel.py helpers: specs fitted to dimensions, batch checks, global batches."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxground import parallel
from jaxground.models.layers import linear


class Heads(nnx.Module):
    def __init__(self, rngs):
        self.big = linear(256, 256, ("embed", "mlp"), rngs=rngs)
        self.small = linear(6, 8, ("embed", "mlp"), rngs=rngs)


def test_fit_spec_drops_axes_that_do_not_divide():
    mesh = parallel.make_mesh((1, 4, 2))
    assert parallel.fit_spec(P("fsdp", "tensor"), (8, 6), mesh) == P("fsdp", "tensor")
    assert parallel.fit_spec(P("fsdp", "tensor"), (6, 5), mesh) == P(None, None)
    assert parallel.fit_spec(P(("data", "fsdp")), (4, 3), mesh) == P(("data", "fsdp"), None)


def test_a_mesh_that_leaves_much_of_the_state_whole_is_refused():
    """A small head may stay whole (6 rows over fsdp=4); fsdp=6 dividing no width of the big matrix may not."""
    with nnx.logical_axis_rules(parallel.RULES):
        state = nnx.state(nnx.eval_shape(lambda: Heads(nnx.Rngs(0))))
    mesh = parallel.make_mesh((1, 4, 2))
    parallel.check_fit(state, mesh)
    assert parallel.state_shardings(state, mesh)["small"]["kernel"].get_value().spec == P(None, "tensor")
    six = parallel.make_mesh((1, 6, 1), devices=jax.devices()[:6])
    parallel.check_fit(state, six)  # +0.2 MiB per device: under the default floor of 64 MiB
    with pytest.raises(parallel.MeshError, match=r"leaves 1 array\(s\) whole.*\n  big/kernel \(256, 256\)"):
        parallel.check_fit(state, six, min_bytes=0)


def test_check_batch_counts_micro_steps_and_processes():
    mesh = parallel.make_mesh((2, 2, 2))
    parallel.check_batch(8, mesh, micro_steps=2)
    with pytest.raises(parallel.MeshError, match="2 micro-step"):
        parallel.check_batch(4, mesh, micro_steps=2)


def test_each_host_must_own_its_batch_shards():
    """Two hosts of 4 devices: (1, 1, 8) puts the one batch shard on both; (2, 1, 4) gives each its own."""
    from types import SimpleNamespace

    hosts = [SimpleNamespace(process_index=i // 4) for i in range(8)]
    parallel.check_host_shards(np.array(hosts, dtype=object).reshape(2, 1, 4))
    parallel.check_host_shards(np.array(hosts, dtype=object).reshape(1, 8, 1))
    with pytest.raises(parallel.MeshError, match=r"\(data, fsdp\)=\(0, 0\) lies on processes \[0, 1\]"):
        parallel.check_host_shards(np.array(hosts, dtype=object).reshape(1, 1, 8))


def test_global_batch_splits_rows_over_data_axes():
    mesh = parallel.make_mesh((2, 2, 2))
    rows = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "none": None}
    out = parallel.global_batch(rows, mesh)
    assert set(out) == {"x"}
    assert out["x"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(jax.device_get(out["x"]), rows["x"])
