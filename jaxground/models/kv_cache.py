"""Key/value cache for incremental LLaMA decoding: a pytree with static shapes, so every step jits once.

Axes: L layers, B batch, S cache slots, K kv heads, H head dim, T tokens written by one call.
Slots are filled left to right from `index`; `mask[b, s]` says whether slot s of row b holds a real token
(left padding of a prompt stays False), so attention and RoPE positions stay padding-aware.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: jax.Array  # [L,B,S,K,H]
    v: jax.Array  # [L,B,S,K,H]
    mask: jax.Array  # bool[B,S]: slot holds a real token
    index: jax.Array  # int32[]: next slot to write

    @classmethod
    def zeros(cls, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
        shape = (layers, batch, max_len, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def next_positions(self, new_mask: jax.Array) -> jax.Array:
        """RoPE positions int32[B,T] of T new tokens: real tokens already cached + running count - 1."""
        seen = jnp.sum(self.mask, axis=1, dtype=jnp.int32)[:, None]
        return jnp.maximum(seen + jnp.cumsum(new_mask, axis=1, dtype=jnp.int32) - 1, 0)

    def with_mask(self, new_mask: jax.Array) -> KVCache:
        """Marks the T slots from `index` with `new_mask` bool[B,T] and advances `index` by T."""
        mask = jax.lax.dynamic_update_slice(self.mask, new_mask, (0, self.index))
        return self.replace(mask=mask, index=self.index + new_mask.shape[1])


def write_layer(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array):
    """Writes k, v [B,T,K,H] into one layer's cache [B,S,K,H] at slot `index`."""
    start = (0, index, 0, 0)
    return (
        jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start),
        jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start),
    )
