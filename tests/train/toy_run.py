"""The toy task wired into the training loop, with a test-sized config."""

import jax
import toy
from flax import nnx

from jaxground.train import defaults, loop


def config(steps=6, save_every=1, mesh=(1, -1, 1), batch_size=8, lr=3e-2):
    from ml_collections import ConfigDict

    c = ConfigDict()
    c.mesh = defaults.mesh(*mesh)
    c.optim = defaults.optim(lr, warmup_ratio=0.0)
    c.train = defaults.train(1, steps=steps, batch_size=batch_size, log_every=1, save_every=save_every)
    c.train.frozen = ("^vision/",)
    return c


def task(batch_size=8, factory=None):
    return loop.Task(
        model_factory=factory or (lambda: toy.Toy(nnx.Rngs(0))),
        loss_fn=toy.loss_fn,
        train_batches=toy.ToyIterator(batch_size, shard=jax.process_index(), num_shards=jax.process_count()),
        eval_fn=toy.eval_fn,
        eval_batches=lambda: toy.ToyIterator(batch_size, limit=2),
        summarize=lambda s: {"acc": s["acc"] / s["count"]},
    )


def fit(workdir, *, steps=6, hooks=(), **kw):
    c = config(steps=steps, **kw)
    return loop.fit(task(c.train.batch_size), c, workdir, hooks=hooks)
