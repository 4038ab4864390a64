"""A Llama-family decoder as pure functions over a parameter pytree.

Dimension letters used in names and comments:
  B batch, T query tokens in this call, S key slots (cache length, or T without a cache),
  D hidden size, H query heads, K key/value heads, G = H / K query heads per kv head,
  E head dim (config.head_dim), F MLP width, V vocabulary, L layers, R rank of an SVD factor.

Parameter pytree (plain nested dict; per-layer leaves are stacked on a leading L axis so the
layers run under one `lax.scan`). Every kernel is stored (in, out), i.e. y = x @ kernel, which is
the transpose of a Hugging Face / PyTorch `weight`:

  embed                 (V, D)
  layers/attn_norm      (L, D)
  layers/attn/q/kernel  (L, D, H*E)     layers/attn/q/bias (L, H*E)   [attention_bias only]
  layers/attn/k/kernel  (L, D, K*E)     layers/attn/k/bias (L, K*E)   [attention_bias only]
  layers/attn/v/kernel  (L, D, K*E)     layers/attn/v/bias (L, K*E)   [attention_bias only]
  layers/attn/o/kernel  (L, H*E, D)     layers/attn/o/bias (L, D)     [attention_output_bias]
  layers/mlp_norm       (L, D)
  layers/mlp/gate/kernel (L, D, F)   layers/mlp/up/kernel (L, D, F)
  layers/mlp/down/kernel (L, F, D)
  final_norm            (D,)
  lm_head               (D, V)          [absent when config.tie_embeddings]

A kernel leaf may also be an SVD-factorised matrix {"u": (.., in, R), "scale": (.., R),
"vt": (.., R, out)}, applied as ((x @ u) * scale) @ vt without rebuilding it (see svf.py).

The KV cache is an explicit value returned beside the logits; its shapes never change across
decode steps:
  k, v           (L, B, S, K, E)   keys after RoPE, values
  valid          (B, S) bool       slot holds a real (non-padding) token
  length         ()  int32         slots written so far (the same for every row)
  next_position  (B,) int32        RoPE position of each row's next real token
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from titans_jax import primitives
from t2_jax._config import LlamaConfig

Params = dict[str, Any]
Cache = dict[str, jax.Array]

# ---- initialisation ---------------------------------------------------------------------------


def param_shapes(config: LlamaConfig) -> Params:
    """The shape of every parameter leaf, as a pytree of tuples."""
    c = config
    L, D, F, V, E = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    HE, KE = c.num_heads * E, c.num_kv_heads * E
    attn = {"q": {"kernel": (L, D, HE)}, "k": {"kernel": (L, D, KE)},
            "v": {"kernel": (L, D, KE)}, "o": {"kernel": (L, HE, D)}}
    if c.attention_bias:
        attn["q"]["bias"], attn["k"]["bias"], attn["v"]["bias"] = (L, HE), (L, KE), (L, KE)
    if c.attention_output_bias:
        attn["o"]["bias"] = (L, D)
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D),
            "attn": attn,
            "mlp_norm": (L, D),
            "mlp": {"gate": {"kernel": (L, D, F)}, "up": {"kernel": (L, D, F)},
                    "down": {"kernel": (L, F, D)}},
        },
        "final_norm": (D,),
    }
    if not c.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


@functools.partial(jax.jit, static_argnames=("config", "dtype", "std"))
def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32,
                std: float = 0.02) -> Params:
    """Random parameters: N(0, std^2) matrices and biases, unit norm scales."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def check_params(params: Params, config: LlamaConfig) -> None:
    """Raise ValueError naming the first leaf whose presence or shape disagrees with config."""
    expected = param_shapes(config)
    flat_expected = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        expected, is_leaf=lambda x: isinstance(x, tuple))[0]}
    def shape_of(x):  # a factorised kernel counts as the (.., in, out) matrix it represents
        if is_factorised(x):
            return tuple(np.shape(x["u"])[:-1]) + tuple(np.shape(x["vt"])[-1:])
        return tuple(np.shape(x))

    flat_got = {jax.tree_util.keystr(p): shape_of(x) for p, x in
                jax.tree_util.tree_flatten_with_path(params, is_leaf=is_factorised)[0]}
    missing = sorted(set(flat_expected) - set(flat_got))
    extra = sorted(set(flat_got) - set(flat_expected))
    if missing or extra:
        raise ValueError(f"parameters do not match config {config.name!r}: missing {missing}, "
                         f"unexpected {extra}")
    for path, shape in flat_expected.items():
        if flat_got[path] != shape:
            raise ValueError(f"parameter {path} has shape {flat_got[path]}, config "
                             f"{config.name!r} expects {shape}")


# ---- building blocks ---------------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * scale, normalised in float32 (float64 for float64 x) and cast back to x's
    dtype before the scale (Hugging Face Llama's order; titans_jax.primitives.rms_norm)."""
    return primitives.rms_norm(x, scale, eps, scale_in_input_dtype=True)


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies (E/2,) in float32, with Llama 3 scaling when configured."""
    E = config.head_dim
    exponents = np.arange(0, E, 2, dtype=np.int64).astype(np.float32) / E
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    inv_freq = inv_freq.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, config: LlamaConfig) -> jax.Array:
    """Rotary embedding of x (B, T, heads, E) at integer positions (B, T), with the config's
    frequencies (Llama 3 scaling included) and layout (titans_jax.primitives.rope).

    "half" rotates (x[i], x[i+E/2]); "pairs" rotates (x[2i], x[2i+1]). Both are the same map up
    to a fixed permutation of the E coordinates (the one llama.cpp applies to Q/K rows).
    """
    return primitives.rope(x, positions, jnp.asarray(rope_frequencies(config)), config.rope_layout)


def is_factorised(kernel: Any) -> bool:
    return isinstance(kernel, Mapping) and "u" in kernel and "vt" in kernel


def dense(x: jax.Array, kernel: Any) -> jax.Array:
    """x @ kernel for a plain (in, out) kernel or an SVD-factorised one (never rebuilt)."""
    if is_factorised(kernel):
        return ((x @ kernel["u"]) * kernel["scale"].astype(x.dtype)) @ kernel["vt"]
    return x @ kernel


def _linear(x, layer):
    y = dense(x, layer["kernel"])
    if "bias" in layer:
        y = y + layer["bias"]
    return y


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q (B,T,H,E); k, v (B,S,K,E); mask (B,T,S) bool -> (B,T,H,E)
    (titans_jax.primitives.softmax_attention: float32 scores and softmax; a query with no visible
    key, a padding slot whose output is ignored, gets zeros instead of NaN)."""
    return primitives.softmax_attention(q, k, v, mask[:, None])


def _visibility(query_slots, key_slots, key_valid, config):
    """(B, T, S) mask: key is real, not in the future, and inside the sliding window."""
    delta = query_slots[:, :, None] - key_slots[None, None, :]
    mask = key_valid[:, None, :] & (delta >= 0)
    if config.sliding_window is not None:
        mask = mask & (delta < config.sliding_window)
    return mask


def _block(x, layer, positions, mask, config, past_kv=None):
    """One pre-norm decoder block. Returns (x, (k, v)) with this call's keys (after RoPE) and
    values (B, T, K, E). With past_kv = (cache_k, cache_v) (B, S, K, E) the queries attend to
    [cache slots, new tokens] (mask (B, T, S + T)); the cache itself is written once, after the
    layer scan, so that XLA can update it in place inside the decode loop."""
    B, T, _ = x.shape
    H, K, E = config.num_heads, config.num_kv_heads, config.head_dim
    h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    attn = layer["attn"]
    q = _linear(h, attn["q"]).reshape(B, T, H, E)
    k = _linear(h, attn["k"]).reshape(B, T, K, E)
    v = _linear(h, attn["v"]).reshape(B, T, K, E)
    q = apply_rope(q, positions, config)
    k = apply_rope(k, positions, config)
    keys, values = k, v
    if past_kv is not None:
        keys = jnp.concatenate([past_kv[0].astype(k.dtype), k], axis=1)
        values = jnp.concatenate([past_kv[1].astype(v.dtype), v], axis=1)
    out = attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
    x = x + _linear(out.reshape(B, T, H * E), attn["o"])
    h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    mlp = layer["mlp"]
    gated = jax.nn.silu(dense(h, mlp["gate"]["kernel"])) * dense(h, mlp["up"]["kernel"])
    x = x + dense(gated, mlp["down"]["kernel"])
    return x, (k, v)


def default_positions(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """RoPE positions from a (B, T) 0/1 mask: count of real tokens before each one (+ start);
    padding slots get the position of the next real token (their value is never used)."""
    real = attention_mask.astype(jnp.int32)
    counts = jnp.cumsum(real, axis=-1) - real
    start = jnp.asarray(start, jnp.int32)
    return counts + (start[:, None] if start.ndim == 1 else start)


def _check_tokens(tokens, config: LlamaConfig) -> None:
    """Rank-2 integer ids in [0, vocab_size) (titans_jax.primitives.check_tokens: a ValueError for
    concrete tokens). Under tracing the values are unknown here; _apply_jit then makes the logits
    of a row holding an out-of-range id NaN instead of reading a clamped embedding."""
    primitives.check_tokens(tokens, config.vocab_size)


def _check_cache_room(cache: Cache, num_tokens: int) -> None:
    """A ValueError when num_tokens do not fit the cache's free slots (concrete caches only;
    under tracing _apply_jit makes the logits NaN instead of overwriting the last slot)."""
    if not isinstance(cache["length"], jax.core.Tracer):
        slots, length = cache["k"].shape[2], int(cache["length"])
        if length > slots:
            raise ValueError(f"the cache overflowed: length {length} > its {slots} slots (tokens "
                             "were written past its capacity under jit; those logits were NaN)")
        free = slots - length
        if num_tokens > free:
            raise ValueError(f"{num_tokens} tokens do not fit the cache: {free} of "
                             f"{cache['k'].shape[2]} slots are free")


def init_cache(config: LlamaConfig, batch_size: int, max_length: int,
               dtype=jnp.float32) -> Cache:
    """An empty KV cache with room for max_length slots per row."""
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch_size, max_length), bool),
            "length": jnp.zeros((), jnp.int32),
            "next_position": jnp.zeros((batch_size,), jnp.int32)}


def apply(params: Params, config: LlamaConfig, tokens: jax.Array, *,
          attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
          cache: Cache | None = None, last_logits_only: bool = False,
          return_hidden: bool = False):
    """Run the decoder on tokens (B, T). Returns (logits (B, T, V) float32, cache).

    attention_mask (B, T): 1 for real tokens, 0 for padding (left padding for prompts). Without a
    cache the keys are these T tokens (causal, padding masked) and the returned cache is None.
    With a cache, the T tokens are written at slots [length, length + T) and attend to every
    real earlier slot; the caller must keep length + T <= the cache's S (generate does).
    positions (B, T) default: real tokens counted from 0 (or from cache["next_position"]).
    Out-of-range token ids and tokens past the cache's capacity raise ValueError; under jit,
    where their values are unknown, they poison the result instead: every logit of a row holding
    an id outside [0, V) is NaN (its cache entries too), and all logits are NaN once
    length + T > S (the returned length keeps counting, so later calls stay NaN).
    last_logits_only: logits of the last slot only, (B, 1, V). return_hidden: also return the
    final-norm hidden states (B, T, D) as a third output.
    """
    tokens = jnp.asarray(tokens)
    _check_tokens(tokens, config)
    check_params(params, config)
    if cache is not None:
        _check_cache_room(cache, tokens.shape[1])
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape "
                             f"{tokens.shape}")
    return _apply_jit(params, config, tokens, attention_mask, positions, cache,
                      last_logits_only, return_hidden)


@functools.partial(jax.jit, static_argnames=("config", "last_logits_only", "return_hidden"))
def _apply_jit(params, config, tokens, attention_mask, positions, cache, last_logits_only,
               return_hidden):
    B, T = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    elif attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape {(B, T)}")
    attention_mask = jnp.asarray(attention_mask)
    real = attention_mask.astype(bool)
    # jnp indexing clamps an out-of-range id to the last row: poison it instead, so the row's
    # keys/values (and any cache they are written to) are NaN as well as its logits.
    in_vocab = (tokens >= 0) & (tokens < config.vocab_size)
    x = params["embed"][tokens]
    x = jnp.where(in_vocab[..., None], x, jnp.nan).astype(x.dtype)
    row_ok = jnp.all(in_vocab, axis=-1)  # (B,)
    layers = params["layers"]

    if cache is None:
        if positions is None:
            positions = default_positions(attention_mask)
        slots = jnp.arange(T)
        mask = _visibility(slots[None, :].repeat(B, 0), slots, real, config)

        def step(h, layer):
            h, _ = _block(h, layer, positions, mask, config)
            return h, None

        x, _ = jax.lax.scan(step, x, layers)
        new_cache = None
    else:
        if cache["k"].shape[1] != B:
            raise ValueError(f"cache batch {cache['k'].shape[1]} != tokens batch {B}")
        S = cache["k"].shape[2]
        if T > S:
            raise ValueError(f"{T} tokens do not fit a cache of {S} slots")
        start = cache["length"]
        if positions is None:
            positions = default_positions(attention_mask, cache["next_position"])
        slots = jnp.arange(S)
        query_slots = jnp.broadcast_to(start + jnp.arange(T), (B, T))
        mask = jnp.concatenate([
            _visibility(query_slots, slots, cache["valid"] & (slots < start)[None], config),
            _visibility(query_slots, start + jnp.arange(T), real, config)], axis=-1)

        def step(h, layer_and_cache):
            layer, ck, cv = layer_and_cache
            return _block(h, layer, positions, mask, config, (ck, cv))

        x, (ks, vs) = jax.lax.scan(step, x, (layers, cache["k"], cache["v"]))
        # dynamic_update_slice would clamp the start and overwrite the last slots: past the
        # capacity every logit is NaN instead.
        row_ok = row_ok & (start + T <= S)
        at = (0, 0, start, 0, 0)
        new_cache = {"k": jax.lax.dynamic_update_slice(cache["k"], ks.astype(cache["k"].dtype), at),
                     "v": jax.lax.dynamic_update_slice(cache["v"], vs.astype(cache["v"].dtype), at),
                     "valid": jax.lax.dynamic_update_slice(cache["valid"], real, (0, start)),
                     "length": start + T,
                     "next_position": cache["next_position"]
                     + attention_mask.astype(jnp.int32).sum(-1)}

    if last_logits_only:
        x = x[:, -1:]
    hidden = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    logits = (hidden @ head).astype(jnp.float32)
    logits = jnp.where(row_ok[:, None, None], logits, jnp.nan)
    hidden = jnp.where(row_ok[:, None, None], hidden, jnp.nan).astype(hidden.dtype)
    if return_hidden:
        return logits, new_cache, hidden
    return logits, new_cache
