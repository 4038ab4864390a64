"""The float64 tiny models that tests/test_models.py and tests/test_streaming.py share: one
config per architecture, its parameters and jitted entry points (parallel pass and streaming calls)."""

import jax
import jax.numpy as jnp
import pytest

from titans_jax.models import ModelConfig, TitansLM, init_cache
from titans_jax.presets import VARIANTS

LENGTH = 21  # > two MAC segments of 8, not a multiple of the segment (8) or the chunk (4)
TINY = dict(vocab_size=50, d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_hidden=48, window=6,
            segment_size=8, num_persistent=2, attention_block=8, num_learned_queries=3, **{"lmm.memory.chunk_size": 4})
ARCHS = {
    "transformer": {}, "swa": {}, "lmm": {}, "mac": {}, "mag": {}, "mal": {},
    "mac_learned": dict(arch="mac", mac_retrieval="learned"),
    "mac_block_input": dict(arch="mac", mac_write="block_input"),
    "ttt": VARIANTS["ttt"], "linear": VARIANTS["linear"],
}


def tiny_config(name: str, **overrides) -> ModelConfig:
    fields = dict(TINY, arch=name, dtype="float64", param_dtype="float64")
    fields.update(ARCHS[name])
    fields.update(overrides)
    return ModelConfig().replace(fields)


def arch_params(names, slow):
    """pytest params of architecture names, those in `slow` marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


class Tiny:
    """A float64 tiny model, its parameters and jitted entry points shared by the tests."""

    def __init__(self, name: str, **overrides):
        self.config = tiny_config(name, **overrides)
        self.model = TitansLM(self.config)
        self.tokens = jax.random.randint(jax.random.PRNGKey(1), (2, LENGTH), 0, self.config.vocab_size)
        self.params = jax.jit(self.model.init)(jax.random.PRNGKey(0), self.tokens)["params"]
        self.forward = jax.jit(lambda p, t: self.model.apply({"params": p}, t))
        self.call = jax.jit(lambda p, t, c: self.model.apply({"params": p}, t, c))
        self.call_last = jax.jit(lambda p, t, c: self.model.apply({"params": p}, t, c, logits_at="last"))
        self.call_none = jax.jit(lambda p, t, c: self.model.apply({"params": p}, t, c, logits_at="none"))

    def empty_cache(self, batch=2, max_len=LENGTH):
        return init_cache(self.model, self.params, batch, max_len)

    def stream(self, splits, tokens=None):
        tokens = self.tokens if tokens is None else tokens
        cache, outputs, start = self.empty_cache(tokens.shape[0]), [], 0
        for size in splits:
            logits, cache = self.call(self.params, tokens[:, start:start + size], cache)
            outputs.append(logits)
            start += size
        assert start == tokens.shape[1]
        return jnp.concatenate(outputs, axis=1), cache


def model_getter():
    """name -> Tiny, each built once (for a module-scoped fixture, under jax.enable_x64)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = Tiny(name)
        return built[name]

    return get
