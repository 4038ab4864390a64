"""Language-model primitives shared by titans_jax's models and t2_jax's Llama-family base models:
RMSNorm, rotary position embedding, masked softmax attention (grouped-query), next-token sampling
and token-id checks. One definition each; t2_jax builds on these (titans_jax never imports t2_jax).

Precision: every function computes in float32, or float64 for float64 inputs, and returns the
input's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for half-precision and float32 inputs, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: Array, scale: Array, eps: float, *, scale_in_input_dtype: bool = False) -> Array:
    """x / rms(x) * scale over the last axis, normalised in float32 (float64 for float64 x).

    scale_in_input_dtype=False: the scale multiplies in the compute dtype and the result is cast
    to x's dtype (titans_jax's models). True: the normalised x is cast to x's dtype first and then
    scaled, in the scale's dtype — Hugging Face Llama's order, which the t2_jax base models
    follow to match transformers bit for bit in bfloat16."""
    x_c = x.astype(compute_dtype(x.dtype))
    normed = x_c * jax.lax.rsqrt(jnp.mean(x_c * x_c, axis=-1, keepdims=True) + eps)
    if scale_in_input_dtype:
        return scale * normed.astype(x.dtype)
    return (normed * scale).astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, base: float, dtype=jnp.float32) -> Array:
    """The plain RoPE inverse frequencies base^(-2i/E), i < E/2, computed in `dtype`."""
    half = head_dim // 2
    return base ** (-jnp.arange(half, dtype=dtype) / half)


def rope_phase_angles(positions: Array, head_dim: int, base: float) -> Array:
    """RoPE's angles p * base^(-2i/E) reduced modulo 2 pi, exact to ~1e-6 rad at any int32 position.

    The plain float32 product p * f rounds to the float32 grid at p * f, which is 0.125 rad wide
    at p = 2M and f = 1, and the rounding differs between a query and a key, so their relative
    rotation carries that error into attention scores (3.7e-2 on unit q, k at 2M tokens against
    2.6e-5 at 1K: `python -m experiments.rope_precision`). Here each frequency is a fixed-point fraction of a
    turn, F_i = round(f_i / 2 pi * 2^32) (from float64 at trace time), and p * F_i is formed in
    uint32, whose wrap-around is exactly the reduction modulo one turn. Errors: the frequency is
    off by at most 2 pi 2^-33 = 7.3e-10 rad per token (the same for every position, so a relative
    offset d moves by <= 7.3e-10 d: 1.5e-3 rad at d = 2M), and the phase's conversion to float32
    adds <= 2 pi 2^-25 = 1.9e-7 rad. Returns float32 angles in [-pi, pi), shape positions.shape +
    (E/2,). Negative positions (empty cache slots) give finite angles of no meaning."""
    half = head_dim // 2
    frequencies = float(base) ** (-np.arange(half, dtype=np.float64) / half)
    turns = np.round(frequencies / (2 * np.pi) * 2.0**32).astype(np.uint64) % 2**32  # f <= 1 rad: < 2^32
    phase = positions.astype(jnp.int32).astype(jnp.uint32)[..., None] * jnp.asarray(turns.astype(np.uint32))
    signed = jax.lax.bitcast_convert_type(phase, jnp.int32)  # a turn's fraction in [-1/2, 1/2) times 2^32
    return signed.astype(jnp.float32) * jnp.float32(2 * np.pi / 2.0**32)


def rope(x: Array, positions: Array, inverse_frequencies: Array, layout: str = "half") -> Array:
    """Rotary embedding of x [B, T, heads, E] at integer positions [T] or [B, T].

    layout "half" rotates (x[i], x[i + E/2]) (Hugging Face, titans_jax); "pairs" rotates
    (x[2i], x[2i + 1]) (GGUF's Q/K row order). The two are the same map up to a fixed
    permutation of the E coordinates. The angles are positions x inverse_frequencies in the
    compute dtype, as Hugging Face forms them (t2_jax matches transformers bit for bit); see
    `rope_phase_angles` and `rope_at_angles` for angles exact at millions of positions."""
    E = x.shape[-1]
    if E % 2:
        raise ValueError(f"RoPE needs an even head dim, got {E}")
    if inverse_frequencies.shape != (E // 2,):
        raise ValueError(f"inverse_frequencies must have shape ({E // 2},), got {inverse_frequencies.shape}")
    compute = compute_dtype(x.dtype)
    angles = positions.astype(compute)[..., None] * inverse_frequencies.astype(compute)  # [(B,) T, E/2]
    return rope_at_angles(x, angles, layout)


def rope_at_angles(x: Array, angles: Array, layout: str = "half") -> Array:
    """Rotate x [B, T, heads, E] by angles [T, E/2] or [B, T, E/2] (`rope`'s two layouts), in x's
    compute dtype; returns x's dtype."""
    E = x.shape[-1]
    if E % 2:
        raise ValueError(f"RoPE needs an even head dim, got {E}")
    if angles.shape[-1] != E // 2:
        raise ValueError(f"angles must end in E/2 = {E // 2}, got shape {angles.shape}")
    compute = compute_dtype(x.dtype)
    angles = angles.astype(compute)
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x_c = x.astype(compute)
    if layout == "half":
        x1, x2 = x_c[..., :E // 2], x_c[..., E // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif layout == "pairs":
        pairs = x_c.reshape(*x_c.shape[:-1], E // 2, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x_c.shape)
    else:
        raise ValueError(f"RoPE layout must be 'half' or 'pairs', got {layout!r}")
    return out.astype(x.dtype)


def softmax_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Masked softmax attention, grouped-query when k and v have fewer heads than q.

    q [B, T, H, E]; k, v [B, S, K, E] with H a multiple of K (query head h reads kv head
    h // (H / K)); mask broadcastable to [B, H, T, S] (True: visible). Scores and softmax in the
    compute dtype; a query that sees no key gets zeros (never NaN). Returns [B, T, H, E]."""
    B, T, H, E = q.shape
    K = k.shape[2]
    if H % K:
        raise ValueError(f"{H} query heads do not group over {K} key/value heads")
    compute = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(E)
    qg = q.astype(compute).reshape(B, T, K, H // K, E)
    scores = jnp.einsum("btkge,bske->bkgts", qg, k.astype(compute)) * scale
    mask = jnp.broadcast_to(mask, (B, H, T, scores.shape[-1])).reshape(B, K, H // K, T, -1)
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bske->btkge", weights, v.astype(compute))
    return out.reshape(B, T, H, E).astype(q.dtype)


def sample(logits: Array, key: Array | None, temperature: float = 0.0, *, top_k: int | None = None,
           top_p: float = 1.0) -> Array:
    """Next ids [B] from logits [B, V]: greedy at temperature 0; otherwise softmax(logits / T)
    restricted to the top_k most likely ids and to the nucleus of mass top_p (the most likely id
    is always kept; ids tied with the last kept one are kept too)."""
    if temperature < 0 or not 0 < top_p <= 1 or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 1, got {temperature}, {top_p}, "
                         f"{top_k}")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    scaled = logits.astype(compute_dtype(logits.dtype)) / temperature
    if top_k is not None:
        threshold = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    if top_p < 1:
        ordered = jnp.sort(scaled, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


class TokenError(ValueError, TypeError):
    """Token ids of the wrong shape, dtype or range (a ValueError; a TypeError for the dtype)."""


def check_tokens(tokens, vocab_size: int):
    """Rank-2 integer ids [B, T] in [0, vocab_size), B, T >= 1: TokenError otherwise. Values are
    checked only when concrete (not under tracing; the models then poison the logits of a row
    holding an out-of-range id instead of reading a clipped embedding). Returns tokens."""
    shape = getattr(tokens, "shape", None)
    if shape is None or len(shape) != 2:
        raise TokenError(f"tokens must have shape [batch, length], got {shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TokenError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if shape[0] == 0:
        raise TokenError(f"tokens must hold at least one sequence, got shape {tuple(shape)}")
    if shape[1] == 0:
        raise TokenError(f"tokens must hold at least one position, got shape {tuple(shape)}")
    if not isinstance(tokens, jax.core.Tracer):
        with jax.ensure_compile_time_eval():  # also for concrete arrays closed over under jit
            low, high = int(jnp.min(tokens)), int(jnp.max(tokens))
        if low < 0 or high >= vocab_size:
            raise TokenError(f"token ids must be in [0, {vocab_size}), got values in [{low}, {high}]")
    return tokens
