"""Train state: the whole NNX model state, an optax state over its trainable subset, and the step counter.

Which parameters train is a pair of regex lists over variable paths ("llm/layers/attn/wq/kernel"): a
parameter trains when some `trainable` pattern matches and no `frozen` pattern does (stages 1-2: all but the
vision tower; stage 3: the mask head). The optimizer state covers only the trainable subset, so frozen
parameters cost no optimizer memory and are passed through the step untouched (bit-identical).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32[]
    model: nnx.State  # every variable of the model (float32 master weights)
    opt: optax.OptState  # over the trainable subset of `model`


def path_string(path: Sequence) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


class PathFilter:
    """nnx filter: a Param whose path matches one of `trainable` and none of `frozen` (re.search)."""

    def __init__(self, trainable: Sequence[str], frozen: Sequence[str] = ()):
        self.trainable = [re.compile(p) for p in trainable]
        self.frozen = [re.compile(p) for p in frozen]

    def __call__(self, path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        s = path_string(path)
        return any(p.search(s) for p in self.trainable) and not any(p.search(s) for p in self.frozen)

    def __repr__(self):
        return f"PathFilter({[p.pattern for p in self.trainable]}, frozen={[p.pattern for p in self.frozen]})"


def split_trainable(model_state: nnx.State, trainable: PathFilter) -> tuple[nnx.State, nnx.State]:
    """(trainable params, everything else)."""
    return nnx.split_state(model_state, trainable, ...)


def trainable_paths(model_state: nnx.State, trainable: PathFilter) -> list[str]:
    params, _ = split_trainable(model_state, trainable)
    return sorted(path_string(p) for p, _ in nnx.to_flat_state(params))


def make_schedule(optim, steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` of `steps`, then cosine decay to `min_lr_ratio * lr`."""
    warmup = round(optim.warmup_ratio * steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, warmup, max(steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio
    )


NO_DECAY = ("bias", "scale")  # HF Trainer leaves biases and norm weights undecayed
DECAYS = ("hf", "all")  # optim.decay: HF Trainer's decay mask, or every trainable array


def decay_mask(params):
    """True for the arrays weight decay reaches under `optim.decay="hf"`: all but biases and norm scales."""
    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] not in NO_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim, steps: int) -> optax.GradientTransformation:
    """AdamW on `make_schedule`, after clipping the global gradient norm to `clip_norm` (0 = no clipping); weight
    decay on `decay_mask`'s arrays (`optim.decay="hf"`, the default) or on every trainable array ("all")."""
    decay = optim.get("decay", "hf")
    if decay not in DECAYS:
        raise ValueError(f'optim.decay must be "hf" or "all", got {decay!r}')
    chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    chain.append(
        optax.adamw(
            make_schedule(optim, steps), b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
            mask=decay_mask if decay == "hf" else None,
        )
    )
    return optax.chain(*chain)


def init_state(model_state: nnx.State, tx: optax.GradientTransformation, trainable: PathFilter) -> TrainState:
    params, _ = split_trainable(model_state, trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), model=model_state, opt=tx.init(params))


def plan(model_factory, tx: optax.GradientTransformation, trainable: PathFilter, mesh):
    """(graphdef, abstract TrainState, its shardings) without allocating anything; a mesh that leaves much of
    the state unsharded (`parallel.check_fit`) is refused."""
    from jaxground.parallel import RULES, check_fit, state_shardings

    # with a mesh in context NNX resolves the logical names while building; it needs the rules for that
    with nnx.logical_axis_rules(RULES):
        graphdef, abstract_model = nnx.split(nnx.eval_shape(model_factory))
        abstract = jax.eval_shape(lambda s: init_state(s, tx, trainable), abstract_model)
        check_fit(abstract, mesh)
        return graphdef, abstract, state_shardings(abstract, mesh)


def create_sharded(
    model_factory, tx: optax.GradientTransformation, trainable: PathFilter, mesh
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Builds the model and its optimizer state directly in their shardings (no host holds the whole model):
    returns (graphdef, state, state shardings)."""
    from jaxground.parallel import RULES

    graphdef, _, shardings = plan(model_factory, tx, trainable, mesh)

    def build():
        return init_state(nnx.state(model_factory()), tx, trainable)

    with nnx.logical_axis_rules(RULES):
        return graphdef, jax.jit(build, out_shardings=shardings)(), shardings
