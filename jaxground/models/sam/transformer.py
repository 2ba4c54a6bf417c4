"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Axis legend: B batch (images x prompts, flattened), T tokens (output + prompt tokens), P image positions
(g*g), C prompt_dim, N heads, H head dim (of the possibly downsampled internal width).
Traps kept: the MLP uses ReLU, LayerNorms use eps 1e-5, cross-attention halves the internal width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxground.models.layers import layer_norm, linear, softmax
from jaxground.models.sam.common import LN_EPS
from jaxground.models.sam.config import SamConfig


class Attention(nnx.Module):
    """q/k/v projected to `dim / downsample`, N heads, projected back to `dim`."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1, *, rngs: nnx.Rngs):
        inner = dim // downsample
        self.num_heads = num_heads
        self.q_proj = linear(dim, inner, ("embed", "heads"), rngs=rngs)
        self.k_proj = linear(dim, inner, ("embed", "heads"), rngs=rngs)
        self.v_proj = linear(dim, inner, ("embed", "heads"), rngs=rngs)
        self.out_proj = linear(inner, dim, ("heads", "embed"), rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        def heads(x):
            return x.reshape(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)

        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(jnp.float32(q.shape[-1])).astype(q.dtype)
        out = jnp.einsum("BNTS,BSNH->BTNH", softmax(logits, axis=-1), v)
        return self.out_proj(out.reshape(*out.shape[:-2], -1))


class TwoWayBlock(nnx.Module):
    """Self-attn (tokens), cross-attn tokens->image, ReLU MLP (tokens), cross-attn image->tokens."""

    def __init__(self, cfg: SamConfig, skip_first_pe: bool, *, rngs: nnx.Rngs):
        c, n, r = cfg.prompt_dim, cfg.decoder_heads, cfg.attention_downsample_rate
        self.skip_first_pe = skip_first_pe
        self.self_attn = Attention(c, n, rngs=rngs)
        self.norm1 = layer_norm(c, eps=LN_EPS, rngs=rngs)
        self.cross_attn_token_to_image = Attention(c, n, r, rngs=rngs)
        self.norm2 = layer_norm(c, eps=LN_EPS, rngs=rngs)
        self.lin1 = linear(c, cfg.decoder_mlp_dim, ("embed", "mlp"), rngs=rngs)
        self.lin2 = linear(cfg.decoder_mlp_dim, c, ("mlp", "embed"), rngs=rngs)
        self.norm3 = layer_norm(c, eps=LN_EPS, rngs=rngs)
        self.norm4 = layer_norm(c, eps=LN_EPS, rngs=rngs)
        self.cross_attn_image_to_token = Attention(c, n, r, rngs=rngs)

    def __call__(self, queries, keys, query_pe, key_pe):
        if self.skip_first_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.lin2(jax.nn.relu(self.lin1(queries))))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        c = cfg.prompt_dim
        self.layers = nnx.List([TwoWayBlock(cfg, i == 0, rngs=rngs) for i in range(cfg.decoder_depth)])
        self.final_attn = Attention(c, cfg.decoder_heads, cfg.attention_downsample_rate, rngs=rngs)
        self.norm_final = layer_norm(c, eps=LN_EPS, rngs=rngs)

    def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array):
        """image [B, P, C], image_pe [B or 1, P, C], tokens [B, T, C] -> (tokens [B, T, C], image [B, P, C])."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        out = self.final_attn(queries + tokens, keys + image_pe, keys)
        return self.norm_final(queries + out), keys
