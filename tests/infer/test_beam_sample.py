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
`generate._beam_sample_body`. The stand-in asserts what the real multinomial needs (at least 2W tokens of nonzero
probability per prompt), so the reference stays a run torch could make."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxground.convert.llama import build
from jaxground.infer import generate as gen
from jaxground.models.locator import BoxDecoder, BoxEncoder

VOCAB, EOS, PAD = 48, 37, 0  # an eos these weights emit mid-sequence
AT, BOXES = 45, 46


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFLlamaConfig(
        attn_implementation="eager", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS,
        pad_token_id=PAD)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # larger weights: peaked, varied next-token distributions
            p.mul_(6.0) if p.ndim == 2 else None
    return hf, build(hf.state_dict(), hf.config)


def prompts(seed=0, lengths=(7, 3, 5, 1)):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = rng.integers(3, AT, n)
        mask[i, t - n:] = True
    return ids, mask


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


class Hypotheses:
    """4.31's `BeamHypotheses` with early_stopping=False: the W best finished, scored sum / len(hyp) ** penalty."""

    def __init__(self, w, length_penalty):
        self.w, self.length_penalty, self.beams, self.worst = w, length_penalty, [], 1e9

    def add(self, hyp, beam_score, answer):
        score = beam_score / hyp.shape[-1] ** self.length_penalty
        if len(self.beams) < self.w or score > self.worst:
            self.beams.append((score, beam_score, answer))
            if len(self.beams) > self.w:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best, cur_len):
        return len(self.beams) >= self.w and self.worst >= best / cur_len ** self.length_penalty


def reference_beam_sample(rows, b, w, n, warp, *, length_penalty=1.0, warp_first=False):
    """4.31's `beam_sample` loop and `BeamSearchScorer.process` / `finalize`, as the demo calls `generate` (with
    inputs_embeds, so `input_ids` start as one placeholder id per row and grow by one token a step). `rows` is the
    model side (`logits()`, `process(logp)` for logits processors, `advance(rows, tokens)`, `answer(row, eos)`).
    `warp_first`: warp log p, then add the beam scores (the other ordering), to show the tests tell them apart.
    -> per prompt its best hypothesis: (score / len ** penalty, beam score, answer)."""
    input_ids = torch.zeros((b * w, 1), dtype=torch.long)
    beam_scores = torch.zeros(b * w)
    hyps = [Hypotheses(w, length_penalty) for _ in range(b)]
    done = [False] * b
    for _ in range(n):
        logp = rows.process(torch.log_softmax(rows.logits(), dim=-1))
        if warp_first:
            scores = warp(input_ids, logp) + beam_scores[:, None]
        else:
            scores = warp(input_ids, logp + beam_scores[:, None])
        vocab = scores.shape[-1]
        scores = scores.view(b, w * vocab)
        drawn = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=2 * w)
        scores = torch.gather(scores, -1, drawn)
        scores, order = torch.sort(scores, descending=True, dim=1)
        drawn = torch.gather(drawn, -1, order)
        parent, token = drawn // vocab, drawn % vocab

        cur_len = input_ids.shape[-1] + 1
        next_scores = torch.zeros((b, w))
        next_tokens = torch.full((b, w), PAD, dtype=torch.long)
        next_rows = torch.zeros((b, w), dtype=torch.long)  # a finished prompt's rows follow row 0, as in 4.31
        for i in range(b):
            if done[i]:
                continue
            j = 0
            for rank in range(2 * w):
                row = i * w + int(parent[i, rank])
                if int(token[i, rank]) == EOS:
                    if rank < w:
                        hyps[i].add(input_ids[row], float(scores[i, rank]), rows.answer(row, EOS))
                else:
                    next_scores[i, j], next_tokens[i, j], next_rows[i, j] = scores[i, rank], token[i, rank], row
                    j += 1
                if j == w:
                    break
            assert j == w, "4.31 refuses more than W eos among the 2W drawn"
            done[i] = done[i] or hyps[i].is_done(float(scores[i].max()), cur_len)
        beam_scores, index = next_scores.view(-1), next_rows.view(-1)
        input_ids = torch.cat([input_ids[index], next_tokens.view(-1, 1)], dim=-1)
        rows.advance(index, next_tokens.view(-1))
        if all(done):
            break
    for i in range(b):  # finalize: the running beams of every prompt not done
        if not done[i]:
            for row in range(i * w, (i + 1) * w):
                hyps[i].add(input_ids[row], float(beam_scores[row]), rows.answer(row, None))
    return [max(h.beams, key=lambda x: x[0]) for h in hyps], done


class HFRows:
    """The reference's model side on the torch LLaMA: each row's whole sequence (left-padded prompt and the tokens
    so far) run again at every step, positions counted from its first real token."""

    def __init__(self, hf, ids, mask, w):
        self.hf = hf
        self.ids = torch.tensor(ids, dtype=torch.long).repeat_interleave(w, 0)
        self.mask = torch.tensor(mask, dtype=torch.long).repeat_interleave(w, 0)
        self.new = torch.zeros((self.ids.shape[0], 0), dtype=torch.long)

    def logits(self):
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return self.hf(input_ids=self.ids, attention_mask=self.mask, position_ids=positions).logits[:, -1].float()

    def process(self, logp):
        return logp

    def advance(self, index, tokens):
        self.ids = torch.cat([self.ids[index], tokens[:, None]], dim=-1)
        self.mask = torch.cat([self.mask[index], torch.ones_like(tokens[:, None])], dim=-1)
        self.new = torch.cat([self.new[index], tokens[:, None]], dim=-1)

    def answer(self, row, eos):
        return self.new[row].tolist() + ([eos] if eos is not None else [])


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
    want, done = reference_beam_sample(HFRows(hf, ids, mask, w), len(ids), w, n, warpers(temperature, top_k, top_p),
                                       length_penalty=length_penalty)
    return out, want, done


def assert_same(out, want, rtol):
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i, (_, beam_score, answer) in enumerate(want):
        assert tokens[i, : lengths[i]].tolist() == answer, (i, tokens[i], answer)
        assert (tokens[i, lengths[i]:] == PAD).all()
    np.testing.assert_allclose(np.asarray(out.scores), [s for _, s, _ in want], rtol=rtol)


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
        other, _ = reference_beam_sample(HFRows(hf, ids, mask, 3), len(ids), 3, 12, warpers(temperature, top_k, top_p),
                                         warp_first=True)
        assert_same(out, want, RTOL)
        assert any(a[2] != b[2] for a, b in zip(want, other)), temperature  # measured: 2, 4 and 3 of 4 prompts


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
        kept = np.isfinite(np.asarray(gen.sampling_logits(logits, 1.0, top_k, top_p, min_keep=2)))
        np.testing.assert_array_equal(kept, [[True, True, False, False]])


def with_triggers(llm):
    """A copy of the model where <at> wins wherever token 35 would, and a box encoder G and decoder F of large random
    weights (as test_generate's)."""
    llm = nnx.clone(llm)
    kernel = llm.lm_head.kernel
    kernel.set_value(kernel.get_value().at[:, AT].set(kernel.get_value()[:, 35] * 1.05))
    enc, dec = nnx.jit(lambda: (BoxEncoder(32, rngs=nnx.Rngs(0), init_std=0.3),
                                BoxDecoder(32, rngs=nnx.Rngs(1), init_std=0.3)))()
    return llm, enc, dec


class TriggerRows:
    """The reference's model side with pixel2emb, on jaxground's model run again without a cache over each row's
    embeddings: after a fed <at> the row's log p is forced to <boxes> (0, else -inf: a logits processor, before the
    beam score is added, as `generate._step_logp`), its box F(t) of the state at <at> is recorded, and the next
    input embedding is G(F(t)). Each row carries its boxes."""

    def __init__(self, llm, enc, dec, ids, mask, w, n):
        self.llm, self.enc, self.dec = llm, enc, dec
        self.forward = nnx.jit(lambda m, e, k: m.forward_embeds(e, k)[:2])
        self.table = np.asarray(llm.embed_tokens.embedding[...])
        r, self.t = ids.shape[0] * w, ids.shape[1]
        self.embeds = np.concatenate([np.repeat(self.table[ids], w, 0), np.zeros((r, n, self.table.shape[1]),
                                                                                 np.float32)], axis=1)
        self.valid = np.concatenate([np.repeat(mask, w, 0), np.zeros((r, n), bool)], axis=1)
        self.fed, self.i = np.repeat(ids[:, -1], w), 0
        self.new, self.boxes = [[] for _ in range(r)], [[] for _ in range(r)]

    def logits(self):
        hidden, logits = self.forward(self.llm, jnp.asarray(self.embeds), jnp.asarray(self.valid))
        box = np.asarray(self.dec(hidden[:, self.t + self.i - 1]))
        self.g = np.asarray(self.enc(jnp.asarray(box)))
        self.forced = self.fed == AT
        for r in np.flatnonzero(self.forced):  # recorded before the step's candidates, as `_record_trigger`
            self.boxes[r].append(box[r])
        return torch.tensor(np.asarray(logits[:, self.t + self.i - 1]))

    def process(self, logp):
        forced = torch.tensor(self.forced)
        boxes_only = torch.where(torch.arange(logp.shape[-1]) == BOXES, 0.0, -torch.inf)
        return torch.where(forced[:, None], boxes_only, logp)

    def advance(self, index, tokens):
        index, tokens = index.numpy(), tokens.numpy()
        self.embeds, self.valid, forced, g = self.embeds[index], self.valid[index], self.forced[index], self.g[index]
        self.new = [self.new[j] + [int(tok)] for j, tok in zip(index, tokens)]
        self.boxes = [list(self.boxes[j]) for j in index]
        self.embeds[:, self.t + self.i] = np.where(forced[:, None], g, self.table[tokens])
        self.valid[:, self.t + self.i] = True
        self.fed, self.i = tokens, self.i + 1

    def answer(self, row, eos):
        return self.new[row] + ([eos] if eos is not None else []), list(self.boxes[row])


def test_triggers_as_in_beam_search(pair, monkeypatch):
    """<at> -> box -> <boxes> in sampled beam search: every <at> is followed by a forced <boxes> fed as G(F(t)); the
    answer's boxes are its own <at>s' (kept through reordering and the finished set) and match the reference's
    run with the same forcing (atol 1e-5); the recorded states decode to the recorded boxes.

    A forced row leaves one token of nonzero probability, so a prompt whose beams are mostly forced has fewer than
    2W to draw (the demo, which does not force, never has; 4.31's multinomial would refuse). Both sides then draw
    them all, and the rest are -inf fillers that rank last and are never kept: each row still offers a token other
    than eos (the forced <boxes>, or one of the two kept), so W running beams come before any filler."""
    llm, enc, dec = with_triggers(pair[1])
    ids, mask = prompts(seed=21)
    n, w, seed = 10, 3, 21
    cfg = gen.GenerationConfig(max_new_tokens=n, method="beam_sample", num_beams=w, temperature=0.8, top_k=5,
                               top_p=0.7, eos_id=EOS, pad_id=PAD, at_id=AT, boxes_id=BOXES, max_triggers=8)
    key = jax.random.key(seed)
    out = gen.generate_jit(llm, jnp.asarray(llm.embed_tokens(jnp.asarray(ids))), jnp.asarray(mask),
                           jnp.asarray(ids[:, -1]), (enc, dec), key, cfg)
    short = race(key, monkeypatch, least=0.5)
    want, _ = reference_beam_sample(TriggerRows(llm, enc, dec, ids, mask, w, n), len(ids), w, n,
                                    warpers(0.8, 5, 0.7))
    assert short  # some step drew fewer than 2W tokens of nonzero probability
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert sum(len(boxes) for _, _, (_, boxes) in want) >= 2  # the answers hold <at>s
    for i, (_, beam_score, (answer, boxes)) in enumerate(want):
        row = tokens[i, : lengths[i]]
        assert row.tolist() == answer, (i, row, answer)
        at = np.flatnonzero(row[:-1] == AT)
        assert (row[at + 1] == BOXES).all()
        k = int(out.num_triggers[i])
        assert k == len(boxes) == len(at)
        if k:
            np.testing.assert_allclose(np.asarray(out.boxes[i, :k]), np.stack(boxes), atol=1e-5)
        np.testing.assert_allclose(np.asarray(dec(out.trigger_states[i, :k])), np.asarray(out.boxes[i, :k]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.scores), [s for _, s, _ in want], rtol=RTOL)
