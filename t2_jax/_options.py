"""Multiple-choice questions as a policy over their options (Transformer² experts at small scale).

A 135M model's generated letters carry no signal (docs/data.md: it answers one favourite letter),
so a multiple-choice question is scored by the log-likelihood of each option continued after the
prompt ("prompt" + " " + option), normalised, and the policy is the softmax over the options:

    score_i = log p(option_i | prompt) / n_i     n_i = its tokens ("token"), characters ("char")
                                                 or 1 ("sum")
    pi(i | prompt) = softmax_i(score_i)

The model's answer is argmax_i score_i (accuracy); REINFORCE samples i ~ pi and rewards +1 / -1.

Dimension letters: B questions, N option slots (short questions pad with invalid slots), T prompt
tokens (left padded), C option tokens (right padded).

`option_loglik` is the fast path: each prompt is run once into a KV cache, the cache is repeated
for its N options and only the option tokens are run after it. `option_loglik_reference` runs
every "prompt + option" row in full (continuation_logprobs): the slow, obviously-correct twin the
tests compare it with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2_jax._config import LlamaConfig
from t2_jax._generate import continuation_logprobs
from t2_jax._model import Params, apply, init_cache

NORMALISATIONS = ("token", "char", "sum")


@dataclasses.dataclass(frozen=True)
class ChoiceBatch:
    """Tokenised multiple-choice questions (numpy; see the module docstring for the letters)."""

    prompt: np.ndarray         # (B, T) int32, left padded
    prompt_mask: np.ndarray    # (B, T) int32
    options: np.ndarray        # (B, N, C) int32, right padded
    option_mask: np.ndarray    # (B, N, C) int32
    valid: np.ndarray          # (B, N) bool: the slot holds a real option
    chars: np.ndarray          # (B, N) int32: characters of " " + option
    gold: np.ndarray           # (B,) int32

    def __len__(self) -> int:
        return self.prompt.shape[0]


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def encode_choices(tokenizer, examples: Sequence, *, num_options: int | None = None,
                   pad_id: int = 0, multiple: int = 16) -> ChoiceBatch:
    """Tokenise choice examples (t2_jax.TaskExample of kind "choice"). The prompt and each
    " " + option are tokenised separately; lengths are rounded up to `multiple` (and
    num_options fixes N) so that batches of a task share compiled programs."""
    if not examples:
        raise ValueError("encode_choices needs at least one example")
    for example in examples:
        if example.kind != "choice":
            raise ValueError(f"{example.id} is a {example.kind!r} example, not a multiple-choice one")
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    options = [[tokenizer.encode(" " + c) for c in e.choices] for e in examples]
    if any(not p for p in prompts) or any(not o for opts in options for o in opts):
        raise ValueError("an example has an empty prompt or option after tokenisation")
    most = max(len(opts) for opts in options)
    N = most if num_options is None else num_options
    if most > N:
        raise ValueError(f"an example has {most} options, more than num_options={N}")
    B = len(examples)
    T = _bucket(max(map(len, prompts)), multiple)
    C = _bucket(max(len(o) for opts in options for o in opts), 4)
    prompt = np.full((B, T), pad_id, np.int32)
    prompt_mask = np.zeros((B, T), np.int32)
    tokens = np.full((B, N, C), pad_id, np.int32)
    option_mask = np.zeros((B, N, C), np.int32)
    valid = np.zeros((B, N), bool)
    chars = np.ones((B, N), np.int32)
    for b, (p, opts, example) in enumerate(zip(prompts, options, examples)):
        prompt[b, T - len(p):] = p
        prompt_mask[b, T - len(p):] = 1
        for n, (o, text) in enumerate(zip(opts, example.choices)):
            tokens[b, n, :len(o)] = o
            option_mask[b, n, :len(o)] = 1
            valid[b, n] = True
            chars[b, n] = len(" " + text)
    gold = np.asarray([e.gold for e in examples], np.int32)
    return ChoiceBatch(prompt, prompt_mask, tokens, option_mask, valid, chars, gold)


def batch_slices(batch: ChoiceBatch, size: int):
    """The batch in consecutive pieces of `size` questions (the last one padded by repeating its
    first question; `real` says how many are real)."""
    for start in range(0, len(batch), size):
        index = np.arange(start, min(start + size, len(batch)))
        real = len(index)
        index = np.concatenate([index, np.full(size - real, index[0])])
        yield ChoiceBatch(*(getattr(batch, f.name)[index] for f in dataclasses.fields(ChoiceBatch))), real


@functools.partial(jax.jit, static_argnames=("config",))
def option_loglik(params: Params, config: LlamaConfig, prompt, prompt_mask, options, option_mask):
    """(B, N) summed log p(option | prompt) (0 for empty slots); differentiable w.r.t. params.
    The prompt runs once; its cache is shared by the N options (see the module docstring)."""
    B, T = prompt.shape
    N, C = options.shape[1:]
    cache = init_cache(config, B, T + C, params["embed"].dtype)
    last, cache = apply(params, config, prompt, attention_mask=prompt_mask, cache=cache,
                        last_logits_only=True)
    repeat = lambda x, axis: jnp.repeat(x, N, axis=axis)  # noqa: E731 - row b*N + n is (b, n)
    cache = {"k": repeat(cache["k"], 1), "v": repeat(cache["v"], 1), "valid": repeat(cache["valid"], 0),
             "length": cache["length"], "next_position": repeat(cache["next_position"], 0)}
    flat = options.reshape(B * N, C)
    flat_mask = option_mask.reshape(B * N, C)
    logits, _ = apply(params, config, flat, attention_mask=flat_mask, cache=cache)
    predicting = jnp.concatenate([repeat(last, 0), logits[:, :-1]], axis=1)  # (B N, C, V)
    logprobs = jax.nn.log_softmax(predicting.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logprobs, flat[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(flat_mask.astype(bool), picked, 0.0), axis=-1).reshape(B, N)


def option_loglik_reference(params: Params, config: LlamaConfig, batch: ChoiceBatch) -> np.ndarray:
    """The same (B, N) log-likelihoods, one full "prompt + option" row per option."""
    B, N, C = batch.options.shape
    out = np.zeros((B, N), np.float64)
    for n in range(N):
        logprobs = continuation_logprobs(params, config, batch.prompt, batch.prompt_mask,
                                         batch.options[:, n], batch.option_mask[:, n])
        out[:, n] = np.asarray(jnp.sum(logprobs, axis=-1))
    return np.where(batch.valid, out, 0.0)


def normalise(loglik: jax.Array, option_mask, valid, chars, normalisation: str = "token") -> jax.Array:
    """Normalised scores (B, N); -inf in empty slots."""
    if normalisation == "token":
        score = loglik / jnp.maximum(jnp.sum(option_mask, axis=-1), 1)
    elif normalisation == "char":
        score = loglik / jnp.maximum(chars, 1)
    elif normalisation == "sum":
        score = loglik
    else:
        raise ValueError(f"unknown normalisation {normalisation!r}; choose one of {NORMALISATIONS}")
    return jnp.where(valid, score, -jnp.inf)


def option_scores(params: Params, config: LlamaConfig, batch: ChoiceBatch,
                  normalisation: str = "token") -> jax.Array:
    """Normalised option scores (B, N): the policy's logits (-inf in empty slots)."""
    loglik = option_loglik(params, config, jnp.asarray(batch.prompt), jnp.asarray(batch.prompt_mask),
                           jnp.asarray(batch.options), jnp.asarray(batch.option_mask))
    return normalise(loglik, jnp.asarray(batch.option_mask), jnp.asarray(batch.valid),
                     jnp.asarray(batch.chars), normalisation)


def option_policy(scores: jax.Array) -> jax.Array:
    """log pi(i | prompt) (B, N): log-softmax over the real options (-inf in empty slots)."""
    return jax.nn.log_softmax(scores, axis=-1)
