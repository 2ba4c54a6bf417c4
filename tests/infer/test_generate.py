"""Generation: greedy and beam tokens identical to HF `generate` on the same weights (left-padded prompts of
different lengths), sampling limits, and pixel2emb decoding (one box per <at>, G(F(t)) fed back)."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxground.infer import generate as gen
from jaxground.infer import sampling
from jaxground.models.locator import BoxDecoder, BoxEncoder

_spec = importlib.util.spec_from_file_location("_hf431_reference", Path(__file__).parent / "_hf431_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)  # the tiny model and prompts shared by the generation tests

VOCAB, EOS, PAD = 48, 37, 0  # an eos these weights emit mid-sequence


@pytest.fixture(scope="module")
def pair():
    return ref.tiny_pair(VOCAB, EOS, PAD)


def prompts(seed=0, lengths=(7, 3, 5, 1)):
    return ref.prompts(seed, lengths, VOCAB)


def hf_generate(hf, ids, mask, n, **kw):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=PAD, **kw)
    return out[:, ids.shape[1]:].numpy()


def strip(row, eos):
    row = list(row)
    return row[: row.index(eos) + 1] if eos in row else row


def test_greedy_matches_hf(pair):
    hf, llm = pair
    ids, mask = prompts()
    n = 12
    want = hf_generate(hf, ids, mask, n, eos_token_id=EOS)
    out = gen.generate_ids(llm, ids, mask, gen.GenerationConfig(max_new_tokens=n, eos_id=EOS, pad_id=PAD))
    got = np.asarray(out.tokens)
    for i in range(len(ids)):
        assert strip(got[i], EOS) == strip(want[i], EOS), i
        assert out.lengths[i] == len(strip(want[i], EOS))
        assert (got[i, int(out.lengths[i]):] == PAD).all()
    # both paths run: some row stops early at eos, another runs to the limit
    assert min(out.lengths) < n and max(out.lengths) == n


def test_loop_head_is_the_lm_head(pair):
    # the decoding loop's head for 2-63 rows on CPU multiplies by a [V,D] copy of the kernel (README, Evaluation
    # and prediction): same logits; one row or 64 keep `llm.head`; the tests above run it (4 rows, 2 x 3 beams)
    _, llm = pair
    h = jax.random.normal(jax.random.key(0), (16, 32))
    head = jax.jit(lambda h: gen._loop_head(llm, h.shape[0])(h))
    assert jax.default_backend() != "cpu" or gen._loop_head(llm, 16) != llm.head
    np.testing.assert_allclose(np.asarray(head(h)), np.asarray(llm.head(h)), rtol=1e-5, atol=1e-5)
    assert gen._loop_head(llm, 1) == llm.head and gen._loop_head(llm, 64) == llm.head


def test_beam_matches_hf_without_eos(pair):
    hf, llm = pair
    ids, mask = prompts(seed=3, lengths=(4, 6))
    n = 6
    want = hf_generate(hf, ids, mask, n, num_beams=3, eos_token_id=None, length_penalty=1.0, early_stopping=False)
    cfg = gen.GenerationConfig(max_new_tokens=n, method="beam", num_beams=3, eos_id=-1, pad_id=PAD)
    got = np.asarray(gen.generate_ids(llm, ids, mask, cfg).tokens)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_matches_hf_with_eos(pair, length_penalty):
    """Beams end at different steps: HF's finished set, its length-normalised ranking and its stopping rule
    (at penalties 1 and 2 these prompts are ones where ranking the final beams alone, as this module once did,
    picks another answer; at 0 both agree with HF)."""
    hf, llm = pair
    n = 14
    cfg = gen.GenerationConfig(max_new_tokens=n, method="beam", num_beams=3, eos_id=EOS, pad_id=PAD,
                               length_penalty=length_penalty)
    shortest = n
    for seed in (5, 6):
        ids, mask = prompts(seed=seed)
        want = hf_generate(hf, ids, mask, n, num_beams=3, eos_token_id=EOS, length_penalty=length_penalty,
                           early_stopping=False)
        out = gen.generate_ids(llm, ids, mask, cfg)
        got = np.asarray(out.tokens)
        for i in range(len(ids)):
            assert strip(got[i], EOS) == strip(want[i], EOS), (seed, i, got[i], want[i])
            assert out.lengths[i] == len(strip(want[i], EOS))
            assert (got[i, int(out.lengths[i]):] == PAD).all()
        shortest = min(shortest, int(min(out.lengths)))
    if length_penalty <= 1.0:
        assert shortest < n  # some answer ends at eos before the limit


def test_tiny_top_p_sampling_is_greedy(pair):
    _, llm = pair
    ids, mask = prompts()
    greedy = gen.generate_ids(llm, ids, mask, gen.GenerationConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD))
    nucleus = gen.generate_ids(llm, ids, mask, gen.GenerationConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD,
                                                                    method="sample", top_p=1e-6), rng=jax.random.key(3))
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)


def test_top_p_filter_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])


def hf_warp(hf, logits, temperature, top_k, top_p):
    """HF `generate`'s sampling warpers as it builds them for these settings (its order, neutral ones left out)."""
    from transformers import GenerationConfig as HFGenerationConfig

    warpers = hf._get_logits_processor(HFGenerationConfig(do_sample=True, temperature=temperature, top_k=top_k,
                                                          top_p=top_p), input_ids_seq_length=1)
    with torch.no_grad():
        return warpers(None, torch.tensor(logits)).numpy()


# (temperature, top_k, top_p): the demo's (see README), each warper alone and with others; no top_p whose 1 - top_p
# a sum of tied probabilities hits exactly (there round-off decides, and torch's CPU cumsum adds in float64)
WARPS = [(0.75, 5, 0.7), (0.8, 5, 0.7), (1.0, 0, 0.9), (0.5, 3, 1.0), (1.7, 0, 1.0), (1.3, 40, 0.95), (0.7, 1, 0.537)]


@pytest.mark.parametrize("temperature, top_k, top_p", WARPS)
def test_sampling_logits_match_hf_warpers(pair, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, as HF warps logits before sampling: on continuous logits and on logits
    with many ties (all tokens tied with the k-th stay, as in HF) the same tokens stay, with the same values to
    float32 round-off; only which of the tokens tied at the nucleus edge stay may differ (HF's torch sort orders
    ties arbitrarily), not how many."""
    hf, _ = pair
    rng = np.random.default_rng(top_k)
    smooth = rng.normal(0, 3, (64, 300)).astype(np.float32)
    tied = (rng.integers(-6, 7, (64, 300)) / 2).astype(np.float32)
    warp = jax.jit(sampling.sampling_logits, static_argnums=(1, 2, 3))
    for logits in (smooth, tied):
        want = hf_warp(hf, logits, temperature, top_k, top_p)
        got = np.asarray(warp(logits, temperature, top_k, top_p))
        if logits is smooth or top_p == 1.0:
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        np.testing.assert_allclose(np.sort(got, -1), np.sort(want, -1), rtol=1e-6)
    if top_k and top_p == 1.0:  # the tied logits did tie at the k-th
        assert (np.isfinite(got).sum(-1) > top_k).all()


def test_top_k_one_sampling_is_greedy(pair):
    _, llm = pair
    ids, mask = prompts()
    greedy = gen.generate_ids(llm, ids, mask, gen.GenerationConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD))
    cfg = gen.GenerationConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD, method="sample", temperature=1.5, top_k=1)
    np.testing.assert_array_equal(gen.generate_ids(llm, ids, mask, cfg, rng=jax.random.key(5)).tokens, greedy.tokens)


@pytest.mark.parametrize("kw, message", [
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(method="sample", temperature=0.0), "finite temperature > 0"),
    (dict(method="sample", temperature=float("inf")), "finite temperature > 0"),
    (dict(method="sample", top_p=0.0), "0 < top_p <= 1"),
    (dict(method="sample", top_p=1.5), "0 < top_p <= 1"),
])
def test_bad_sampling_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        gen.GenerationConfig(**kw)


def test_prompt_too_long_is_refused_before_compute(pair):
    _, llm = pair
    with pytest.raises(ValueError, match="exceeds the model's context"):
        gen.generate_ids(llm, np.ones((1, 60), np.int32), np.ones((1, 60), bool), gen.GenerationConfig(max_new_tokens=8))


AT, BOXES = 45, 46


def reference_pixel2emb(llm, enc, dec, ids, mask, n, predicting=False):
    """Greedy without a cache: the whole (fixed-size) sequence re-run each step by one jitted forward; after a
    fed <at>, the next token is <boxes> with embedding G(F(t)). -> tokens [B,n], boxes per row: F of the state
    at each <at>, or with `predicting` F of the state that chose it (the released generate())."""
    b, t = ids.shape
    forward = nnx.jit(lambda m, e, k: m.forward_embeds(e, k)[:2])
    table = np.asarray(llm.embed_tokens.embedding[...])
    embeds = np.concatenate([table[ids], np.zeros((b, n, table.shape[1]), np.float32)], axis=1)  # host copy
    valid = np.concatenate([mask, np.zeros((b, n), bool)], axis=1)
    tokens, boxes, fed = np.zeros((b, n), np.int64), [[] for _ in range(b)], ids[:, -1].copy()
    for i in range(n):
        hidden, logits = forward(llm, jnp.asarray(embeds), jnp.asarray(valid))
        h, lg = hidden[:, t + i - 1], np.asarray(logits[:, t + i - 1])
        box = np.asarray(dec(h))
        rows = np.asarray(enc(jnp.asarray(box)))  # G(F(t)) of every row; used where <at> was fed
        for r in range(b):
            if fed[r] == AT:
                boxes[r] += [] if predicting else [box[r]]
                tokens[r, i] = BOXES
                embeds[r, t + i] = rows[r]
            else:
                tokens[r, i] = int(np.argmax(lg[r]))
                embeds[r, t + i] = table[tokens[r, i]]
                boxes[r] += [box[r]] if predicting and tokens[r, i] == AT else []
        valid[:, t + i] = True
        fed = tokens[:, i]
    return tokens, boxes


def with_triggers(pair):
    """A copy of the pair's model (the shared one stays untouched) where <at> wins wherever token 35 would, and a
    box encoder G and decoder F of large random weights."""
    llm = nnx.clone(pair[1])
    kernel = llm.lm_head.kernel
    kernel.set_value(kernel.get_value().at[:, AT].set(kernel.get_value()[:, 35] * 1.05))
    # one compiled initialisation instead of one eager compile per initialiser and shape
    enc, dec = nnx.jit(lambda: (BoxEncoder(32, rngs=nnx.Rngs(0), init_std=0.3),
                                BoxDecoder(32, rngs=nnx.Rngs(1), init_std=0.3)))()
    return llm, enc, dec


def test_pixel2emb_one_box_per_at_and_g_of_f_fed_back(pair):
    llm, enc, dec = with_triggers(pair)
    ids, mask = prompts(seed=0, lengths=(7, 3, 5, 1))
    n = 12
    cfg = gen.GenerationConfig(max_new_tokens=n, eos_id=-1, at_id=AT, boxes_id=BOXES, max_triggers=4)
    out = gen.generate_jit(llm, jnp.asarray(llm.embed_tokens(jnp.asarray(ids))), jnp.asarray(mask),
                           jnp.asarray(ids[:, -1]), (enc, dec), jax.random.key(0), cfg)
    tokens = np.asarray(out.tokens)
    assert (tokens == AT).sum() >= 2, tokens
    want_tokens, want_boxes = reference_pixel2emb(llm, enc, dec, ids, mask, n)
    for i in range(len(ids)):
        at_pos = np.flatnonzero(tokens[i] == AT)
        at_pos = at_pos[at_pos < n - 1]  # an <at> on the last step has no successor to decode into
        assert (tokens[i, at_pos + 1] == BOXES).all()
        assert int(out.num_triggers[i]) == min(len(at_pos), cfg.max_triggers), tokens
        assert tokens[i].tolist() == want_tokens[i].tolist()
        k = int(out.num_triggers[i])
        if want_boxes[i]:
            np.testing.assert_allclose(np.asarray(out.boxes[i, :k]), np.stack(want_boxes[i])[:k], atol=1e-5)
        # the recorded trigger states decode to the recorded boxes
        np.testing.assert_allclose(np.asarray(dec(out.trigger_states[i, :k])), np.asarray(out.boxes[i, :k]), atol=1e-6)


def test_predicting_trigger_state_is_the_state_that_chose_at(pair):
    """trigger_state="predicting" (the released generate()): the same tokens and G(F(t)) feeding, but each
    trigger's box and state come from the token before <at>, also for an <at> on the last step."""
    llm, enc, dec = with_triggers(pair)
    ids, mask = prompts(seed=0, lengths=(7, 3, 5, 1))
    n = 12
    out = {}
    for mode in gen.TRIGGER_STATES:
        cfg = gen.GenerationConfig(max_new_tokens=n, eos_id=-1, at_id=AT, boxes_id=BOXES, max_triggers=6,
                                   trigger_state=mode)
        out[mode] = gen.generate_jit(llm, jnp.asarray(llm.embed_tokens(jnp.asarray(ids))), jnp.asarray(mask),
                                     jnp.asarray(ids[:, -1]), (enc, dec), jax.random.key(0), cfg)
    np.testing.assert_array_equal(out["predicting"].tokens, out["at"].tokens)
    want_tokens, want_boxes = reference_pixel2emb(llm, enc, dec, ids, mask, n, predicting=True)
    got = out["predicting"]
    assert (np.asarray(got.tokens) == want_tokens).all()
    for i in range(len(ids)):
        k = int(got.num_triggers[i])
        assert k == min(len(want_boxes[i]), 6) and k == int((np.asarray(got.tokens[i]) == AT).sum())
        if k:
            np.testing.assert_allclose(np.asarray(got.boxes[i, :k]), np.stack(want_boxes[i])[:k], atol=1e-5)
            assert not np.allclose(np.asarray(got.boxes[i, :k]), np.asarray(out["at"].boxes[i, :k]), atol=1e-3)
        np.testing.assert_allclose(np.asarray(dec(got.trigger_states[i, :k])), np.asarray(got.boxes[i, :k]), atol=1e-6)
    with pytest.raises(ValueError, match="greedy and sampling"):
        gen.GenerationConfig(method="beam", num_beams=2, trigger_state="predicting")


@pytest.mark.parametrize("n", [5, 6, 12])
def test_one_beam_with_boxes_is_greedy(pair, n):
    """The finished set carries each hypothesis' boxes and trigger states: one beam gives greedy's answer, also
    when the forced <boxes> is the last allowed token (n=5: an <at> at step 3, its <boxes> at step 4)."""
    llm, enc, dec = with_triggers(pair)
    ids, mask = prompts(seed=0, lengths=(7, 3, 5, 1))
    kw = dict(max_new_tokens=n, eos_id=EOS, at_id=AT, boxes_id=BOXES, max_triggers=4, pad_id=PAD)
    args = (llm, jnp.asarray(llm.embed_tokens(jnp.asarray(ids))), jnp.asarray(mask), jnp.asarray(ids[:, -1]),
            (enc, dec), jax.random.key(0))
    greedy = gen.generate_jit(*args, gen.GenerationConfig(**kw))
    beam = gen.generate_jit(*args, gen.GenerationConfig(method="beam", num_beams=1, **kw))
    assert int(greedy.num_triggers.sum()) >= (1 if n < 12 else 2)
    if n == 5:  # the case the test is for: a row whose last token is a forced <boxes>
        assert np.any(np.asarray(greedy.tokens)[:, -1] == BOXES)
    for field in ("tokens", "lengths", "num_triggers"):
        np.testing.assert_array_equal(getattr(beam, field), getattr(greedy, field), err_msg=field)
    for field in ("scores", "boxes", "trigger_states"):
        np.testing.assert_allclose(getattr(beam, field), getattr(greedy, field), atol=1e-5, err_msg=field)
