"""A toy task for the training machinery tests: a tiny model with a frozen `vision` part, logical axis names
on every parameter, a two-part loss, an eval function and a resumable batch iterator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.models.layers import linear

D_IN, D, VOCAB, T = 8, 16, 12, 6


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.vision = linear(D_IN, D, ("embed", "mlp"), rngs=rngs)
        self.embed = nnx.Embed(VOCAB, D, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(0.5), ("vocab", "embed")), rngs=rngs)
        self.up = linear(D, 2 * D, ("embed", "mlp"), rngs=rngs)
        self.down = linear(2 * D, D, ("mlp", "embed"), rngs=rngs)
        self.head = linear(D, VOCAB, ("embed", "vocab"), rngs=rngs)
        self.box = linear(D, 4, ("embed", None), rngs=rngs)

    def __call__(self, x, ids):  # x [B, D_IN], ids [B, T] -> logits [B, T, V], boxes [B, 4]
        h = self.embed(ids) + self.vision(x)[:, None, :]
        h = h + self.down(jax.nn.gelu(self.up(h)))
        return self.head(h), self.box(h.mean(1))


def loss_fn(model: Toy, batch: dict):
    logits, boxes = model(batch["x"], batch["ids"])
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][..., None], -1))
    l1 = jnp.mean(jnp.abs(boxes - batch["box"]))
    return ce + l1, {"ce": ce, "l1": l1}


def eval_fn(model: Toy, batch: dict):
    logits, _ = model(batch["x"], batch["ids"])
    hit = (logits.argmax(-1) == batch["y"]).mean(-1)
    return {"count": jnp.float32(hit.shape[0]), "acc": hit.sum()}


def make_batch(seed: int, n: int) -> dict:
    r = np.random.default_rng(seed)
    ids = r.integers(0, VOCAB, (n, T)).astype(np.int32)
    return {
        "x": r.normal(size=(n, D_IN)).astype(np.float32),
        "ids": ids,
        "y": (ids + 1) % VOCAB,
        "box": r.uniform(size=(n, 4)).astype(np.float32),
    }


class ToyIterator:
    """Deterministic batches; the state is the next index and the shard (like a Grain iterator's JSON-able
    state, which names its shard and refuses another's). `shard`/`num_shards` give each process its own rows
    of every global batch."""

    def __init__(self, batch_size: int, *, shard: int = 0, num_shards: int = 1, limit: int | None = None):
        self.batch_size, self.shard, self.num_shards, self.limit = batch_size, shard, num_shards, limit
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.limit is not None and self.index >= self.limit:
            raise StopIteration
        full = make_batch(self.index, self.batch_size)
        self.index += 1
        rows = self.batch_size // self.num_shards
        return {k: v[self.shard * rows:(self.shard + 1) * rows] for k, v in full.items()}

    def get_state(self) -> dict:
        return {"index": self.index, "shard": [self.shard, self.num_shards]}

    def set_state(self, state: dict) -> None:
        if state["shard"] != [self.shard, self.num_shards]:
            raise ValueError(f"state of shard {state['shard']} given to shard {[self.shard, self.num_shards]}")
        self.index = state["index"]
