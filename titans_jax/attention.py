"""Attention as pure functions: RoPE, causal / sliding-window attention with an always-visible
persistent prefix, computed in query blocks (never an N x N matrix), and streaming (any number of
new tokens, one token = decoding) over a fixed-shape key/value cache.

Dimension letters: B batch, T queries, S keys, H heads, E head dim, P persistent prefix length,
W window (a query at position p sees keys p - W + 1 .. p, plus the prefix 0 .. P - 1).

Positions are absolute token positions of the model's sequence (the persistent prefix, when
there is one, occupies positions 0 .. P - 1). Every function here has the same masking rule,
`visible(query_pos, key_pos)`, so the parallel path, the dense reference and the decode path
cannot drift apart.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from titans_jax import primitives

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Rotary position embedding


def rope(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotate-half RoPE (titans_jax.primitives). x: [B, T, H, E] (E even); positions: [T] or [B, T]
    int. float64 inputs take the plain angles p * f in float64 (exact enough at any position);
    float32 and half precision take `primitives.rope_phase_angles`, reduced modulo 2 pi in integer
    arithmetic, because the float32 product loses up to 0.125 rad at 2M tokens, which the streamed
    2M-token contexts reach."""
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head dim, got {x.shape[-1]}")
    compute = primitives.compute_dtype(x.dtype)
    if compute == jnp.float64:
        return primitives.rope(x, positions, primitives.rope_inverse_frequencies(x.shape[-1], base, compute))
    return primitives.rope_at_angles(x, primitives.rope_phase_angles(positions, x.shape[-1], base))


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
    """Softmax attention (titans_jax.primitives.softmax_attention): q [B, T, H, E], k/v [B, S, H, E],
    mask broadcastable to [B, H, T, S]; rows with no visible key give zeros (never NaN)."""
    return primitives.softmax_attention(q, k, v, mask)


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
# Streaming: any number of new tokens over a fixed-shape cache


class KVCache(NamedTuple):
    """Keys/values (already rotated) of one attention layer.

    The persistent prefix (positions < P) lives in its own buffer and is never evicted. Later
    positions live in `capacity` slots: for sliding-window attention (capacity = window) the
    last `capacity` positions in order, oldest first; for full attention (capacity = the
    maximum number of tokens after the prefix) position p in slot p - P, never wrapped.
    """

    prefix_k: Array  # [B, P, H, E]
    prefix_v: Array  # [B, P, H, E]
    k: Array  # [B, capacity, H, E]
    v: Array  # [B, capacity, H, E]
    slot_pos: Array  # int32 [capacity]: absolute position held by each slot, -1 if empty


def init_kv_cache(batch: int, num_prefix: int, capacity: int, heads: int, head_dim: int, dtype) -> KVCache:
    """An empty cache (the prefix buffer is filled by the first call over the prefix)."""
    prefix = jnp.zeros((batch, num_prefix, heads, head_dim), dtype)
    ring = jnp.zeros((batch, capacity, heads, head_dim), dtype)
    return KVCache(prefix, prefix, ring, ring, jnp.full((capacity,), -1, jnp.int32))


def cached_attention(q: Array, k: Array, v: Array, position: Array, cache: KVCache, *, window: int | None,
                     block_size: int = 256) -> tuple[Array, KVCache]:
    """T new tokens at positions position .. position + T - 1 (>= P) attend to the prefix, the
    cached keys and each other; returns the output [B, T, H, E] and the cache after them.

    q, k, v: [B, T, H, E]. Queries go in blocks of block_size; with a window each block reads a
    static slice of (window - 1 + block) keys of [cache || new] besides the prefix, so a long
    call costs O(T (window + block)). Full attention reads every cached key. The caller keeps
    position - P + T <= capacity for full attention (models.py checks it, NaN under jit): past
    that the write would be clipped.
    """
    batch, length, heads, head_dim = q.shape
    num_prefix, capacity = cache.prefix_k.shape[1], cache.k.shape[1]
    positions = position + jnp.arange(length, dtype=jnp.int32)
    block = min(block_size, length)
    num_blocks = -(-length // block)
    pad = num_blocks * block - length
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype), jnp.zeros((batch, pad) + k.shape[2:], cache.k.dtype)], 1)
    values = jnp.concatenate([cache.v, v.astype(cache.v.dtype), jnp.zeros((batch, pad) + v.shape[2:], cache.v.dtype)],
                             1)
    key_pos = jnp.concatenate([cache.slot_pos, positions, jnp.full((pad,), -1, jnp.int32)])
    q_p = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)])
    total = capacity + num_blocks * block
    span = total if window is None else min(total, window - 1 + block)

    def one_block(start):
        q_blk = jax.lax.dynamic_slice_in_dim(q_p, start, block, axis=1)
        q_pos = position + start + jnp.arange(block, dtype=jnp.int32)
        key_start = jnp.clip(capacity + start + block - span, 0, total - span)
        k_blk = jax.lax.dynamic_slice_in_dim(keys, key_start, span, axis=1)
        v_blk = jax.lax.dynamic_slice_in_dim(values, key_start, span, axis=1)
        k_pos = jax.lax.dynamic_slice_in_dim(key_pos, key_start, span)
        mask = visible(q_pos[:, None], k_pos[None, :], window, 0) & (k_pos[None, :] >= num_prefix)
        if num_prefix:
            k_blk = jnp.concatenate([cache.prefix_k, k_blk], axis=1)
            v_blk = jnp.concatenate([cache.prefix_v, v_blk], axis=1)
            mask = jnp.concatenate([jnp.ones((block, num_prefix), bool), mask], axis=1)
        return _attend(q_blk, k_blk, v_blk, mask[None, None])

    if num_blocks == 1:
        out = one_block(jnp.asarray(0, jnp.int32))
    else:
        out = jax.lax.map(jax.checkpoint(one_block), jnp.arange(num_blocks, dtype=jnp.int32) * block)
        out = out.transpose(1, 0, 2, 3, 4).reshape(batch, num_blocks * block, heads, v.shape[-1])
    out = out[:, :length]

    if window is None:  # position p in slot p - P
        slot = position - num_prefix
        new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), slot, axis=1)
        new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), slot, axis=1)
        new_pos = jax.lax.dynamic_update_slice_in_dim(cache.slot_pos, positions, slot, axis=0)
    else:  # the last `capacity` positions, in order
        end = capacity + length
        new_k, new_v, new_pos = keys[:, end - capacity:end], values[:, end - capacity:end], key_pos[end - capacity:end]
    return out, cache._replace(k=new_k, v=new_v, slot_pos=new_pos)
