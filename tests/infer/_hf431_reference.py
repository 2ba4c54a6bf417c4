"""transformers 4.31's beam search, transcribed in torch for the tests: `GenerationMixin.beam_search`
(do_sample=False) and `beam_sample` with one `BeamSearchScorer` (`process`, `finalize`) and `BeamHypotheses`
(`add`, `is_done`, early_stopping=False), run as the released NExT-Chat demo calls `generate`: the prompt as
inputs_embeds, so `_maybe_initialize_input_ids_for_generation` makes `input_ids` one placeholder id per row, and
`max_length` = max_new_tokens + 1. Hence a hypothesis ending in eos at new token n has length n (placeholder and
n - 1 tokens; eos is not in `input_ids` yet), the beams still running after N tokens are added by `finalize` with
length N + 1, and `is_done` divides the best candidate by cur_len = n + 1.

Shared by `test_beam_sample.py` and `test_beam_search_431.py` (loaded by path, as `tests/_sam_reference.py`), so
4.31's scorer is written once; its tiny model and prompts also serve `test_generate.py`. The model side is an object with `logits()` [R,V], `process(logp)` (logits
processors), `advance(rows, tokens)` and `answer(row, eos)`: `HFRows` here, or a test's own."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from jaxground.convert.llama import build
from jaxground.models.locator import BoxDecoder, BoxEncoder


def tiny_pair(vocab, eos, pad):
    """A tiny random torch LLaMA with large weights (peaked, varied next-token distributions, `eos` emitted
    mid-sequence for vocab 48 / eos 37) and jaxground's conversion of it: (hf, llm)."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFLlamaConfig(
        attn_implementation="eager", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=eos,
        pad_token_id=pad)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(6.0) if p.ndim == 2 else None
    return hf, build(hf.state_dict(), hf.config)


def prompts(seed, lengths, high):
    """Left-padded prompts of `lengths` tokens drawn from [3, high): (ids int32[B,T], mask bool[B,T])."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = rng.integers(3, high, n)
        mask[i, t - n:] = True
    return ids, mask


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


class Scorer:
    """4.31's `BeamSearchScorer` for B prompts of W beams (one group, one hypothesis kept)."""

    def __init__(self, b, w, length_penalty, eos, pad):
        self.b, self.w, self.eos, self.pad = b, w, eos, pad
        self.hyps = [Hypotheses(w, length_penalty) for _ in range(b)]
        self.done = [False] * b

    def process(self, input_ids, scores, tokens, parents, rows):
        """`process` on the 2W candidates [B,2W] of each prompt, best first (`parents` beams within the prompt) ->
        the next beam scores, tokens and rows [B·W]."""
        cur_len = input_ids.shape[-1] + 1
        next_scores = torch.zeros((self.b, self.w))
        next_tokens = torch.full((self.b, self.w), self.pad, dtype=torch.long)
        next_rows = torch.zeros((self.b, self.w), dtype=torch.long)  # a done prompt's rows follow row 0, as in 4.31
        for i in range(self.b):
            if self.done[i]:
                continue
            j = 0
            for rank in range(2 * self.w):
                row = i * self.w + int(parents[i, rank])
                if int(tokens[i, rank]) == self.eos:
                    if rank < self.w:
                        self.hyps[i].add(input_ids[row], float(scores[i, rank]), rows.answer(row, self.eos))
                else:
                    next_scores[i, j], next_tokens[i, j], next_rows[i, j] = scores[i, rank], tokens[i, rank], row
                    j += 1
                if j == self.w:
                    break
            assert j == self.w, "4.31 refuses more than W eos among the 2W candidates"
            self.done[i] = self.done[i] or self.hyps[i].is_done(float(scores[i].max()), cur_len)
        return next_scores.view(-1), next_tokens.view(-1), next_rows.view(-1)

    def finalize(self, input_ids, beam_scores, rows):
        """`finalize`: the running beams of every prompt not done join its hypotheses; -> per prompt its best
        (score / len ** penalty, beam score, answer)."""
        for i in range(self.b):
            if not self.done[i]:
                for row in range(i * self.w, (i + 1) * self.w):
                    self.hyps[i].add(input_ids[row], float(beam_scores[row]), rows.answer(row, None))
        return [max(h.beams, key=lambda x: x[0]) for h in self.hyps]


def reference_431(rows, b, w, n, *, eos, pad, length_penalty=1.0, warp=None, warp_first=False):
    """4.31's `beam_search` (`warp` None: do_sample=False) or `beam_sample` (`warp`: its logits warper list) for B
    prompts of W beams and N new tokens, on the model side `rows`. beam_search starts beams 2..W at -1e9 and takes
    the top 2W of log p (after the processors) + beam score; beam_sample starts all at 0, warps that sum (or, with
    `warp_first`, warps log p and then adds the beam score: the other order, for tests that tell them apart) and
    draws 2W with `torch.multinomial`, sorted by score. -> (per prompt its best hypothesis (score / len ** penalty,
    beam score, answer), per prompt whether it was done before the limit)."""
    input_ids = torch.zeros((b * w, 1), dtype=torch.long)  # the placeholder id inputs_embeds leaves
    beam_scores = torch.zeros((b, w))
    if warp is None:
        beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    scorer = Scorer(b, w, length_penalty, eos, pad)
    for _ in range(n):  # 4.31's MaxLengthCriteria: input_ids reach max_length = N + 1
        logp = rows.process(torch.log_softmax(rows.logits(), dim=-1))
        if warp is None:
            scores = logp + beam_scores[:, None]
        elif warp_first:
            scores = warp(input_ids, logp) + beam_scores[:, None]
        else:
            scores = warp(input_ids, logp + beam_scores[:, None])
        vocab = scores.shape[-1]
        scores = scores.view(b, w * vocab)
        if warp is None:
            scores, picked = torch.topk(scores, 2 * w, dim=1, largest=True, sorted=True)
        else:
            picked = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=2 * w)
            scores = torch.gather(scores, -1, picked)
            scores, order = torch.sort(scores, descending=True, dim=1)
            picked = torch.gather(picked, -1, order)
        beam_scores, tokens, index = scorer.process(input_ids, scores, picked % vocab, picked // vocab, rows)
        input_ids = torch.cat([input_ids[index], tokens[:, None]], dim=-1)
        rows.advance(index, tokens)
        if all(scorer.done):
            break
    return scorer.finalize(input_ids, beam_scores, rows), list(scorer.done)


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


def assert_same(out, want, pad, rtol):
    """jaxground's `Generation` against the reference's best hypotheses: the same tokens (eos included, `pad`
    after), beam scores within `rtol`."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i, (_, beam_score, answer) in enumerate(want):
        answer = answer[0] if isinstance(answer, tuple) else answer  # (tokens, boxes) from a trigger model side
        assert tokens[i, : lengths[i]].tolist() == answer, (i, tokens[i], answer)
        assert (tokens[i, lengths[i]:] == pad).all()
    np.testing.assert_allclose(np.asarray(out.scores), [s for _, s, _ in want], rtol=rtol)


def with_triggers(llm, at):
    """A copy of jaxground's model where token `at` (<at>) wins wherever token 35 would, and a box encoder G and
    decoder F of large random weights (as test_generate's): (llm, G, F)."""
    llm = nnx.clone(llm)
    kernel = llm.lm_head.kernel
    kernel.set_value(kernel.get_value().at[:, at].set(kernel.get_value()[:, 35] * 1.05))
    enc, dec = nnx.jit(lambda: (BoxEncoder(32, rngs=nnx.Rngs(0), init_std=0.3),
                                BoxDecoder(32, rngs=nnx.Rngs(1), init_std=0.3)))()
    return llm, enc, dec


class TriggerRows:
    """The reference's model side with pixel2emb, on jaxground's model run again without a cache over each row's
    embeddings: after a fed <at> the row's log p is forced to <boxes> (0, else -inf: a logits processor, before the
    beam score is added, as `generate._step_logp`), its box F(t) of the state at <at> is recorded, and the next
    input embedding is G(F(t)). Each row carries its boxes; `answer` is (tokens, boxes)."""

    def __init__(self, llm, enc, dec, ids, mask, w, n, at, boxes):
        self.llm, self.enc, self.dec, self.at, self.boxes_id = llm, enc, dec, at, boxes
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
        self.forced = self.fed == self.at
        for r in np.flatnonzero(self.forced):  # recorded before the step's candidates, as `_record_trigger`
            self.boxes[r].append(box[r])
        return torch.tensor(np.asarray(logits[:, self.t + self.i - 1]))

    def process(self, logp):
        forced = torch.tensor(self.forced)
        boxes_only = torch.where(torch.arange(logp.shape[-1]) == self.boxes_id, 0.0, -torch.inf)
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


def assert_triggers(out, want, dec, at, boxes_id, pad, *, prompt_at=False):
    """Answers with pixel2emb against the reference's (tokens, boxes): the same tokens, every <at> followed by a
    forced <boxes> (with `prompt_at`, prompts ending in <at>, the first token too), the answer's boxes its own <at>s'
    and the prompt's (atol 1e-5), the recorded states decoding to the recorded boxes. -> how many boxes the answers
    hold."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i, (_, _, (answer, boxes)) in enumerate(want):
        row = tokens[i, : lengths[i]]
        assert row.tolist() == answer, (i, row, answer)
        assert (tokens[i, lengths[i]:] == pad).all()
        where = np.flatnonzero(row[:-1] == at)
        assert (row[where + 1] == boxes_id).all() and (row[0] == boxes_id or not prompt_at)
        k = int(out.num_triggers[i])
        assert k == len(boxes) == len(where) + prompt_at
        if k:
            np.testing.assert_allclose(np.asarray(out.boxes[i, :k]), np.stack(boxes), atol=1e-5)
        np.testing.assert_allclose(np.asarray(dec(out.trigger_states[i, :k])), np.asarray(out.boxes[i, :k]), atol=1e-6)
    return sum(len(boxes) for _, _, (_, boxes) in want)
