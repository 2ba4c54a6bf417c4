"""Sampling's arithmetic, as HF `generate` does it: the logit warpers (temperature, top-k, top-p, in HF's order)
and k draws without replacement (`torch.multinomial`'s, for sampled beam search). Shapes: R rows, V vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sampling_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    min_keep: int = 1) -> jax.Array:
    """[R,V] logits -> the logits sampling draws from, warped as HF `generate` warps them and in its order:
    divided by `temperature`, then `top_k_filter`, then `top_p_filter` (filtered tokens -inf), each keeping at
    least `min_keep` tokens (HF's `min_tokens_to_keep`: 2 when num_beams > 1). A filter at its neutral value
    (top_k 0, top_p 1) is skipped, as HF skips it; the arguments are static."""
    logits = logits / temperature
    if 0 < top_k and max(top_k, min_keep) < logits.shape[-1]:
        logits = top_k_filter(logits, max(top_k, min_keep))
    if top_p < 1:
        logits = top_p_filter(logits, top_p, min_keep)
    return logits


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """[R,V] logits with every token below the k-th largest set to -inf; tokens tied with the k-th stay (HF's
    `TopKLogitsWarper`)."""
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p: float, min_keep: int = 1) -> jax.Array:
    """[R,V] logits with every token outside the nucleus set to -inf (the `min_keep` most likely tokens always
    stay): a token stays while the tokens more likely than it hold less than top_p, HF's `TopPLogitsWarper` rule.
    Of tokens tied at the nucleus edge the lower indices stay (HF's unstable torch sort picks any)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = (before < top_p) | (jnp.arange(logits.shape[-1]) < min_keep)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def draw_without_replacement(key: jax.Array, scores: jax.Array, k: int) -> jax.Array:
    """Indices int32[B,k] of k draws without replacement from softmax(scores [B,M]), as `torch.multinomial(probs,
    k)` draws them, as an exponential race: with E ~ Exp(1) drawn from `key` for every entry ([B,M] float32), the k
    largest p / E (taken here as log p - log E) arrive first in successive sampling proportional to p. Entries of
    probability 0 come last (HF's multinomial refuses to draw them)."""
    e = jax.random.exponential(key, scores.shape, jnp.float32)
    return jax.lax.top_k(jax.nn.log_softmax(scores, axis=-1) - jnp.log(e), k)[1]
