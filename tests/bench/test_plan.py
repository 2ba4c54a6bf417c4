"""`jaxground bench plan` on a tiny NExT-Chat: the real train step compiles ahead of time from abstract inputs on
a 2-device FSDP mesh, and the memory and FLOP figures are consistent with the model's size."""

from pathlib import Path

import jax
import pytest

from jaxground.bench import plan
from jaxground.bench._common import param_count, step_flops
from jaxground.config import load_config_file

CONFIGS = Path(__file__).parents[2] / "configs"


def tiny_config():
    c = load_config_file(CONFIGS / "tiny_shapes.py")
    c.model.llm.update(num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=2)
    c.model.vision.update(image_size=32, num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2)
    c.model.freeze_vision = True
    c.train.frozen = ("^vision/",)
    c.data.max_len = 24
    return c


def test_plan_tiny_compiles_and_reports_sharded_memory():
    c = tiny_config()
    f = plan.plan_step(c, {"data": 1, "fsdp": 2, "tensor": 1})
    assert f["devices"] == 2 and f["batch"] == 2 and f["seq"] == 24
    unsharded = 4 * f["params_total"]  # float32 master weights
    # FSDP halves every parameter whose embed dimension divides (all the big ones); nothing is replicated twice
    assert unsharded / 2 <= f["param_bytes"] < 0.6 * unsharded
    # AdamW keeps two float32 moments of the trained subset only (the frozen tower has none), plus a counter
    trained = 4 * f["params_trainable"]
    assert f["params_trainable"] < f["params_total"]
    assert trained <= f["opt_bytes"] < 1.2 * trained
    assert f["argument_bytes"] >= f["param_bytes"] + f["opt_bytes"]
    assert f["temp_bytes"] > 0 and f["flops"] > 0
    assert plan.peak_bytes(f) >= f["argument_bytes"]


def test_step_flops_counts_llm_as_six_n_t_when_trained():
    from flax import nnx

    from jaxground.models.nextchat import NextChat

    cfg = plan.model_config(tiny_config())
    state = nnx.state(nnx.eval_shape(lambda: NextChat(cfg, rngs=nnx.Rngs(0))))
    trained = step_flops(cfg, state, 2, 24, llm_trained=True)
    frozen = step_flops(cfg, state, 2, 24, llm_trained=False)
    llm = cfg.llm
    llm_fwd = 2 * 24 * (param_count(state["llm"]) - llm.vocab_size * llm.hidden_size) + llm.num_layers * 4 * 24**2 * 64
    proj_fwd = 2 * param_count(state["projector"]) * cfg.vision.num_patches
    assert trained - frozen == pytest.approx(2 * 2 * (llm_fwd + proj_fwd))


@pytest.mark.parametrize("text", ["fsdp=0", "fsdp=8,pipeline=2", "fsdp8", ""])
def test_bad_mesh_is_refused(text):
    with pytest.raises(ValueError, match="--mesh"):
        plan.parse_mesh(text)


def test_mesh_larger_than_devices_is_refused_before_compiling():
    with pytest.raises(ValueError, match="needs 64 devices"):
        plan.plan_step(tiny_config(), {"data": 1, "fsdp": 64, "tensor": 1}, devices=jax.devices()[:8])
