"""Attention as pure functions: RoPE, causal / sliding-window attention with an always-visible
persistent prefix, computed in query blocks (never an N x N matrix), and one-token decoding
over a fixed-shape key/value cache.

Dimension letters: B batch, T queries, S keys, H heads, E head dim, P persistent prefix length,
W window (a query at position p sees keys p - W + 1 .. p, plus the prefix 0 .. P - 1).

Positions are absolute token positions of the model's sequence (the persistent prefix, when
there is one, occupies positions 0 .. P - 1). Every function here has the same masking rule,
`visible(query_pos, key_pos)`, so the parallel path, the dense reference and the decode path
cannot drift apart.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Rotary position embedding


def rope(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotate-half RoPE. x: [B, T, H, E] (E even); positions: [T] or [B, T] int."""
    half = x.shape[-1] // 2
    compute = jnp.promote_types(x.dtype, jnp.float32)
    if 2 * half != x.shape[-1]:
        raise ValueError(f"RoPE needs an even head dim, got {x.shape[-1]}")
    inv_freq = base ** (-jnp.arange(half, dtype=compute) / half)
    angles = positions.astype(compute)[..., None] * inv_freq  # [(B,) T, E/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(compute), x[..., half:].astype(compute)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# The masking rule and the dense reference


def visible(query_pos: Array, key_pos: Array, window: int | None, num_prefix: int) -> Array:
    """True where a query at query_pos may attend to a key at key_pos (broadcasting). Negative
    key positions mark empty cache slots."""
    ok = (key_pos >= 0) & (key_pos <= query_pos)
    if window is not None:
        ok = ok & ((query_pos - key_pos < window) | (key_pos < num_prefix))
    return ok


def _attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Softmax attention in float32 (float64 for float64 inputs). q [B, T, H, E], k/v [B, S, H, E],
    mask broadcastable to [B, H, T, S]. Rows with no visible key give zeros (never NaN)."""
    compute = jnp.promote_types(q.dtype, jnp.float32)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bthe,bshe->bhts", q.astype(compute), k.astype(compute)) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bhts,bshe->bthe", weights, v.astype(compute)).astype(q.dtype)


def attention_reference(q: Array, k: Array, v: Array, *, window: int | None, num_prefix: int = 0) -> Array:
    """Dense O(T^2) masked attention over positions 0 .. T - 1 (tests only)."""
    positions = jnp.arange(q.shape[1])
    mask = visible(positions[:, None], positions[None, :], window, num_prefix)
    return _attend(q, k, v, mask[None, None])


# ----------------------------------------------------------------------------------------------
# The parallel path: query blocks, keys sliced to what the block can see


def key_span(length: int, block_size: int, window: int | None) -> int:
    """Static number of keys one query block looks at (besides the prefix)."""
    if window is None:
        return length
    return min(length, -(-(window - 1) // block_size) * block_size + block_size)


def blocked_attention(q: Array, k: Array, v: Array, *, window: int | None, num_prefix: int = 0,
                      block_size: int = 256) -> Array:
    """Causal (window=None) or sliding-window attention over positions 0 .. T - 1, the first
    num_prefix of which stay visible to every later query.

    Queries go in blocks of block_size through a rematerialised `lax.map`; each block sees a
    static slice of key_span(...) keys plus the prefix. Memory is O(T * (window + block)) for
    the window path and O(T * block) per block for full attention (compute stays O(T^2) there).
    """
    batch, length, heads, head_dim = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} do not match")
    if window is not None and window <= 0:
        raise ValueError(f"window must be positive (or None for full attention), got {window}")
    block = min(block_size, length)
    num_blocks = -(-length // block)
    padded = num_blocks * block
    pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
    q_p, k_p, v_p = (jnp.pad(x, pad) for x in (q, k, v))
    span = key_span(padded, block, window)
    use_prefix = window is not None and num_prefix > 0
    prefix_k, prefix_v = k[:, :num_prefix], v[:, :num_prefix]
    prefix_pos = jnp.arange(num_prefix)

    @jax.checkpoint
    def one_block(start):
        q_blk = jax.lax.dynamic_slice_in_dim(q_p, start, block, axis=1)
        key_start = jnp.clip(start + block - span, 0, padded - span)
        k_blk = jax.lax.dynamic_slice_in_dim(k_p, key_start, span, axis=1)
        v_blk = jax.lax.dynamic_slice_in_dim(v_p, key_start, span, axis=1)
        q_pos = start + jnp.arange(block)
        k_pos = key_start + jnp.arange(span)
        mask = visible(q_pos[:, None], k_pos[None, :], window, num_prefix)
        mask = mask & (k_pos[None, :] < length)
        if use_prefix:
            mask = mask & (k_pos[None, :] >= num_prefix)  # the prefix comes in separately below
            k_blk = jnp.concatenate([prefix_k, k_blk], axis=1)
            v_blk = jnp.concatenate([prefix_v, v_blk], axis=1)
            mask = jnp.concatenate([prefix_pos[None, :] <= q_pos[:, None], mask], axis=1)
        return _attend(q_blk, k_blk, v_blk, mask[None, None])

    out = jax.lax.map(one_block, jnp.arange(num_blocks) * block)  # [NB, B, block, H, E]
    out = out.transpose(1, 0, 2, 3, 4).reshape(batch, padded, heads, v.shape[-1])
    return out[:, :length]


def fused_attention(q: Array, k: Array, v: Array, *, window: int | None, num_prefix: int = 0,
                    implementation: str | None = None) -> Array:
    """The same attention through jax.nn.dot_product_attention (cuDNN flash attention on GPUs for
    bf16/fp16, XLA elsewhere). It fits full causal attention and windows without a persistent
    prefix; it builds the T x T scores on the XLA path and computes the softmax in float32."""
    if window is not None and num_prefix > 0:
        raise ValueError("jax.nn.dot_product_attention cannot keep a persistent prefix visible beyond "
                         "the window; use the blocked path (attention_impl='blocked')")
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                        implementation=implementation)


# ----------------------------------------------------------------------------------------------
# Decoding: a fixed-shape cache


class KVCache(NamedTuple):
    """Keys/values (already rotated) of one attention layer.

    The persistent prefix (positions < P) lives in its own buffer and is never evicted. Later
    positions go to a ring of `capacity` slots (slot = position mod capacity): capacity = window
    for sliding-window attention, the maximum sequence length for full attention.
    """

    prefix_k: Array  # [B, P, H, E]
    prefix_v: Array  # [B, P, H, E]
    k: Array  # [B, capacity, H, E]
    v: Array  # [B, capacity, H, E]
    slot_pos: Array  # int32 [capacity]: absolute position held by each slot, -1 if empty


def cache_from_prefill(k: Array, v: Array, *, num_prefix: int, capacity: int) -> KVCache:
    """The cache after a parallel pass over positions 0 .. T - 1 (static T)."""
    length = k.shape[1]
    if length < num_prefix:
        raise ValueError(f"a prefill of {length} positions does not cover the {num_prefix}-token prefix")
    first = max(num_prefix, length - capacity)
    positions = list(range(first, length))
    slots = [p % capacity for p in positions]
    shape = (k.shape[0], capacity) + k.shape[2:]
    ring_k = jnp.zeros(shape, k.dtype).at[:, slots].set(k[:, first:])
    ring_v = jnp.zeros(shape[:3] + v.shape[3:], v.dtype).at[:, slots].set(v[:, first:])
    slot_pos = jnp.full((capacity,), -1, jnp.int32).at[jnp.asarray(slots, jnp.int32)].set(
        jnp.asarray(positions, jnp.int32))
    return KVCache(k[:, :num_prefix], v[:, :num_prefix], ring_k, ring_v, slot_pos)


def decode_attention(q: Array, k: Array, v: Array, cache: KVCache, position: Array, *,
                     window: int | None) -> tuple[Array, KVCache]:
    """One new token at `position` (int32 scalar, >= P): write its k/v into the ring, attend.

    q, k, v: [B, 1, H, E]. Returns the output [B, 1, H, E] and the new cache. The caller must
    keep position < capacity + P for full attention (see `overflows`).
    """
    capacity = cache.k.shape[1]
    slot = position % capacity
    ring_k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), slot, axis=1)
    ring_v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), slot, axis=1)
    slot_pos = cache.slot_pos.at[slot].set(position.astype(jnp.int32))
    mask = visible(position, slot_pos, window, 0)[None, :]
    keys = jnp.concatenate([cache.prefix_k, ring_k], axis=1)
    values = jnp.concatenate([cache.prefix_v, ring_v], axis=1)
    mask = jnp.concatenate([jnp.ones((1, cache.prefix_k.shape[1]), bool), mask], axis=1)
    out = _attend(q, keys, values, mask[None, None])
    return out, cache._replace(k=ring_k, v=ring_v, slot_pos=slot_pos)
