"""Token-by-token generation over the explicit caches of titans_jax.models (`generate` is
re-exported as titans_jax.generate).

`generate` makes an empty cache, runs the prompt through it in one call (next-token logits
only) and then one `lax.scan` of one-token calls, all under one jit; the cache has the same
shapes at every step. temperature == 0 is greedy decoding; otherwise logits are divided by the
temperature and optionally restricted to the top_k before sampling.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from titans_jax import primitives
from titans_jax.models import TitansLM, check_tokens, init_cache

Array = jax.Array


def prefill(model: TitansLM, params, tokens: Array, max_len: int | None = None, *, logits_at: str = "all"):
    """(logits, cache) for a prompt [B, T] from an empty cache; max_len (tokens in all) is
    needed only by full attention."""
    cache = init_cache(model, params, tokens.shape[0], max_len)
    return model.apply({"params": params}, tokens, cache, logits_at=logits_at)


def decode_step(model: TitansLM, params, token: Array, cache: dict):
    """(logits [B, 1, V], cache) for the next token [B, 1]."""
    return model.apply({"params": params}, token, cache)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def _generate(model, params, prompt, rng, max_new_tokens, temperature, top_k):
    logits, cache = prefill(model, params, prompt, prompt.shape[1] + max_new_tokens, logits_at="last")
    rng, first_rng = jax.random.split(rng)
    first = primitives.sample(logits[:, -1], first_rng, temperature, top_k=top_k)

    def step(carry, step_rng):
        token, cache = carry
        logits, cache = decode_step(model, params, token[:, None], cache)
        next_token = primitives.sample(logits[:, 0], step_rng, temperature, top_k=top_k)
        return (next_token, cache), (token, logits[:, 0])

    (_, _), (tokens, step_logits) = jax.lax.scan(step, (first, cache), jax.random.split(rng, max_new_tokens))
    return tokens.T, step_logits.transpose(1, 0, 2)


def generate(model: TitansLM, params, prompt: Array, max_new_tokens: int, *, rng: Array | None = None,
             temperature: float = 0.0, top_k: int | None = None) -> tuple[Array, Array]:
    """Continue `prompt` [B, T] by max_new_tokens tokens.

    Returns (new tokens [B, max_new_tokens], the logits each decode step produced
    [B, max_new_tokens, V] — the logits after feeding the i-th new token, so that one parallel
    pass over prompt ++ new tokens reproduces them at positions T .. T + max_new_tokens - 1).
    """
    check_tokens(prompt, model.config.vocab_size)
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float, np.floating)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool)):
        raise ValueError(f"top_k must be an integer or None, got {top_k!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 0 < top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, {model.config.vocab_size}], got {top_k}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(model, params, jnp.asarray(prompt, jnp.int32), rng, max_new_tokens, float(temperature), top_k)
