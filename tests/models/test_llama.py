"""LLaMA parity against HF `LlamaForCausalLM` (float32, random weights), scan/remat, KV cache, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from jaxground import parallel
from jaxground.convert.llama import build
from jaxground.models.llama import Llama, LlamaConfig, rope_tables

TOL = 1e-4
HF_CONFIGS = {
    # grouped kv heads, odd vocabulary, rope theta != 10000
    "gqa": {
        "vocab_size": 101,
        "hidden_size": 32,
        "intermediate_size": 56,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
    },
    # plain multi-head, tied embeddings, explicit head_dim != hidden / heads
    "mha_tied": {
        "vocab_size": 64,
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "num_key_value_heads": 3,
        "head_dim": 10,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    },
}


def hf_model(name: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(HFLlamaConfig(attn_implementation="eager", **HF_CONFIGS[name])).eval()
    with torch.no_grad():  # norms away from 1 and larger weights, so that a wrong mapping shows
        for key, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in key else 0.15 * torch.randn_like(p))
    return model


def padded_batch(vocab: int, seed: int = 1, b: int = 3, t: int = 9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    mask[1, :3] = False  # left padding
    mask[2:, :1] = False
    ids[~mask] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.numpy()


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def pair(request):
    hf = hf_model(request.param)
    return request.param, hf, build(hf.state_dict(), hf.config)


def test_logits_match_hf(pair):
    _, hf, model = pair
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 7)).astype(np.int32)
    ref = hf_logits(hf, ids, np.ones_like(ids, bool))
    got = np.asarray(model(jnp.asarray(ids)))
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("scan", [False, True])
def test_left_padded_batch_matches_hf(pair, scan):
    _name, hf, model = pair
    if scan:
        model = build(hf.state_dict(), hf.config, scan_layers=True)
        assert model.layers.q.kernel.shape[0] == hf.config.num_hidden_layers
    ids, mask = padded_batch(hf.config.vocab_size)
    ref = hf_logits(hf, ids, mask)
    got = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(got - ref)[mask].max() <= TOL


def test_kv_cache_decoding_equals_full_forward():
    hf = hf_model("gqa")  # one config: the cache path is config-independent and compiling is the cost
    model = build(hf.state_dict(), hf.config)
    vocab = model.cfg.vocab_size
    ids, mask = padded_batch(vocab, b=2, t=13)
    prompt, steps = 5, 8
    full_hidden, full_logits, _ = model.forward_embeds(model.embed(jnp.asarray(ids)), jnp.asarray(mask))

    @jax.jit
    def run(m, embeds, emask, cache):
        return m.forward_embeds(embeds, emask, cache=cache)

    cache = model.init_cache(batch=2, max_len=16)
    _, logits, cache = run(
        model, model.embed(jnp.asarray(ids[:, :prompt])), jnp.asarray(mask[:, :prompt]), cache
    )
    got = [logits]
    for i in range(prompt, prompt + steps):
        hidden, logits, cache = run(
            model, model.embed(jnp.asarray(ids[:, i : i + 1])), jnp.asarray(mask[:, i : i + 1]), cache
        )
        got.append(logits)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    assert int(cache.index) == prompt + steps
    assert np.abs(got - np.asarray(full_logits))[mask].max() <= TOL
    assert np.abs(np.asarray(hidden[:, 0]) - np.asarray(full_hidden[:, -1])).max() <= TOL


TINY = LlamaConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    num_heads=4,
    num_kv_heads=1,
    max_position=32,
)


def _value_and_grad(model: Llama, ids, mask):
    graphdef, state = nnx.split(model)

    def loss(st):
        return jnp.mean(nnx.merge(graphdef, st)(ids, mask)[mask] ** 2)

    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.fixture(scope="module")
def unscanned():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    model.norm.scale.set_value(model.norm.scale[...] + 0.1)
    ids, mask = (jnp.asarray(a) for a in padded_batch(TINY.vocab_size, t=6))
    return model, ids, mask, _value_and_grad(model, ids, mask)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_scan_and_remat_match_unscanned_forward_and_grad(unscanned, remat):
    model, ids, mask, (l0, g0) = unscanned
    scanned = Llama(dataclasses.replace(TINY, scan_layers=True, remat=remat), rngs=nnx.Rngs(99))
    for name in ("embed_tokens", "lm_head", "norm"):
        nnx.update(getattr(scanned, name), nnx.state(getattr(model, name)))
    nnx.update(scanned.layers, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in model.layers]))
    l1, g1 = _value_and_grad(scanned, ids, mask)
    assert abs(float(l0) - float(l1)) <= 1e-5
    g0_q = jnp.stack([g0["layers"][i]["q"]["kernel"][...] for i in range(TINY.num_layers)])
    assert np.abs(np.asarray(g0_q) - np.asarray(g1["layers"]["q"]["kernel"][...])).max() <= 1e-5
    assert float(jnp.abs(g0_q).max()) > 0


def test_sharded_forward_on_a_mesh_equals_unsharded(unscanned):
    model, ids, mask, _ = unscanned
    ids, mask = (
        jnp.concatenate([ids, ids[:1]]),
        jnp.concatenate([mask, mask[:1]]),
    )  # batch 4 splits over fsdp=4
    mesh = parallel.make_mesh((1, 4, 2))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, parallel.state_shardings(state, mesh))
    assert tuple(state["layers"][0]["q"]["kernel"][...].sharding.spec) == ("fsdp", "tensor")
    with jax.set_mesh(mesh):
        forward = jax.jit(lambda st, i, a: nnx.merge(graphdef, st)(i, a))
        assert "sharding_constraint" in forward.lower(state, ids, mask).as_text()
        got = forward(state, jax.device_put(ids, parallel.batch_sharding(mesh, 2)), mask)
    assert np.abs(np.asarray(got) - np.asarray(model(ids, mask)))[np.asarray(mask)].max() <= 1e-5


def test_bad_input_is_refused_before_compute():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\).*max 50"):
        model(jnp.array([[1, 50]], jnp.int32))
    with pytest.raises(ValueError, match="min -1"):
        model(jnp.array([[-1, 2]], jnp.int32))
    with pytest.raises(ValueError, match="exceeds max_position 32"):
        model(jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 4\)"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), bool))
    cache = model.init_cache(1, 4)
    with pytest.raises(ValueError, match="5 tokens do not fit a cache of 4 slots"):
        model.forward_embeds(jnp.zeros((1, 5, 32)), cache=cache)
    _, _, cache = model.forward_embeds(jnp.zeros((1, 3, 32)), cache=cache)
    with pytest.raises(ValueError, match=r"cache full: 3 \+ 2 tokens > 4 slots"):
        model.forward_embeds(jnp.zeros((1, 2, 32)), cache=cache)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        LlamaConfig(remat="some")


def test_rope_tables_looked_up_equal_computed_per_token():
    """cos and sin computed once for positions 0..rows-1 and looked up equal those computed per token."""
    positions = jnp.array([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]], jnp.int32)
    per_token = rope_tables(positions, 16, 500.0)
    looked_up = rope_tables(positions, 16, 500.0, rows=6)
    for a, b in zip(per_token, looked_up):
        assert a.shape == b.shape == (2, 6, 16)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
