"""Batched generation with a KV cache, and log-probabilities of given continuations.

Dimension letters: B batch, T prompt length (left padded), N new tokens, C continuation length
(right padded), V vocabulary, S cache slots (= T + N).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2_jax._config import LlamaConfig
from titans_jax import primitives
from t2_jax._model import (Cache, Params, _check_cache_room, _check_tokens, apply, check_params,
                           init_cache)

POISONED = -1  # the token decode emits where the logits are NaN (poisoned: see apply)


class Generation(NamedTuple):
    tokens: jax.Array   # (B, N) int32; after a stop token (kept) the row holds pad_id; -1
                        # (POISONED) where the logits were NaN (an out-of-range id under jit)
    lengths: jax.Array  # (B,) int32: generated tokens per row, the stop token included
    stopped: jax.Array  # (B,) bool: the row emitted a stop token

    @property
    def mask(self) -> jax.Array:
        """(B, N) int32: 1 for generated tokens (stop token included), 0 for padding; the
        continuation_mask to score these tokens with continuation_logprobs."""
        steps = jnp.arange(self.tokens.shape[1])
        return (steps[None, :] < self.lengths[:, None]).astype(jnp.int32)


def sample_token(logits: jax.Array, key: jax.Array | None, temperature: float = 0.0,
                 top_p: float = 1.0) -> jax.Array:
    """Next token ids (B,) from logits (B, V) (titans_jax.primitives.sample).

    temperature 0: greedy (argmax). Otherwise sample softmax(logits / temperature) restricted
    to the nucleus: the most likely tokens whose probabilities sum to at least top_p (the
    first token is always kept; tokens tied with the last kept one are kept too).
    """
    return primitives.sample(logits, key, temperature, top_p=top_p)


@functools.partial(jax.jit, static_argnames=("config", "max_length", "cache_dtype"))
def prefill(params: Params, config: LlamaConfig, tokens: jax.Array, attention_mask: jax.Array,
            max_length: int, cache_dtype=None) -> tuple[jax.Array, Cache]:
    """Run the (left-padded) prompt into a fresh cache of max_length slots.
    Returns (logits of the last position (B, V), cache)."""
    dtype = cache_dtype or params["embed"].dtype
    cache = init_cache(config, tokens.shape[0], max_length, dtype)
    logits, cache = apply(params, config, tokens, attention_mask=attention_mask, cache=cache,
                          last_logits_only=True)
    return logits[:, 0], cache


def decode_step(params: Params, config: LlamaConfig, cache: Cache,
                tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """One token per row (B,) into the cache. Returns (next-token logits (B, V), cache).
    A full cache or an out-of-range id is a ValueError (NaN logits under jit, see apply)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"decode_step takes one token per row, shape (batch,), got {tokens.shape}")
    _check_tokens(tokens[:, None], config)
    _check_cache_room(cache, 1)
    return _decode_step(params, config, cache, tokens)


@functools.partial(jax.jit, static_argnames=("config",))
def _decode_step(params, config, cache, tokens):
    logits, cache = apply(params, config, tokens[:, None], cache=cache)
    return logits[:, 0], cache


def _sample_or_poisoned(logits, key, temperature, top_p):
    token = sample_token(logits, key, temperature, top_p)
    return jnp.where(jnp.any(jnp.isnan(logits), axis=-1), POISONED, token)


def decode(params: Params, config: LlamaConfig, cache: Cache, first_logits: jax.Array,
           key: jax.Array, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           stop_tokens: tuple[int, ...] = (), pad_id: int = 0) -> Generation:
    """The decode loop (one lax.while_loop; stops early once every row has stopped). The cache
    must have room for max_new_tokens - 1 more tokens (ValueError otherwise, NaN logits and
    POISONED tokens under jit); a row whose logits are NaN emits POISONED (-1)."""
    _check_cache_room(cache, max_new_tokens - 1)
    return _decode(params, config, cache, first_logits, key, max_new_tokens, temperature, top_p,
                   stop_tokens, pad_id)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_p",
                                             "stop_tokens", "pad_id"))
def _decode(params, config, cache, first_logits, key, max_new_tokens, temperature, top_p,
            stop_tokens, pad_id):
    B = first_logits.shape[0]
    stops = jnp.asarray(stop_tokens, jnp.int32)
    keys = jax.random.split(key, max_new_tokens)

    def is_stop(tok):  # (POISONED is no stop token: a poisoned row keeps emitting it)
        if not stop_tokens:
            return jnp.zeros(tok.shape, bool)
        return jnp.any(tok[:, None] == stops[None, :], axis=-1)

    first = _sample_or_poisoned(first_logits, keys[0], temperature, top_p)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    stopped = is_stop(first)
    lengths = jnp.ones((B,), jnp.int32)

    def cond(carry):
        step, _, _, _, stopped, _ = carry
        return (step < max_new_tokens) & ~jnp.all(stopped)

    def body(carry):
        step, cache, previous, out, stopped, lengths = carry
        logits, cache = apply(params, config, previous[:, None], cache=cache)
        token = _sample_or_poisoned(logits[:, 0], keys[step], temperature, top_p)
        token = jnp.where(stopped, pad_id, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        lengths = lengths + (~stopped).astype(jnp.int32)
        stopped = stopped | is_stop(token)
        return step + 1, cache, token, out, stopped, lengths

    carry = (jnp.asarray(1, jnp.int32), cache, first, out, stopped, lengths)
    _, _, _, out, stopped, lengths = jax.lax.while_loop(cond, body, carry)
    return Generation(out, lengths, stopped)


def generate(params: Params, config: LlamaConfig, prompt_tokens, prompt_mask=None, *,
             max_new_tokens: int, key: jax.Array | None = None, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0,
             cache_dtype=None) -> Generation:
    """Generate up to max_new_tokens per row after left-padded prompts (B, T).

    prompt_mask (B, T): 1 for real tokens, 0 for left padding (default: all real). Greedy when
    temperature == 0, else temperature / top-p sampling with `key`. A row stops after emitting
    any of stop_tokens; later positions hold pad_id.
    """
    prompt_tokens = jnp.asarray(prompt_tokens)
    _check_tokens(prompt_tokens, config)
    check_params(params, config)
    B, T = prompt_tokens.shape
    if prompt_mask is None:
        prompt_mask = jnp.ones((B, T), jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if prompt_mask.shape != (B, T):
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompt shape {(B, T)}")
    mask_np = np.asarray(prompt_mask)
    if np.any(np.diff(mask_np, axis=1) < 0):
        raise ValueError("prompts must be left padded: a 0 in prompt_mask follows a 1")
    if np.any(mask_np.sum(1) == 0):
        raise ValueError("every prompt needs at least one real token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if key is None:
        key = jax.random.key(0)
    first_logits, cache = prefill(params, config, prompt_tokens, prompt_mask,
                                  T + max_new_tokens, cache_dtype)
    return decode(params, config, cache, first_logits, key, max_new_tokens, float(temperature),
                  float(top_p), tuple(int(t) for t in stop_tokens), int(pad_id))


@functools.partial(jax.jit, static_argnames=("config",))
def _continuation_logprobs(params, config, prompt, prompt_mask, continuation, continuation_mask):
    T = prompt.shape[1]
    tokens = jnp.concatenate([prompt, continuation], axis=1)
    mask = jnp.concatenate([prompt_mask, continuation_mask], axis=1)
    logits, _ = apply(params, config, tokens, attention_mask=mask)
    predicting = logits[:, T - 1:-1]  # position T-1+j predicts continuation[j]
    logprobs = jax.nn.log_softmax(predicting, axis=-1)
    picked = jnp.take_along_axis(logprobs, continuation[..., None], axis=-1)[..., 0]
    return jnp.where(continuation_mask.astype(bool), picked, 0.0)


def continuation_logprobs(params: Params, config: LlamaConfig, prompt_tokens, prompt_mask,
                          continuation_tokens, continuation_mask=None) -> jax.Array:
    """log p(continuation[j] | prompt, continuation[:j]) for each j: (B, C) float32, 0 where
    continuation_mask is 0. Prompts are left padded (B, T), continuations right padded (B, C).
    Differentiable w.r.t. params (REINFORCE, scoring of options)."""
    prompt_tokens = jnp.asarray(prompt_tokens)
    continuation_tokens = jnp.asarray(continuation_tokens)
    _check_tokens(prompt_tokens, config)
    _check_tokens(continuation_tokens, config)
    check_params(params, config)
    if prompt_mask is None:
        prompt_mask = jnp.ones(prompt_tokens.shape, jnp.int32)
    if continuation_mask is None:
        continuation_mask = jnp.ones(continuation_tokens.shape, jnp.int32)
    if prompt_tokens.shape[0] != continuation_tokens.shape[0]:
        raise ValueError("prompt and continuation batch sizes differ")
    if jnp.shape(prompt_mask) != prompt_tokens.shape or (
            jnp.shape(continuation_mask) != continuation_tokens.shape):
        raise ValueError("masks must have the shapes of their tokens")
    return _continuation_logprobs(params, config, prompt_tokens,
                                  jnp.asarray(prompt_mask, jnp.int32),
                                  continuation_tokens, jnp.asarray(continuation_mask, jnp.int32))
