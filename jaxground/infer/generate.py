"""Batched generation with a KV cache: prefill, then one jitted `jax.lax.while_loop` of decoding steps.

Axes: B prompts, W beams, R = B·W rows decoded together, T prompt tokens (left-padded), N max new tokens,
D model width, V vocabulary, Q max triggers per row.

Decoding: greedy, sampling (temperature, then top-k, then top-p, as HF `generate` warps logits), beam search
(`num_beams` W; rows of one prompt are adjacent) or sampled beam search. Each row stops at `eos_id` or after N
tokens; tokens after the end are `pad_id`. Beam search keeps hypotheses that end in a finished set ranked by
sum log p / length ** length_penalty, under one of two rules (`beam_rules`):

- "hf" (method "beam"'s default): HF `generate`'s beam search as the installed transformers 5.x runs it
  (`early_stopping=False`): beams 2..W start at -inf; the ending candidates (eos, or any token at the limit) among
  the first W enter the finished set with length n (the tokens generated, eos included), and a prompt stops once no
  running beam can beat its worst finished one (the best running score / n ** length_penalty).
- "released": transformers 4.31's `beam_search` and `BeamSearchScorer`, the version the released NExT-Chat demo
  runs (`generate` with the prompt as inputs_embeds, `num_beams` 5), whose `input_ids` start as one placeholder
  id: beams 2..W start at -1e9; a hypothesis ending in eos at token n has length n (placeholder and n - 1 tokens,
  eos not counted); the first W candidates by rank that are not eos run on, also at the limit, and the beams still
  running after N tokens join the finished set after the last step with length N + 1 (`BeamSearchScorer.finalize`);
  a prompt stops once its W finished slots are full and the worst of them is >= the best candidate's
  score / (n + 1) ** length_penalty (`BeamHypotheses.is_done` at 4.31's cur_len).

Sampled beam search ("beam_sample") is transformers 4.31's `beam_sample`, the demo's other reading
(`do_sample=True`), and runs only under the "released" rules, through the same scorer: the running beam score is
added to the log-probabilities first and the warpers (temperature, top-k, top-p, each keeping at least 2 tokens)
are applied to that sum, so a beam's score is the warped sum, divided by the temperature again at every step; 2W
candidates are drawn without replacement over each prompt's W·V continuations from the softmax of the warped
scores and sorted by score. Unlike 4.31's `beam_search`, all W beams start at score 0 (the first draw is over W
copies of one row).

pixel2emb (when a locator is given): whenever the token fed last was `<at>`, its hidden state t (last layer,
after the final norm) is decoded to a box F(t), recorded in the row's next trigger slot ([R,Q,4] buffer, plus
t itself for the mask head), and the next token is forced to `<boxes>` with input embedding G(F(t)) instead of
its table row, as the authors' demo does (it overwrites whatever was sampled after `<at>` with `<boxes>`).
A trailing `<at>` in the prompt is handled the same way. Triggers beyond Q are decoded but not recorded.

Which state a trigger's reported box and mask come from (`trigger_state`): "at" (default) records t, the
state at `<at>`, the one training supervises and the one G(F(t)) is fed from. "predicting" records instead the
state that chose `<at>` (the token before it), as the released `generate()` does (its demo and its RES
evaluation read `hidden_states[k]` for the `<at>` at k, which HF computes while predicting k); the `<boxes>`
input stays G(F(t)) of the state at `<at>`, as there. Greedy and sampling only; a prompt's trailing `<at>`
is not recorded in that mode (the released code looks only at generated tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxground.infer import sampling
from jaxground.models.kv_cache import KVCache
from jaxground.models.llama import Llama

METHODS = ("greedy", "sample", "beam", "beam_sample")
BEAM_METHODS = ("beam", "beam_sample")
SAMPLING_METHODS = ("sample", "beam_sample")
BEAM_RULES = ("hf", "released")
TRIGGER_STATES = ("at", "predicting")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    method: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0  # sampling keeps the k most likely tokens (and those tied with the k-th); 0: off
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0  # finished beams are ranked by sum log p / length ** length_penalty
    max_triggers: int = 8
    eos_id: int = 2  # -1: never stop before N tokens
    pad_id: int = 0
    at_id: int = -1  # <at>; -1 disables box decoding
    boxes_id: int = -1  # <boxes>
    trigger_state: str = "at"  # see the module docstring
    # beam methods: "hf" (HF 5.x's beam search; the default of "beam") or "released" (transformers 4.31's, as the
    # released demo runs it; the only rules of "beam_sample"); None: the method's default (see `rules`)
    beam_rules: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.trigger_state not in TRIGGER_STATES:
            raise ValueError(f"trigger_state must be one of {TRIGGER_STATES}, got {self.trigger_state!r}")
        if self.trigger_state == "predicting" and self.method in BEAM_METHODS:
            raise ValueError("trigger_state='predicting' is built for greedy and sampling, not beam search")
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.max_triggers < 1:
            raise ValueError("max_new_tokens, num_beams and max_triggers must be >= 1")
        if self.method in SAMPLING_METHODS and not (math.isfinite(self.temperature) and self.temperature > 0
                                                    and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs a finite temperature > 0 and 0 < top_p <= 1, got temperature "
                             f"{self.temperature}, top_p {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.num_beams > 1 and self.method not in BEAM_METHODS:
            raise ValueError(f"num_beams={self.num_beams} needs method='beam' or 'beam_sample'")
        if self.method == "beam_sample" and self.num_beams < 2:
            # as in HF, whose beam scorer refuses one beam: sampling one sequence is method="sample"
            raise ValueError("method='beam_sample' needs num_beams >= 2 (one sampled sequence: method='sample')")
        self._check_beam_rules()

    def _check_beam_rules(self):
        if self.beam_rules is None:
            return
        if self.beam_rules not in BEAM_RULES:
            raise ValueError(f"beam_rules must be one of {BEAM_RULES} (or None), got {self.beam_rules!r}")
        if self.method not in BEAM_METHODS:
            raise ValueError(f"beam_rules is for method='beam' or 'beam_sample', not {self.method!r}")
        if self.method == "beam_sample" and self.beam_rules != "released":
            # HF 5.x's sampled beam search is another algorithm (it warps log p before adding the beam score)
            raise ValueError("method='beam_sample' runs only as transformers 4.31 does: beam_rules='released'")
        if self.beam_rules == "released" and self.num_beams < 2:
            # as 4.31's BeamSearchScorer, which refuses one beam (its generate runs greedy search then)
            raise ValueError("beam_rules='released' needs num_beams >= 2 (one beam: method='greedy')")

    @property
    def rules(self) -> str | None:
        """The beam rules in force: `beam_rules`, else "hf" for "beam" and "released" for "beam_sample"; None for
        greedy and sampling."""
        if self.method not in BEAM_METHODS:
            return None
        return self.beam_rules or ("released" if self.method == "beam_sample" else "hf")

    @property
    def beams(self) -> int:
        """Rows decoded per prompt (W for the beam methods, else 1)."""
        return self.num_beams if self.method in BEAM_METHODS else 1


@struct.dataclass
class Generation:
    tokens: jax.Array  # int32[B,N], pad_id after the end
    lengths: jax.Array  # int32[B], eos included
    scores: jax.Array  # float32[B], sum of log-probabilities of the chosen tokens ("beam_sample": its warped beam score)
    boxes: jax.Array  # float32[B,Q,4], F(t) per trigger, normalised xyxy of the padded square
    trigger_states: jax.Array  # [B,Q,D], t per trigger (input of the mask head)
    num_triggers: jax.Array  # int32[B], recorded triggers (<= Q)
    # bool[B], "beam_sample" only: the prompt's warped beam scores passed float32's range while it searched (its
    # temperature < 1 multiplies them by 1 / temperature at every step), where transformers 4.31 raises; its answer
    # is then not 4.31's, which has none
    overflowed: jax.Array


@struct.dataclass
class _State:
    step: jax.Array
    cache: KVCache
    hidden: jax.Array  # [R,D] last layer state of the token fed last
    logits: jax.Array  # [R,V] next-token logits after it
    fed: jax.Array  # int32[R] the token fed last
    tokens: jax.Array
    done: jax.Array
    lengths: jax.Array
    scores: jax.Array
    boxes: jax.Array
    states: jax.Array
    num_triggers: jax.Array
    rng: jax.Array
    finished: _Finished | None = None  # beam search only
    searching: jax.Array | None = None  # bool[B], beam search: a running beam may still beat a finished one
    overflowed: jax.Array | None = None  # bool[B], beam search: `Generation.overflowed`


@struct.dataclass
class _Finished:
    """Beam search's W best finished hypotheses per prompt (rows of one prompt adjacent, best first)."""
    tokens: jax.Array  # int32[R,N]
    lengths: jax.Array  # int32[R]
    raw: jax.Array  # float32[R] sum of log-probabilities
    scores: jax.Array  # float32[R] raw / length ** length_penalty; -1e9 (plus masks) while a slot is empty
    boxes: jax.Array
    states: jax.Array
    num_triggers: jax.Array
    flag: jax.Array  # bool[R] the slot holds a hypothesis


def _one_hot_logp(token: int, vocab: int) -> jax.Array:
    return jnp.where(jnp.arange(vocab) == token, 0.0, -jnp.inf)


def _step_logp(state: _State, cfg: GenerationConfig) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities [R,V] of the next token with forcing applied, and the rows forced to <boxes>."""
    vocab = state.logits.shape[-1]
    logits = state.logits
    if cfg.method == "sample":
        logits = sampling.sampling_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    logp = jax.nn.log_softmax(logits, axis=-1)
    forced = (state.fed == cfg.at_id) & ~state.done if cfg.at_id >= 0 else jnp.zeros_like(state.done)
    logp = jnp.where(forced[:, None], _one_hot_logp(cfg.boxes_id, vocab), logp)
    logp = jnp.where(state.done[:, None], _one_hot_logp(cfg.pad_id, vocab), logp)
    return logp, forced


def _choose(state: _State, logp: jax.Array, cfg: GenerationConfig):
    """Greedy or sampling: -> (token int32[R], new scores [R]) for this step; each row continues itself."""
    if cfg.method == "sample":
        key = jax.random.fold_in(state.rng, state.step)
        token = jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
    else:
        token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    return token, state.scores + chosen


def _gather_rows(state: _State, parent: jax.Array) -> _State:
    take = functools.partial(jnp.take, indices=parent, axis=0)
    cache = state.cache
    cache = cache.replace(k=jnp.take(cache.k, parent, axis=1), v=jnp.take(cache.v, parent, axis=1),
                          mask=take(cache.mask))
    fields = ("hidden", "fed", "tokens", "done", "lengths", "boxes", "states", "num_triggers")
    return state.replace(cache=cache, **{f: take(getattr(state, f)) for f in fields})


def _record_trigger(state: _State, forced: jax.Array, box: jax.Array) -> _State:
    """Writes box [R,4] and the trigger state into slot num_triggers of each forced row (if a slot is left)."""
    q = state.boxes.shape[1]
    slot = jax.nn.one_hot(state.num_triggers, q, dtype=jnp.bool_) & forced[:, None]  # [R,Q], all False when full
    return state.replace(
        boxes=jnp.where(slot[..., None], box[:, None, :], state.boxes),
        states=jnp.where(slot[..., None], state.hidden[:, None, :].astype(state.states.dtype), state.states),
        num_triggers=state.num_triggers + jnp.any(slot, axis=1),
    )


def _loop_head(llm: Llama, rows: int):
    """The LM head the decoding loop runs on its `rows` states [R,D] -> logits float32[R,V].

    On XLA:CPU a product of 2-63 rows with the [D,V] `lm_head` kernel repacks the whole kernel on every call
    (16 rows at D=256, V=32005: ~11 ms a step); with a [V,D] copy made once before the loop it runs 1.5-2x faster
    (7.4 ms). One row (a matrix-vector product), 64 rows or more, tied embeddings (already [V,D]) and other
    backends keep `llm.head`."""
    if jax.default_backend() != "cpu" or llm.cfg.tie_embeddings or not 2 <= rows < 64:
        return llm.head
    # the barrier keeps the copy a [V,D] array (a guard: a transpose of a transpose may be folded back)
    kernel_t = jax.lax.optimization_barrier(llm.lm_head.kernel[...].T)
    dtype = llm.lm_head.dtype

    def head(hidden):
        h, k = (hidden, kernel_t) if dtype is None else (hidden.astype(dtype), kernel_t.astype(dtype))
        return (h @ k.T).astype(jnp.float32)

    return head


def _decode_loop(llm: Llama, locator, state: _State, cfg: GenerationConfig, beams: int) -> _State:
    head = _loop_head(llm, state.hidden.shape[0])

    def cond(s: _State):
        return (s.step < cfg.max_new_tokens) & ~jnp.all(s.done)

    def body(s: _State):
        if cfg.method in BEAM_METHODS:
            return _beam_step(llm, locator, head, s, cfg, beams)
        logp, forced = _step_logp(s, cfg)
        box = locator[1](s.hidden) if locator is not None else jnp.zeros((s.hidden.shape[0], 4), jnp.float32)
        token, scores = _choose(s, logp, cfg)
        active = ~s.done
        # "predicting": the state fed last is the one choosing <at> now; "at": it is <at>'s own, being forced
        chose_at = active & (token == cfg.at_id) & (cfg.at_id >= 0)
        s = _record_trigger(s, chose_at if cfg.trigger_state == "predicting" else forced, box)
        finished = active & (token == cfg.eos_id)
        s = s.replace(
            tokens=s.tokens.at[:, s.step].set(token),
            lengths=s.lengths + active,
            done=s.done | finished | (s.step + 1 >= cfg.max_new_tokens),
            scores=scores,
        )
        return _feed(llm, locator, head, s, token, forced, box, active)

    state = jax.lax.while_loop(cond, body, state)
    return _finalize_running(state, cfg, beams) if cfg.rules == "released" else state


def _feed(llm: Llama, locator, head, s: _State, token, forced, box, active) -> _State:
    """Runs the chosen tokens int32[R] through the model (G(box) instead of the table row where forced); `head`:
    `_loop_head`."""
    embeds = llm.embed_tokens(token[:, None])
    if locator is not None:
        embeds = jnp.where(forced[:, None, None], locator[0](box)[:, None, :].astype(embeds.dtype), embeds)
    hidden, _, cache = llm.forward_embeds(embeds, active[:, None], cache=s.cache, with_logits=False)
    return s.replace(step=s.step + 1, cache=cache, hidden=hidden[:, 0], logits=head(hidden[:, 0]), fed=token)


_MASKED = -1.0e9  # HF's additive mask for beam scores


def _beam_step(llm: Llama, locator, head, s: _State, cfg: GenerationConfig, w: int) -> _State:
    """One step of beam search or sampled beam search: each prompt's 2W candidates (best first), the finished set
    and the W running beams chosen from them by the rules in force (module docstring), the chosen run on.

    A row forced to <boxes> (after <at>) offers only <boxes>; its box is recorded before the finished set is built,
    so a hypothesis whose last token is this forced <boxes> keeps it."""
    logp, forced = _step_logp(s, cfg)
    box = locator[1](s.hidden) if locator is not None else jnp.zeros((s.hidden.shape[0], 4), jnp.float32)
    s = _record_trigger(s, forced, box)
    if cfg.method == "beam_sample":
        cand, flat = _drawn_candidates(s, logp, cfg, w)
        # every continuation of the prompt non-finite: 4.31's multinomial raises on the NaN probabilities
        s = s.replace(overflowed=s.overflowed | (s.searching & ~jnp.isfinite(cand[:, 0])))
    else:
        cand, flat = _best_candidates(s, logp, w)
    vocab = logp.shape[-1]
    parent = jnp.arange(cand.shape[0])[:, None] * w + flat // vocab  # [B,2W] rows
    token = (flat % vocab).astype(jnp.int32)
    scorer = _released_scorer if cfg.rules == "released" else _hf_scorer
    finished, sel, scores, searching = scorer(s, cfg, w, cand, parent, token)
    return _run_on(llm, locator, head, s, cfg, w, sel, scores, parent, token, forced, box, finished, searching)


def _best_candidates(s: _State, logp: jax.Array, w: int) -> tuple[jax.Array, jax.Array]:
    """Beam search's candidates: the 2W best of each prompt's W·V continuations (beam score + log p [R,V]) ->
    (their scores float32[B,2W], best first; their indices int32[B,2W] into W·V)."""
    rows, vocab = logp.shape
    return jax.lax.top_k((s.scores[:, None] + logp).reshape(rows // w, w * vocab), 2 * w)


def _drawn_candidates(s: _State, logp: jax.Array, cfg: GenerationConfig, w: int) -> tuple[jax.Array, jax.Array]:
    """4.31 `beam_sample`'s candidates: 2W drawn without replacement from the warped scores, sorted by score
    (`_best_candidates`' shapes). The draw at step i uses the key `fold_in(rng, i)` over the [B, W·V] warped
    scores."""
    rows, vocab = logp.shape
    b, k = rows // w, 2 * w
    # 4.31 warps the sum (log p + running beam score), not log p: the temperature divides the whole history again
    # at every step, and the warped sum is the beam score carried on (its own note: "intentionally")
    warped = sampling.sampling_logits(logp + s.scores[:, None], cfg.temperature, cfg.top_k, cfg.top_p, min_keep=2)
    flat = warped.reshape(b, w * vocab)
    drawn = sampling.draw_without_replacement(jax.random.fold_in(s.rng, s.step), flat, k)  # [B,2W]
    cand, order = jax.lax.top_k(jnp.take_along_axis(flat, drawn, 1), k)  # the drawn scores, best first
    return cand, jnp.take_along_axis(drawn, order, 1)


def _hf_scorer(s: _State, cfg: GenerationConfig, w: int, cand, parent, token):
    """HF 5.x's beam search step (`early_stopping=False`) on the candidates `cand` [B,2W] (best first; candidate c
    extends row `parent[c]` by `token[c]`): those among the first W that end (eos, or the last allowed token) enter
    the finished set with length n, where the W best finished stay; the W best that do not end run on. A prompt
    stops searching once no running beam can beat its worst finished one (HF's heuristic: the best running score
    normalised at the current length). -> (finished, sel int32[B,W] into the candidates, their scores [B,W],
    searching bool[B])."""
    b, k = cand.shape
    n_gen = s.step + 1
    ends = (token == cfg.eos_id) | (n_gen >= cfg.max_new_tokens)
    new_fin = ends & (jnp.arange(k) < w)[None, :] & s.searching[:, None]
    finished = _merge_finished(s, w, new_fin, cand, n_gen.astype(jnp.float32), parent, token, n_gen, cfg, _MASKED)
    scores, sel = jax.lax.top_k(cand + _MASKED * ends, w)
    best = scores[:, 0] / n_gen.astype(jnp.float32) ** cfg.length_penalty
    worst = jnp.where(finished.flag.reshape(b, w), jnp.min(finished.scores.reshape(b, w), axis=1, keepdims=True),
                      _MASKED)
    searching = s.searching & jnp.any(best[:, None] > worst, axis=1)
    return finished, sel, scores, searching


def _released_scorer(s: _State, cfg: GenerationConfig, w: int, cand, parent, token):
    """transformers 4.31's `BeamSearchScorer.process` (`_hf_scorer`'s arguments and results), shared by "beam" under
    the released rules and "beam_sample": candidates among the first W that are eos enter the finished set, the
    first W by rank that are not eos run on (also at the limit: `_finalize_running` adds them after the last step),
    and a prompt is done once its W finished slots are full and the worst is >= the best candidate's score at 4.31's
    cur_len."""
    b, k = cand.shape
    n_gen = s.step + 1
    ends = token == cfg.eos_id
    # 4.31's hypothesis of an eos at token n is the placeholder and the n - 1 tokens before eos: length n
    new_fin = ends & (jnp.arange(k) < w)[None, :] & s.searching[:, None]
    finished = _merge_finished(s, w, new_fin, cand, n_gen.astype(jnp.float32), parent, token, n_gen, cfg, -jnp.inf)
    # running: the first W candidates (by rank) that are not eos, as 4.31's scorer walks them
    rank = jnp.arange(k)[None, :]
    sel = jax.lax.top_k(-jnp.where(ends, k + rank, rank), w)[1]
    scores = jnp.take_along_axis(cand, sel, 1)
    # cur_len = placeholder + n tokens; the best candidate may be an eos one, as 4.31 takes the max of all 2W
    full = jnp.all(finished.flag.reshape(b, w), axis=1)
    worst = jnp.min(jnp.where(finished.flag, finished.scores, jnp.inf).reshape(b, w), axis=1)
    best = cand[:, 0] / (n_gen + 1).astype(jnp.float32) ** cfg.length_penalty
    searching = s.searching & ~(full & (worst >= best))
    return finished, sel, scores, searching


def _merge_finished(s: _State, w: int, new, raw, length, parent, token, n_tokens, cfg: GenerationConfig,
                    empty: float) -> _Finished:
    """Each prompt's W best of its finished hypotheses and the new ones, best first (HF's `BeamHypotheses`).

    The K candidates of a prompt ([B,K] arrays): `new` marks those that finish now, `raw` is their beam score,
    ranked as raw / length ** length_penalty (`length` a scalar); candidate c is running row `parent[c]` (before
    this step's reordering) with `token[c]` written at position n_tokens - 1, `n_tokens` its token count. An empty
    slot scores `empty`."""
    b = new.shape[0]
    f = s.finished
    scored = jnp.where(new, raw / length ** cfg.length_penalty, empty)
    merged = jnp.concatenate([f.scores.reshape(b, w), scored], axis=1)  # [B,W+K]
    _, keep = jax.lax.top_k(merged, w)
    from_old = (keep < w).reshape(-1)  # [R]: kept slot r holds an earlier hypothesis ...
    old_rows = (jnp.arange(b)[:, None] * w + jnp.minimum(keep, w - 1)).reshape(-1)  # ... from this slot
    cand_idx = jnp.maximum(keep - w, 0)  # [B,W] or this step's candidate, which extends running row src_rows
    src_rows = jnp.take_along_axis(parent, cand_idx, axis=1).reshape(-1)

    def by_row(old, new):  # [R,...] per slot, from the old slot or from the extended running row
        return jnp.where(from_old.reshape((-1,) + (1,) * (old.ndim - 1)), old[old_rows], new[src_rows])

    def by_candidate(old, new):  # old [R], new [B,K] per candidate -> [R]
        return jnp.where(from_old, old[old_rows], jnp.take_along_axis(new, cand_idx, 1).reshape(-1))

    ending_token = jnp.take_along_axis(token, cand_idx, 1).reshape(-1)
    return _Finished(
        tokens=jnp.where(from_old[:, None], f.tokens[old_rows],
                         s.tokens[src_rows].at[:, n_tokens - 1].set(ending_token)),
        lengths=by_candidate(f.lengths, jnp.broadcast_to(n_tokens, token.shape)),
        raw=by_candidate(f.raw, raw),
        scores=jnp.take_along_axis(merged, keep, 1).reshape(-1),
        boxes=by_row(f.boxes, s.boxes),
        states=by_row(f.states, s.states),
        num_triggers=by_row(f.num_triggers, s.num_triggers),
        flag=by_candidate(f.flag, new),
    )


def _run_on(llm: Llama, locator, head, s: _State, cfg: GenerationConfig, w: int, sel, scores, parent, token, forced,
            box, finished: _Finished, searching) -> _State:
    """Continues the W selected candidates `sel` int32[B,W] (of `parent`, `token` [B,K]) with beam scores
    `scores` [B,W]: rows reordered, their tokens written and fed."""
    b = sel.shape[0]
    parent = jnp.take_along_axis(parent, sel, 1).reshape(-1)
    token = jnp.take_along_axis(token, sel, 1).reshape(-1)
    s = _gather_rows(s, parent)
    forced, box = forced[parent], box[parent]
    s = s.replace(
        tokens=s.tokens.at[:, s.step].set(token),
        done=jnp.repeat(~searching, w) | (s.step + 1 >= cfg.max_new_tokens),
        scores=scores.reshape(b * w),
        finished=finished,
        searching=searching,
    )
    return _feed(llm, locator, head, s, token, forced, box, jnp.ones_like(s.done))


def _finalize_running(s: _State, cfg: GenerationConfig, w: int) -> _State:
    """4.31's `BeamSearchScorer.finalize` (the "released" rules): each prompt still searching after the last step
    adds its W running beams (N tokens; length N + 1 with the placeholder) to its finished set."""
    rows = s.scores.shape[0]
    b, n = rows // w, cfg.max_new_tokens
    new = jnp.broadcast_to(s.searching[:, None], (b, w))
    row = jnp.arange(rows).reshape(b, w)
    finished = _merge_finished(s, w, new, s.scores.reshape(b, w), jnp.float32(n + 1), row,
                               s.tokens[:, n - 1].reshape(b, w), n, cfg, -jnp.inf)
    return s.replace(finished=finished)


def _prefill(llm: Llama, embeds, mask, rng, cfg: GenerationConfig) -> _State:
    """Runs the prompts (each repeated W times) through the model and builds the initial loop state."""
    b, t, d = embeds.shape
    w = cfg.beams
    rows, n, q = b * w, cfg.max_new_tokens, cfg.max_triggers
    repeat = functools.partial(jnp.repeat, repeats=w, axis=0)
    embeds, mask = repeat(embeds), repeat(mask)

    cache = llm.init_cache(rows, t + n, dtype=embeds.dtype)
    hidden, _, cache = llm.forward_embeds(embeds, mask, cache=cache, with_logits=False)  # logits: last token only
    last_fed = jnp.full((rows,), -1, jnp.int32)
    # beams of a prompt start as one: beams 2..W at -inf (-1e9 in 4.31's beam_search, which can be carried on where
    # a forced <boxes> leaves beam 1 fewer than 2W candidates); 4.31's beam_sample starts every beam at 0
    later = {"beam_sample": 0.0}.get(cfg.method, _MASKED if cfg.rules == "released" else -jnp.inf)
    first_scores = jnp.where(jnp.arange(rows) % w == 0, 0.0, later)
    state = _State(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        hidden=hidden[:, -1],
        logits=llm.head(hidden[:, -1]),
        fed=last_fed,
        tokens=jnp.full((rows, n), cfg.pad_id, jnp.int32),
        done=jnp.zeros((rows,), bool),
        lengths=jnp.zeros((rows,), jnp.int32),
        scores=first_scores.astype(jnp.float32),
        boxes=jnp.zeros((rows, q, 4), jnp.float32),
        states=jnp.zeros((rows, q, d), hidden.dtype),
        num_triggers=jnp.zeros((rows,), jnp.int32),
        rng=rng,
    )
    if cfg.method in BEAM_METHODS:
        # the released rules' empty slots are -inf: beam_sample's warped scores are divided by the temperature at
        # every step (0.5 doubles them), so they can pass -1e9, and 4.31's beam_search can finish a -1e9 beam
        empty = _MASKED if cfg.rules == "hf" else -jnp.inf
        state = state.replace(searching=jnp.ones((b,), bool), overflowed=jnp.zeros((b,), bool), finished=_Finished(
            tokens=state.tokens, lengths=state.lengths, raw=jnp.zeros((rows,), jnp.float32),
            scores=jnp.full((rows,), empty, jnp.float32), boxes=state.boxes, states=state.states,
            num_triggers=state.num_triggers, flag=jnp.zeros((rows,), bool)))
    return state


def generate_from_embeds(
    llm: Llama,
    embeds: jax.Array,
    attention_mask: jax.Array,
    cfg: GenerationConfig,
    *,
    last_token: jax.Array | None = None,
    locator: tuple[nnx.Module, nnx.Module] | None = None,
    rng: jax.Array | None = None,
) -> Generation:
    """Decodes after prompts embeds [B,T,D] (left-padded, attention_mask bool[B,T]).

    `last_token` int32[B] is the last prompt token (only its being `<at>` matters); `locator` is (G, F).
    Call inside `jit` (see `generate_jit`).
    """
    b = embeds.shape[0]
    w = cfg.beams
    if cfg.at_id >= 0 and locator is None:
        raise ValueError("at_id is set but no locator (G, F) was given")
    rng = jax.random.key(0) if rng is None else rng
    state = _prefill(llm, embeds, attention_mask, rng, cfg)
    if last_token is not None:
        state = state.replace(fed=jnp.repeat(last_token.astype(jnp.int32), w, axis=0))
    state = _decode_loop(llm, locator, state, cfg, w)
    return _best_beams(state, cfg, b, w)


def _best_beams(state: _State, cfg: GenerationConfig, b: int, w: int) -> Generation:
    """Each prompt's answer: its row (greedy, sampling) or its best finished hypothesis (beam search and sampled
    beam search; the finished slots are sorted, best first; its score is the beam score, for "beam_sample" the
    warped one)."""
    if cfg.method in BEAM_METHODS:
        src, scores, rows = state.finished, state.finished.raw, jnp.arange(b) * w
    else:
        src, scores, rows = state, state.scores, jnp.arange(b)
    overflowed = state.overflowed if cfg.method in BEAM_METHODS else jnp.zeros((b,), bool)
    return Generation(tokens=src.tokens[rows], lengths=src.lengths[rows], scores=scores[rows], boxes=src.boxes[rows],
                      trigger_states=src.states[rows], num_triggers=src.num_triggers[rows], overflowed=overflowed)


@functools.partial(nnx.jit, static_argnames=("cfg",))
def generate_jit(llm, embeds, attention_mask, last_token, locator, rng, cfg: GenerationConfig) -> Generation:
    """`generate_from_embeds` compiled once per (shapes, cfg)."""
    return generate_from_embeds(llm, embeds, attention_mask, cfg, last_token=last_token, locator=locator, rng=rng)


@functools.partial(nnx.jit, static_argnames=("cfg",))
def _generate_ids_jit(llm, input_ids, attention_mask, rng, cfg):
    embeds = llm.embed_tokens(input_ids)
    return generate_from_embeds(llm, embeds, attention_mask, cfg, last_token=input_ids[:, -1], rng=rng)


def generate_ids(
    llm: Llama, input_ids, attention_mask, cfg: GenerationConfig, rng: jax.Array | None = None
) -> Generation:
    """Text-only generation from left-padded token ids int32[B,T] (attention_mask bool[B,T])."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, bool)
    check_fits(llm.cfg.max_position, input_ids.shape[1], cfg)
    rng = jax.random.key(0) if rng is None else rng
    return _generate_ids_jit(llm, input_ids, attention_mask, rng, cfg)


def check_fits(limit: int, prompt_len: int, cfg: GenerationConfig) -> None:
    """Refuses, before any compute, a prompt that leaves no room for max_new_tokens in the model's context of
    `limit` (llm max_position) tokens."""
    if prompt_len + cfg.max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the model's context "
            f"of {limit} tokens"
        )
