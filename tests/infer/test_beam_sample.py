"""Sampled beam search (`GenerationConfig(method="beam_sample")`) against a torch transcription of transformers
4.31's `GenerationMixin.beam_sample` with its `BeamSearchScorer` and `BeamHypotheses`, the code the released
NExT-Chat demo runs.

Why a transcription and not the installed HF `generate(do_sample=True, num_beams=W)`: transformers 5.x's sampled
beam search is another algorithm. It warps log p before adding the running beam scores (4.31 warps the sum), starts
beams 2..W at -1e9 (4.31 at 0), counts hypothesis lengths from the prompt's end and ends beams at the token limit
inside the step (4.31 counts its input ids and adds the running beams after the last step), and stops on the best
running score (4.31 on the best drawn one).

Same randomness: `torch.multinomial` is replaced, in the reference only, by the race jaxground runs: the top-2W of
p / E with E ~ Exp(1) drawn in JAX from `fold_in(key, step)` over [B, W·V], the key schedule of
`generate._drawn_candidates`. The stand-in asserts what the real multinomial needs (at least 2W tokens of nonzero
probability per prompt), so the reference stays a run torch could make.

The loop and scorer are `_hf431_reference.py`'s, shared with the released beam search's tests."""

import contextlib
import importlib.util
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxground.infer import generate as gen
from jaxground.infer import sampling

_spec = importlib.util.spec_from_file_location("_hf431_reference", Path(__file__).parent / "_hf431_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

VOCAB, EOS, PAD = 48, 37, 0  # an eos these weights emit mid-sequence
AT, BOXES = 45, 46


@pytest.fixture(scope="module")
def pair():
    return ref.tiny_pair(VOCAB, EOS, PAD)


def prompts(seed=0, lengths=(7, 3, 5, 1)):
    return ref.prompts(seed, lengths, AT)


def warpers(temperature, top_k, top_p):
    """4.31's `_get_logits_warper` for num_beams > 1 (min_tokens_to_keep 2; neutral warpers left out). The three
    classes' `__call__` are the same in 4.31 and in the installed transformers (compared line by line)."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        out.append(TopKLogitsWarper(top_k, min_tokens_to_keep=2))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p, min_tokens_to_keep=2))
    return out


def race(key, monkeypatch, least=1.0):
    """Replaces `torch.multinomial` (without replacement) by the top-k of p / E, E the exponential noise jaxground
    draws at the same step (the i-th call is step i). It asserts that `least` of the k draws have nonzero
    probability (1: all, as the real multinomial needs). -> a list of the steps where fewer than k had."""
    steps, short = itertools.count(), []

    def multinomial(probs, num_samples, replacement=False):
        assert not replacement
        step = next(steps)
        e = np.asarray(jax.random.exponential(jax.random.fold_in(key, step), tuple(probs.shape)))
        nonzero = (probs > 0).sum(-1)
        assert (nonzero >= least * num_samples).all(), "the real multinomial would refuse this draw"
        short.extend([step] if (nonzero < num_samples).any() else [])
        return torch.topk(probs / torch.tensor(e), num_samples).indices

    monkeypatch.setattr(torch, "multinomial", multinomial)
    return short


def run_both(pair, monkeypatch, ids, mask, n, w, temperature, top_k, top_p, seed, length_penalty=1.0):
    hf, llm = pair
    key = jax.random.key(seed)
    cfg = gen.GenerationConfig(max_new_tokens=n, method="beam_sample", num_beams=w, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_id=EOS, pad_id=PAD, length_penalty=length_penalty)
    out = gen.generate_ids(llm, ids, mask, cfg, rng=key)
    race(key, monkeypatch)
    want, done = reference(ref.HFRows(hf, ids, mask, w), len(ids), w, n, warpers(temperature, top_k, top_p),
                           length_penalty=length_penalty)
    return out, want, done


def reference(rows, b, w, n, warp, **kw):
    """4.31's `beam_sample` (`_hf431_reference.reference_431` with its warper)."""
    return ref.reference_431(rows, b, w, n, eos=EOS, pad=PAD, warp=warp, **kw)


def assert_same(out, want, rtol):
    ref.assert_same(out, want, PAD, rtol)


# (temperature, top_k, top_p, seed): the demo's values, no warper, each warper alone and together, hotter and colder
SETTINGS = [(0.8, 5, 0.7, 0), (1.0, 0, 1.0, 1), (1.5, 0, 0.9, 2), (0.7, 3, 1.0, 3), (1.3, 10, 0.95, 4),
            (1.0, 2, 0.5, 5)]
RTOL = 1e-6  # measured: at most 2.8e-7 relative on beam scores up to 625 in magnitude


@pytest.mark.parametrize("temperature, top_k, top_p, seed", SETTINGS)
def test_matches_4_31_beam_sample(pair, monkeypatch, temperature, top_k, top_p, seed):
    """Four left-padded prompts of lengths 7, 3, 5, 1, three beams: HF's tokens (eos included) and beam scores."""
    ids, mask = prompts(seed=seed)
    n = 12
    out, want, _ = run_both(pair, monkeypatch, ids, mask, n, 3, temperature, top_k, top_p, seed)
    assert_same(out, want, RTOL)


def test_eos_early_and_length_penalty(pair, monkeypatch):
    """Answers that end at eos long before the limit, prompts that stop searching before it, and the running beams
    added after the last step (length N + 1), at penalties 1, 0 and 2 with the demo's settings (five beams,
    temperature 0.8, top-k 5, top-p 0.7)."""
    ended, limit, stopped = 0, 0, 0
    for length_penalty, seed in ((1.0, 11), (0.0, 12), (2.0, 14)):
        ids, mask = prompts(seed=seed)
        n = 14
        out, want, done = run_both(pair, monkeypatch, ids, mask, n, 5, 0.8, 5, 0.7, seed, length_penalty)
        assert_same(out, want, RTOL)
        lengths = np.asarray(out.lengths)
        ended += int(((lengths < n) & (np.asarray(out.tokens)[np.arange(len(ids)), lengths - 1] == EOS)).sum())
        limit += int((lengths == n).sum())
        stopped += sum(done)
    assert ended >= 3 and limit >= 1 and stopped >= 1, (ended, limit, stopped)


def test_warping_the_sum_is_what_is_tested(pair, monkeypatch):
    """The tests above tell 4.31's order (warp log p + beam score) from warping log p and then adding the beam
    score: with a temperature other than 1 the other order gives other answers on these prompts (a jaxground that
    warped first would fail `test_matches_4_31_beam_sample`)."""
    hf, _ = pair
    for temperature, top_k, top_p, seed in [(0.8, 5, 0.7, 0), (1.5, 0, 0.9, 2), (0.7, 3, 1.0, 3)]:
        ids, mask = prompts(seed=seed)
        out, want, _ = run_both(pair, monkeypatch, ids, mask, 12, 3, temperature, top_k, top_p, seed)
        race(jax.random.key(seed), monkeypatch)
        other, _ = reference(ref.HFRows(hf, ids, mask, 3), len(ids), 3, 12, warpers(temperature, top_k, top_p),
                             warp_first=True)
        assert_same(out, want, RTOL)
        assert any(a[2] != b[2] for a, b in zip(want, other)), temperature  # measured: 2, 4 and 3 of 4 prompts


def test_overflow_flagged_where_4_31_raises(pair):
    """At temperature 0.2 each step multiplies a beam's warped score by 5 (scores pass 1e38 by the 54th token). With
    an eos these weights seldom emit (token 47), 4.31 (the real `torch.multinomial`, seeded) runs 54 tokens and
    raises at the 55th on the NaN probabilities of a prompt whose scores passed float32's range; jaxground flags no
    prompt at 54 tokens and, at 55, the three that still search (`Generation.overflowed`, which `predict` refuses;
    prompt 1 ended at eos long before). The answers themselves are not compared: once a beam's score is far beyond
    its log-probabilities' resolution, float rounding decides the draws on either side."""
    hf, llm = pair
    ids, mask = prompts(seed=0)
    eos = 47
    for n, overflowed in ((54, [False] * 4), (55, [True, False, True, True])):
        cfg = gen.GenerationConfig(max_new_tokens=n, method="beam_sample", num_beams=3, temperature=0.2, eos_id=eos,
                                   pad_id=PAD)
        out = gen.generate_ids(llm, ids, mask, cfg, rng=jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(out.overflowed), overflowed)
        assert n == 55 or np.abs(np.asarray(out.scores)).max() > 1e38  # 54 tokens: at the edge of the range
        torch.manual_seed(0)
        with contextlib.nullcontext() if n == 54 else pytest.raises(RuntimeError, match="probability tensor contains"):
            ref.reference_431(ref.HFRows(hf, ids, mask, 3), len(ids), 3, n, eos=eos, pad=PAD, warp=warpers(0.2, 0, 1))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="num_beams >= 2"):
        gen.GenerationConfig(method="beam_sample", num_beams=1)
    with pytest.raises(ValueError, match="finite temperature > 0"):
        gen.GenerationConfig(method="beam_sample", num_beams=3, temperature=0.0)
    with pytest.raises(ValueError, match="greedy and sampling"):
        gen.GenerationConfig(method="beam_sample", num_beams=3, trigger_state="predicting")
    gen.GenerationConfig(method="beam_sample", num_beams=2)


def test_min_keep_keeps_two_tokens():
    """HF keeps at least 2 tokens per row when num_beams > 1 (min_tokens_to_keep), through top-k 1 and a tiny top-p."""
    logits = jnp.log(jnp.array([[0.9, 0.06, 0.03, 0.01]]))
    for top_k, top_p in ((1, 1.0), (0, 1e-3), (1, 1e-3)):
        kept = np.isfinite(np.asarray(sampling.sampling_logits(logits, 1.0, top_k, top_p, min_keep=2)))
        np.testing.assert_array_equal(kept, [[True, True, False, False]])


def test_triggers_as_in_beam_search(pair, monkeypatch):
    """<at> -> box -> <boxes> in sampled beam search: every <at> is followed by a forced <boxes> fed as G(F(t)); the
    answer's boxes are its own <at>s' (kept through reordering and the finished set) and match the reference's
    run with the same forcing (atol 1e-5); the recorded states decode to the recorded boxes.

    A forced row leaves one token of nonzero probability, so a prompt whose beams are mostly forced has fewer than
    2W to draw (the demo, which does not force, never has; 4.31's multinomial would refuse). Both sides then draw
    them all, and the rest are -inf fillers that rank last and are never kept: each row still offers a token other
    than eos (the forced <boxes>, or one of the two kept), so W running beams come before any filler."""
    llm, enc, dec = ref.with_triggers(pair[1], AT)
    ids, mask = prompts(seed=21)
    n, w, seed = 10, 3, 21
    cfg = gen.GenerationConfig(max_new_tokens=n, method="beam_sample", num_beams=w, temperature=0.8, top_k=5,
                               top_p=0.7, eos_id=EOS, pad_id=PAD, at_id=AT, boxes_id=BOXES, max_triggers=8)
    key = jax.random.key(seed)
    out = gen.generate_jit(llm, jnp.asarray(llm.embed_tokens(jnp.asarray(ids))), jnp.asarray(mask),
                           jnp.asarray(ids[:, -1]), (enc, dec), key, cfg)
    short = race(key, monkeypatch, least=0.5)
    want, _ = reference(ref.TriggerRows(llm, enc, dec, ids, mask, w, n, AT, BOXES), len(ids), w, n,
                        warpers(0.8, 5, 0.7))
    assert short  # some step drew fewer than 2W tokens of nonzero probability
    assert ref.assert_triggers(out, want, dec, AT, BOXES, PAD) >= 2  # the answers hold <at>s
    np.testing.assert_allclose(np.asarray(out.scores), [s for _, s, _ in want], rtol=RTOL)
