"""LLaMA decoder (LLaMA-2 / Vicuna): RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU.

Axes: B batch, T tokens of this call, S key slots (T without a cache, cache length with one), D model dim,
N query heads, K kv heads, G = N / K query heads per kv head, H head dim, F mlp dim, V vocabulary, L layers.
Layers are either a list (`layers.<i>.*`) or one stacked module scanned with `jax.lax.scan`
(`scan_layers=True`, parameters get a leading `layers` axis); both run the same per-layer function, optionally
under `jax.checkpoint` (`remat`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.models.kv_cache import KVCache, write_layer
from jaxground.models.layers import check_sizes_and_dtypes, linear, softmax, swiglu
from jaxground.parallel import constrain

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32005
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 4096
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        check_sizes_and_dtypes(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                      "num_kv_heads", "max_position"))
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"LlamaConfig.head_dim must be >= 1 (or None), got {self.head_dim}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.remat != "none" and self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat must be 'none', {', '.join(map(repr, REMAT_POLICIES))}; got {self.remat!r}"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> LlamaConfig:
        """From an HF `LlamaConfig` (object or dict); `overrides` set jaxground-only fields (dtype, scan, ...)."""
        c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError("LLaMA with attention or MLP biases is not supported")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"only default RoPE is supported, got {rope}")
        heads = c["num_attention_heads"]
        fields = {
            "vocab_size": c["vocab_size"],
            "hidden_size": c["hidden_size"],
            "intermediate_size": c["intermediate_size"],
            "num_layers": c["num_hidden_layers"],
            "num_heads": heads,
            "num_kv_heads": c.get("num_key_value_heads") or heads,
            "head_dim": c.get("head_dim"),
            "rms_eps": c.get("rms_norm_eps", 1e-6),
            "rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            "max_position": c.get("max_position_embeddings", 4096),
            "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        }
        return cls(**(fields | overrides))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 and returned in the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, rows: int | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32[B,T,H] for int positions [B,T] (rotate-half layout: the two halves share frequencies).

    With `rows` (static; every position must be below it) cos and sin are computed once for positions 0..rows-1 and
    looked up. Computed per token, XLA:CPU fuses the cos and sin into each of their consumers and so evaluates them
    again for every head of q and k in every layer, forward and backward (the tiny train step was ~4% slower).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rows is None:
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
    else:
        angles = jnp.arange(rows, dtype=jnp.float32)[:, None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if rows is None:
        return cos, sin
    return jnp.take(cos, positions, axis=0), jnp.take(sin, positions, axis=0)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B,T,N,H] rotated by per-token angles; cos/sin [B,T,H]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None] + rotated * sin[:, :, None]
    return out.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: q [B,T,N,H], k/v [B,S,K,H], mask bool[B,T,S] -> [B,T,N,H].

    Runs heads first: q as [B,K,R,H] with R = G*T (a kv head's G query heads stacked along the rows), k and v as
    [B,K,S,H], so scores, softmax and the weighted sum are batched GEMMs over (B, K) and the [T,S] scores are never
    transposed. With token-major einsums XLA:CPU copied q, k, the probabilities and the output between layouts (the
    tiny train step was ~8% slower). Fully masked rows (padding queries) get a uniform softmax instead of NaN; their
    outputs are ignored.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    q = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("BKRH,BKSH->BKRS", q, k, preferred_element_type=jnp.float32) * h**-0.5
    scores = jnp.where(mask[:, None, None], scores.reshape(b, kv_heads, g, t, s), jnp.finfo(jnp.float32).min)
    probs = softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, s)
    out = jnp.einsum("BKRS,BKSH->BKRH", probs, v).reshape(b, kv_heads, g, t, h)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class LlamaBlock(nnx.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, h, f = cfg.hidden_size, cfg.dim_per_head, cfg.intermediate_size
        kw = {
            "rngs": rngs,
            "use_bias": False,
            "dtype": jnp.dtype(cfg.dtype),
            "param_dtype": jnp.dtype(cfg.param_dtype),
        }
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, h
        self.input_norm = RMSNorm(d, cfg.rms_eps, param_dtype=jnp.dtype(cfg.param_dtype))
        self.q = linear(d, cfg.num_heads * h, ("embed", "heads"), **kw)
        self.k = linear(d, cfg.num_kv_heads * h, ("embed", "kv"), **kw)
        self.v = linear(d, cfg.num_kv_heads * h, ("embed", "kv"), **kw)
        self.o = linear(cfg.num_heads * h, d, ("heads", "embed"), **kw)
        self.post_norm = RMSNorm(d, cfg.rms_eps, param_dtype=jnp.dtype(cfg.param_dtype))
        self.gate = linear(d, f, ("embed", "mlp"), **kw)
        self.up = linear(d, f, ("embed", "mlp"), **kw)
        self.down = linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x, cos, sin, mask, k_cache=None, v_cache=None, index=None):
        """x [B,T,D], cos/sin [B,T,H], mask bool[B,T,S]; with a cache ([B,S,K,H] each) the new keys and
        values are written at slot `index` and attention runs over all S slots. Returns (x, (k, v))."""
        b, t, _ = x.shape
        h = self.input_norm(x)
        q = apply_rope(self.q(h).reshape(b, t, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k(h).reshape(b, t, self.kv_heads, self.head_dim), cos, sin)
        v = self.v(h).reshape(b, t, self.kv_heads, self.head_dim)
        if k_cache is not None:
            k, v = write_layer(k_cache, v_cache, k, v, index)
        a = attend(q, k, v, mask).reshape(b, t, self.heads * self.head_dim)
        x = constrain(x + self.o(a), ("batch", "length", "act_embed"))
        h = self.post_norm(x)
        x = x + self.down(swiglu(self.gate(h), self.up(h)))
        return constrain(x, ("batch", "length", "act_embed")), ((k, v) if k_cache is not None else None)


def _stacked_blocks(cfg: LlamaConfig, rngs: nnx.Rngs) -> LlamaBlock:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return LlamaBlock(cfg, rngs=r)

    return make(rngs)


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([LlamaBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, param_dtype=param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = linear(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                rngs=rngs,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int32[B,T] -> [B,T,D]; ids outside the vocabulary are refused when they are concrete."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B,T], got shape {tuple(input_ids.shape)}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integers, got {input_ids.dtype}")
        if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
            ids = np.asarray(
                input_ids
            )  # concrete (maybe a constant closed over by a jit): checked on the host
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got min {lo}, max {hi}")
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """int32[B,T] (+ bool[B,T] real-token mask) -> logits float32[B,T,V]."""
        return self.forward_embeds(self.embed(input_ids), attention_mask)[1]

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        if max_len > self.cfg.max_position:
            raise ValueError(f"cache length {max_len} exceeds max_position {self.cfg.max_position}")
        c = self.cfg
        return KVCache.zeros(
            c.num_layers, batch, max_len, c.num_kv_heads, c.dim_per_head, dtype or jnp.dtype(c.dtype)
        )

    def forward_embeds(self, embeds, attention_mask=None, positions=None, cache: KVCache | None = None,
                       with_logits: bool = True):
        """embeds [B,T,D] -> (hidden [B,T,D] after the final norm, logits float32[B,T,V] (None without
        `with_logits`: the caller runs `head` on the states it needs), updated cache).

        `attention_mask` bool[B,T] marks real tokens (prompts may be left-padded); positions default to the
        count of real tokens before each one (cached ones included). With a cache the T tokens are written at
        its write index and attend to every valid earlier slot.
        """
        b, t = self._check(embeds, attention_mask, positions, cache)
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        rows = None
        if cache is None:
            if positions is None:  # below t: the tables are computed for t rows and looked up
                positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
                rows = t
            key_valid, slots, index = mask, t, jnp.zeros((), jnp.int32)
        else:
            if positions is None:
                positions = cache.next_positions(mask)
            index = cache.index
            cache = cache.with_mask(mask)
            key_valid, slots = cache.mask, cache.max_len
        query_slot = index + jnp.arange(t)
        causal = jnp.arange(slots)[None, :] <= query_slot[:, None]  # [T,S]
        attn_mask = causal[None] & key_valid[:, None, :]  # [B,T,S]
        cos, sin = rope_tables(positions, self.cfg.dim_per_head, self.cfg.rope_theta, rows)

        x = constrain(embeds.astype(jnp.dtype(self.cfg.dtype)), ("batch", "length", "act_embed"))
        x, kv = self._layers(x, cos, sin, attn_mask, cache, index)
        if cache is not None:
            cache = cache.replace(k=kv[0], v=kv[1])
        hidden = self.norm(x)
        return hidden, (self.head(hidden) if with_logits else None), cache

    def head(self, hidden: jax.Array) -> jax.Array:
        """Final-norm states [..., D] -> logits float32[..., V] (the tied input embedding or `lm_head`)."""
        logits = self.embed_tokens.attend(hidden) if self.cfg.tie_embeddings else self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def _layers(self, x, cos, sin, attn_mask, cache, index):
        """Runs every layer; returns (x [B,T,D], (k, v) [L,B,S,K,H] or None)."""

        def step(graphdef, h, layer):
            state, k_cache, v_cache = layer
            block = nnx.merge(graphdef, state)
            return block(h, cos, sin, attn_mask, k_cache, v_cache, index)

        def layer_fn(graphdef):
            fn = functools.partial(step, graphdef)
            if self.cfg.remat == "none":
                return fn
            return jax.checkpoint(fn, policy=REMAT_POLICIES[self.cfg.remat])

        ks, vs = (cache.k, cache.v) if cache is not None else (None, None)
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)
            return jax.lax.scan(layer_fn(graphdef), x, (state, ks, vs))
        outs = []
        for i, block in enumerate(self.layers):
            graphdef, state = nnx.split(block)
            layer_cache = (ks[i], vs[i]) if cache is not None else (None, None)
            x, kv = layer_fn(graphdef)(x, (state, *layer_cache))
            outs.append(kv)
        if cache is None:
            return x, None
        return x, (jnp.stack([k for k, _ in outs]), jnp.stack([v for _, v in outs]))

    def _check(self, embeds, attention_mask, positions, cache) -> tuple[int, int]:
        c = self.cfg
        if embeds.ndim != 3 or embeds.shape[-1] != c.hidden_size:
            raise ValueError(f"embeds must be [B,T,{c.hidden_size}], got shape {tuple(embeds.shape)}")
        b, t = embeds.shape[:2]
        if t > c.max_position:
            raise ValueError(f"sequence length {t} exceeds max_position {c.max_position}")
        for name, arr in (("attention_mask", attention_mask), ("positions", positions)):
            if arr is not None and tuple(arr.shape) != (b, t):
                raise ValueError(f"{name} must have shape {(b, t)} like the tokens, got {tuple(arr.shape)}")
        if cache is not None:
            if cache.k.shape[1] != b or cache.k.shape[0] != c.num_layers:
                raise ValueError(
                    f"cache is for {cache.k.shape[0]} layers x batch {cache.k.shape[1]}, "
                    f"model has {c.num_layers} layers and the input batch is {b}"
                )
            if t > cache.max_len:
                raise ValueError(f"{t} tokens do not fit a cache of {cache.max_len} slots")
            if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + t > cache.max_len:
                raise ValueError(f"cache full: {int(cache.index)} + {t} tokens > {cache.max_len} slots")
        return b, t
