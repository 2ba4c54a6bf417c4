"""`bench train --profile`: the op table sums what the XLA threads ran, per op kind, per call."""

import jax
import jax.numpy as jnp

from jaxground.bench._profile import op_breakdown


def test_op_breakdown_counts_each_op_once_per_call(tmp_path):
    a = jnp.ones((256, 256))
    f = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
    f(a).block_until_ready()
    busy, rows = op_breakdown(lambda: f(a).block_until_ready(), 3, tmp_path, f.lower(a).compile().as_text())
    assert busy > 0 and abs(busy - sum(ms for _, ms, _ in rows)) < 1e-6
    assert all("." not in kind or not kind.rsplit(".", 1)[1].isdigit() for kind, _, _ in rows)  # suffixes merged
    # the two matmuls (and the tanh fused somewhere) run once per call: 2 or 3 ops, never a multiple of 3
    assert 2 <= sum(n for _, _, n in rows) <= 3
    assert [ms for _, ms, _ in rows] == sorted((ms for _, ms, _ in rows), reverse=True)
