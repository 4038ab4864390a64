"""TNT's local memory (titans_jax.tnt): the batched-periods path, the streaming path and a
per-period reference agree, in float64; an LMM model with it streams exactly; bad configs are
refused. Sequence-sharded equality is in tests/test_sharding.py (slow tier)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax import LMMConfig, MemoryConfig, init_memory_params, memory_apply, models, tnt

PERIOD = 8
CONFIG = MemoryConfig(key_dim=4, value_dim=4, depth=2, chunk_size=4, norm_eps=1e-6)


def _inputs(length: int, seed: int = 0, batch: int = 2, heads: int = 2):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    shape = (batch, heads, length)
    k, v, q = (jax.random.normal(key, shape + (4,), jnp.float64) for key in keys[:3])
    theta = 0.1 * jax.nn.sigmoid(jax.random.normal(keys[3], shape, jnp.float64))
    log_eta = jax.nn.log_sigmoid(jax.random.normal(keys[4], shape, jnp.float64))
    log_keep = jax.nn.log_sigmoid(3.0 + jax.random.normal(keys[5], shape, jnp.float64))
    return k, v, q, theta, log_eta, log_keep


def _per_period_reference(params, inputs, length):
    """Obviously correct: every period a separate memory_apply from M_0, concatenated."""
    outputs = []
    for start in range(0, length, PERIOD):
        piece = tuple(x[:, :, start:start + PERIOD] for x in inputs)
        outputs.append(memory_apply(params, *piece, CONFIG)[0])
    return jnp.concatenate(outputs, axis=2)


_reference = jax.jit(_per_period_reference, static_argnums=2)
_fresh = jax.jit(lambda params, inputs: tnt.fresh_local_memory(params, inputs, CONFIG, PERIOD))
_stream = jax.jit(lambda params, inputs, state, position: tnt.stream_local_memory(params, inputs, CONFIG, PERIOD,
                                                                                   state, position))


@pytest.mark.parametrize("length", [13, 24, pytest.param(8, marks=pytest.mark.slow),
                                    pytest.param(29, marks=pytest.mark.slow)])
def test_batched_periods_and_streaming_equal_separate_periods(length):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), init_memory_params(jax.random.PRNGKey(1), CONFIG, 2))
        inputs = _inputs(length)
        expected = _reference(params, inputs, length)
        fresh, state, position = _fresh(params, inputs)
        np.testing.assert_allclose(np.asarray(fresh), np.asarray(expected), rtol=0, atol=1e-13)
        assert int(position) == length % PERIOD
        # streaming in uneven pieces, from the start of a period
        from titans_jax.memory import init_memory_state

        state = init_memory_state(params, 2, CONFIG)
        position = jnp.zeros((), jnp.int32)
        pieces = []
        for start, end in ((0, 3), (3, 4), (4, 11), (11, length)):
            if start >= length:
                break
            piece = tuple(x[:, :, start:min(end, length)] for x in inputs)
            out, state, position = _stream(params, piece, state, position)
            pieces.append(out)
        np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=2)), np.asarray(expected), rtol=0,
                                   atol=1e-13)
        assert int(position) == length % PERIOD


def test_a_tnt_model_streams_exactly_and_its_local_memory_matters():
    with jax.enable_x64(True):
        config = models.ModelConfig(arch="lmm", vocab_size=64, d_model=32, num_heads=2, head_dim=16,
                                    mlp_hidden=64, num_layers=1, num_persistent=3, dtype="float64", param_dtype="float64")
        config = config.replace({"lmm.memory.chunk_size": 8, "lmm.local_period": 8, "lmm.local_chunk_size": 4})
        model = models.TitansLM(config)
        params = models.init_params(config, jax.random.PRNGKey(0))
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 29), 0, 64)
        apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
        full = apply(params, tokens)
        cache = models.init_cache(model, params, 2)
        step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c))
        pieces = []
        for start, end in ((0, 5), (5, 19), (19, 29)):  # across period (8) and chunk (4, 8) boundaries
            logits, cache = step(params, tokens[:, start:end], cache)
            pieces.append(logits)
        assert float(jnp.max(jnp.abs(jnp.concatenate(pieces, axis=1) - full))) <= 1e-12
        zeroed = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.zeros_like(x) if "local_memory" in jax.tree_util.keystr(path) else x, params)
        assert float(jnp.max(jnp.abs(apply(zeroed, tokens) - full))) > 1e-3
        grads = jax.grad(lambda p: jnp.sum(apply(p, tokens)[:, -1]))(params)
        local = grads["block_0"]["memory"]["local_memory"]["layers"][0]["w"]
        assert float(jnp.max(jnp.abs(local))) > 0


def test_bad_tnt_configs_are_refused():
    with pytest.raises(ValueError, match="multiple of local_chunk_size"):
        LMMConfig(local_period=12, local_chunk_size=8)
    with pytest.raises(ValueError, match="local_period must be an integer >= 0"):
        LMMConfig(local_period=-1)
