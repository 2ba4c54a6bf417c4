"""SAM's ViT attention under tensor parallelism: a shard holds whole heads of q, k and v, so the compiled
training step gathers parameters only, never the activations (the fused [D, 3D] qkv kernel made XLA all-gather the
qkv output and its gradient)."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxground.models.sam import SamConfig
from jaxground.models.sam.image_encoder import Block
from jaxground.parallel import RULES, make_mesh

GRID = 6  # img_size 96 / patch 16; no parameter of a block has a 6 or 72/144 (the token counts) in its shape


@pytest.mark.parametrize("window, activation_dims", [
    (0, {GRID, GRID * GRID * 2, GRID * GRID * 4}),
    (4, {GRID, 8}),  # 4 x 4 windows: the map padded to 8 x 8, 8 windows on each fsdp shard
])
def test_vit_block_gathers_no_activations_over_tensor(window, activation_dims):
    cfg = SamConfig.tiny(img_size=96, width=64, num_heads=4)
    mesh = make_mesh((1, 2, 2), devices=jax.devices()[:4])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        block = Block(cfg, window, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(block)
        state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
        assert state["attn"]["qkv"]["kernel"].sharding.spec == jax.P("fsdp", None, "tensor")
        x = jax.device_put(jnp.ones((4, GRID, GRID, 64)), jax.NamedSharding(mesh, jax.P("fsdp")))
        loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2)
        hlo = jax.jit(jax.grad(loss)).lower(state, x).compile().as_text()
    gathered = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", hlo)
    assert gathered, "expected the fsdp parameter gathers"
    dims = [set(map(int, s.split(","))) if s else set() for s in gathered]
    assert not [s for s, d in zip(gathered, dims) if d & activation_dims], gathered
