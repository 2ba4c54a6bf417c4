"""The train step and the eval step: pure functions of (state, batch), jitted once on a mesh.

Generic over the model and the task: `loss_fn(model, batch) -> (total, parts)` and
`eval_fn(model, batch) -> sums` take the merged NNX module and a dict of global arrays (axis 0 = batch B).
Gradient accumulation scans over `micro_steps` slices of the batch: row r goes to micro-step r % M, so each
device's rows stay on that device. Loss and gradient are the mean over the M micro-batches of each one's loss,
as HF Trainer's accumulation in the released code: for losses that are means over a varying count (tokens,
boxes) that is not the full-batch mean unless every micro-batch counts the same.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxground.train.state import PathFilter, TrainState, split_trainable

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict[str, jax.Array]]]
EvalFn = Callable[[nnx.Module, dict], dict[str, jax.Array]]


def _micro_batches(batch: dict, micro_steps: int) -> dict:
    """[B, ...] -> [M, B/M, ...] with micro-step i = rows i, M + i, 2M + i, ..."""

    def split(x):
        x = x.reshape(x.shape[0] // micro_steps, micro_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    trainable: PathFilter,
    *,
    micro_steps: int = 1,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns step(state, batch) -> (state, metrics); metrics are the loss parts averaged over micro-steps,
    `loss`, and `grad_norm` (before clipping)."""

    def step(state: TrainState, batch: dict):
        params, frozen = split_trainable(state.model, trainable)

        def compute(p, mb):
            return loss_fn(nnx.merge(graphdef, p, frozen), mb)

        grad_fn = jax.value_and_grad(compute, has_aux=True)
        if micro_steps == 1:
            (loss, parts), grads = grad_fn(params, batch)
        else:
            micro = _micro_batches(batch, micro_steps)

            def body(acc, mb):
                out = grad_fn(params, mb)
                return jax.tree.map(jnp.add, acc, out), None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first))
            total, _ = jax.lax.scan(body, zeros, micro)
            (loss, parts), grads = jax.tree.map(lambda x: x / micro_steps, total)
        updates, opt = tx.update(grads, state.opt, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(parts, loss=loss, grad_norm=optax.tree.norm(grads))
        return TrainState(step=state.step + 1, model=nnx.merge_state(params, frozen), opt=opt), metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, eval_fn: EvalFn) -> Callable[[nnx.State, dict], dict]:
    def step(model_state: nnx.State, batch: dict) -> dict:
        return eval_fn(nnx.merge(graphdef, model_state), batch)

    return step


def jit_train_step(step, state_shardings, mesh: Mesh):
    """jit with the state placed by `state_shardings` (donated, updated in place) and metrics replicated;
    the batch keeps the sharding it arrives with (`parallel.global_batch`)."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_shardings, None), out_shardings=(state_shardings, replicated),
                   donate_argnums=0)


def jit_flat_train_step(step, state_shardings, mesh: Mesh, treedef):
    """`jit_train_step` over the state's leaves: (leaves, batch) -> (leaves, metrics). Flattening and rebuilding
    NNX states is Python work on every call (~2 ms for the tiny model's ~300 arrays, ~8 ms in its stage 3, in
    series with the step), so the loop carries the flat list and rebuilds the state only when it needs one."""

    def flat(leaves, batch):
        state, metrics = step(jax.tree.unflatten(treedef, leaves), batch)
        return jax.tree.leaves(state), metrics

    return jit_train_step(flat, treedef.flatten_up_to(state_shardings), mesh)


def jit_eval_step(step, model_shardings, mesh: Mesh):
    return jax.jit(step, in_shardings=(model_shardings, None), out_shardings=NamedSharding(mesh, P()))
