"""One call shape for every architecture: `model.apply(v, tokens, cache) -> (logits, cache)` for
any T >= 1 equals the parallel (training) pass, for any split of a sequence into calls, in
float64; the memory core's one-token path is the recurrence at constant cost; full attention
refuses a context beyond its cache; bad caches and inputs give clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax import memory as mem
from titans_jax.models import TitansLM, full_attention_capacity, init_cache
from titans_jax.testing import max_absolute_difference, random_memory_inputs, random_memory_params

from tiny_lm import ARCHS, LENGTH, Tiny, model_getter
from tiny_lm import arch_params as _arch_params

# code paths of mac / lmm / mag with other settings (swa's attention cache runs inside mag)
SLOW = {"mac_learned", "mac_block_input", "ttt", "linear", "mal", "swa"}
# Calls of 5, 1, 1, 5, 1, 5, 1, 1, 1 tokens: T = 1 steps mixed in, calls that cross chunk (4)
# and segment (8) boundaries, calls that start on them; two call shapes to compile.
SPLITS = [5, 1, 1, 5, 1, 5, 1, 1, 1]


def arch_params(names):
    return _arch_params(names, SLOW)


@pytest.fixture(scope="module")
def tiny_models():
    with jax.enable_x64(True):
        yield model_getter()


@pytest.mark.parametrize("name", arch_params(ARCHS))
def test_streaming_calls_equal_the_parallel_pass(tiny_models, name):
    """One call over the whole sequence, and calls of mixed sizes (single tokens among them)
    across chunk and segment boundaries, reproduce the training pass's logits."""
    with jax.enable_x64(True):
        tiny = tiny_models(name)
        full = tiny.forward(tiny.params, tiny.tokens)
        for splits in ([LENGTH], SPLITS):
            logits, cache = tiny.stream(splits)
            np.testing.assert_allclose(logits, full, rtol=1e-10, atol=1e-10, err_msg=str(splits))
            assert int(cache["position"]) == tiny.config.prefix_length + LENGTH


@pytest.mark.parametrize("name", ["mac", pytest.param("lmm", marks=pytest.mark.slow)])
def test_one_token_at_a_time_equals_the_parallel_pass(tiny_models, name):
    """Pure decoding from the empty cache: every token through the T = 1 path."""
    with jax.enable_x64(True):
        tiny = tiny_models(name)
        full = tiny.forward(tiny.params, tiny.tokens)
        logits, _ = tiny.stream([1] * LENGTH)
        np.testing.assert_allclose(logits, full, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mac", "mag", "transformer"])
@pytest.mark.parametrize("chunk,segment,splits", [(1, 3, [2, 7, 1, 11]), (3, 6, [4, 1, 13, 3]),
                                                  (5, 10, [1, 12, 2, 6])])
def test_streaming_with_other_chunk_and_segment_sizes(name, chunk, segment, splits):
    """Chunk 1 (plain online gradient descent) and non-divisor chunk / segment sizes."""
    with jax.enable_x64(True):
        tiny = Tiny(name, segment_size=segment, **{"lmm.memory.chunk_size": chunk})
        full = tiny.forward(tiny.params, tiny.tokens)
        np.testing.assert_allclose(tiny.stream(splits)[0], full, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "associative"])
def test_streaming_with_the_other_memory_implementations(impl):
    with jax.enable_x64(True):
        tiny = Tiny("mag", **{"lmm.memory.impl": impl})
        full = tiny.forward(tiny.params, tiny.tokens)
        np.testing.assert_allclose(tiny.stream(SPLITS)[0], full, rtol=1e-10, atol=1e-10)


def test_logits_only_where_asked(tiny_models):
    """logits_at='last' gives the next-token logits only, 'none' none; the cache is the same."""
    with jax.enable_x64(True):
        tiny = tiny_models("mag")
        full = tiny.forward(tiny.params, tiny.tokens)
        cache = tiny.empty_cache()
        last, cache_last = tiny.call_last(tiny.params, tiny.tokens[:, :5], cache)
        assert last.shape == (2, 1, tiny.config.vocab_size)
        np.testing.assert_allclose(last[:, 0], full[:, 4], rtol=1e-10, atol=1e-10)
        nothing, cache_none = tiny.call_none(tiny.params, tiny.tokens[:, :5], cache)
        assert nothing is None
        assert max_absolute_difference(cache_none, cache_last) == 0
        logits, _ = tiny.call(tiny.params, tiny.tokens[:, 5:10], cache_none)
        np.testing.assert_allclose(logits, full[:, 5:10], rtol=1e-10, atol=1e-10)
        # training with logits_at: the same pass, fewer logits
        swa = tiny_models("swa")
        train = jax.jit(lambda p, t: swa.model.apply({"params": p}, t, logits_at="last"))
        np.testing.assert_allclose(train(swa.params, swa.tokens), swa.forward(swa.params, swa.tokens)[:, -1:],
                                   rtol=1e-12, atol=1e-12)
        no_logits = jax.eval_shape(lambda p: swa.model.apply({"params": p}, swa.tokens, logits_at="none"), swa.params)
        assert no_logits is None
        with pytest.raises(ValueError, match="unknown logits_at"):
            swa.model.apply({"params": swa.params}, swa.tokens, logits_at="first")


@pytest.mark.parametrize("name", ["mac", "mag", "lmm", "swa"])
def test_bounded_caches_do_not_grow_with_the_context(tiny_models, name):
    """Every leaf of a MAC / MAG / LMM / SWA cache has the same shape whatever max_len says, and
    a call keeps those shapes."""
    with jax.enable_x64(True):
        tiny = tiny_models(name)
        small = jax.eval_shape(lambda p: init_cache(tiny.model, p, 2), tiny.params)
        huge = jax.eval_shape(lambda p: init_cache(tiny.model, p, 2, 2 ** 31 - 1), tiny.params)
        after = jax.eval_shape(lambda p, t: tiny.model.apply({"params": p}, t, init_cache(tiny.model, p, 2))[1],
                               tiny.params, jax.ShapeDtypeStruct((2, 1000), jnp.int32))
        for other in (huge, after):
            assert jax.tree.structure(other) == jax.tree.structure(small)
            for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(other), strict=True):
                assert (a.shape, a.dtype) == (b.shape, b.dtype)
        assert full_attention_capacity(tiny.config, small) is None


def test_full_attention_refuses_a_context_beyond_its_cache(tiny_models):
    """Eagerly a clear error; under jit (no eager check possible) NaN logits, never a wrapped
    context; exactly max_len tokens fit."""
    with jax.enable_x64(True):
        tiny = tiny_models("transformer")
        with pytest.raises(ValueError, match="give max_len"):
            init_cache(tiny.model, tiny.params, 2)
        cache = tiny.empty_cache(max_len=6)
        assert full_attention_capacity(tiny.config, cache) == 6
        apply = lambda tokens, cache: tiny.model.apply({"params": tiny.params}, tokens, cache)  # noqa: E731
        with pytest.raises(ValueError, match="holds 6 tokens and has seen 0: 7 more do not fit"):
            apply(tiny.tokens[:, :7], cache)
        logits, cache = apply(tiny.tokens[:, :4], cache)
        with pytest.raises(ValueError, match="has seen 4: 3 more do not fit"):
            apply(tiny.tokens[:, 4:7], cache)
        full = tiny.forward(tiny.params, tiny.tokens[:, :6])
        last, jit_cache = tiny.call(tiny.params, tiny.tokens[:, 4:6], cache)  # exactly full: fine
        np.testing.assert_allclose(last, full[:, 4:6], rtol=1e-10, atol=1e-10)
        over, _ = tiny.call(tiny.params, tiny.tokens[:, 6:7], jit_cache)  # under jit: poisoned
        assert bool(jnp.all(jnp.isnan(over)))
        over, _ = tiny.call(tiny.params, tiny.tokens[:, 3:6], cache)  # 4 + 3 > 6, traced position
        assert bool(jnp.all(jnp.isnan(over)))


def test_bad_caches_and_inputs_give_clear_errors(tiny_models):
    with jax.enable_x64(True):
        mac, mag = tiny_models("mac"), tiny_models("mag")
        def apply(tiny, tokens, cache, **kw):
            return tiny.model.apply({"params": tiny.params}, tokens, cache, **kw)

        cache = mac.empty_cache()
        token = mac.tokens[:, :1]
        with pytest.raises(ValueError, match="at least one position"):  # T = 0
            apply(mac, jnp.zeros((2, 0), jnp.int32), cache)
        with pytest.raises(ValueError, match=r"cache entry .* for 1 sequences"):
            apply(mac, token[:1], cache)  # another batch size
        with pytest.raises(ValueError, match=r"cache entry .* for 1 sequences"):
            mac.call(mac.params, token[:1], cache)  # the check runs on shapes, so under jit too
        with pytest.raises(ValueError, match="does not fit this mac model"):
            apply(mac, token, mag.empty_cache())  # another architecture
        other = TitansLM(mac.config.replace(segment_size=4))  # another config of the same architecture
        with pytest.raises(ValueError, match="cache entry"):
            other.apply({"params": mac.params}, token, cache)
        with pytest.raises(TypeError, match="dict made by init_cache"):
            apply(mac, token, cache["layers"])
        with pytest.raises(ValueError, match="holds 1 layers"):
            apply(mac, token, {**cache, "layers": cache["layers"][:1]})
        for bad in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match="positive integer batch"):
                init_cache(mac.model, mac.params, bad)
        with pytest.raises(ValueError, match="max_len must be a positive integer"):
            init_cache(mac.model, mac.params, 2, 0)


# ----------------------------------------------------------------------------------------------
# The memory core: one token costs O(1), and equals the parallel pass

KEY_DIM = 6


def memory_stream(config, params, inputs, splits):
    step = jax.jit(functools.partial(mem.memory_apply, config=config))
    state, outs, start = None, [], 0
    for size in splits:
        out, state = step(params, *[x[:, :, start:start + size] for x in inputs], state=state)
        outs.append(out)
        start += size
    return jnp.concatenate(outs, axis=2), state


TOKEN_CASES = [("chunked", 3), ("associative", 1), ("reference", 16)]  # every impl, chunk 1 and a non-divisor
SLOW_TOKEN_CASES = [pytest.param(i, c, marks=pytest.mark.slow)
                    for i in mem.IMPLEMENTATIONS for c in (1, 3, 16) if (i, c) not in TOKEN_CASES]


@pytest.mark.parametrize("impl,chunk_size", TOKEN_CASES + SLOW_TOKEN_CASES)
def test_memory_token_path_equals_the_parallel_pass(impl, chunk_size):
    """Two tokens to start a state, then one token per call (the constant-cost path) across
    chunk boundaries (3: a non-divisor of 11; 16: longer than the sequence), against one fresh
    parallel call of the same implementation: outputs and the final state."""
    length = 11
    with jax.enable_x64(True):
        config = mem.MemoryConfig(key_dim=KEY_DIM, value_dim=KEY_DIM, depth=2, expansion=2, chunk_size=chunk_size,
                                  impl=impl, use_bias=True)
        params = random_memory_params(config)
        inputs = random_memory_inputs(2, length, key_dim=KEY_DIM)
        whole, whole_state = jax.jit(functools.partial(mem.memory_apply, config=config))(params, *inputs)
        tokens, tokens_state = memory_stream(config, params, inputs, [2] + [1] * (length - 2))
    assert max_absolute_difference(tokens, whole) < 1e-12
    assert max_absolute_difference(tokens_state, whole_state) < 1e-12
    assert int(whole_state.num_pending) == length % chunk_size


@pytest.mark.parametrize("impl", ["chunked"] + [pytest.param(i, marks=pytest.mark.slow)
                                                for i in ("reference", "associative")])
def test_memory_num_valid_ignores_the_tokens_after_it(impl):
    """num_valid = n: outputs of the first n tokens and the state equal a call on those n only."""
    with jax.enable_x64(True):
        config = mem.MemoryConfig(key_dim=KEY_DIM, value_dim=KEY_DIM, depth=2, expansion=2, chunk_size=3, impl=impl)
        params = random_memory_params(config)
        inputs = random_memory_inputs(5, 12, key_dim=KEY_DIM)
        masked = jax.jit(functools.partial(mem.memory_apply, config=config))
        _, state = masked(params, *[x[:, :, :4] for x in inputs])  # 1 pending token
        rest = [x[:, :, 4:] for x in inputs]
        _, want_state = masked(params, *[x[:, :, :2] for x in rest], state=state)
        assert max_absolute_difference(masked(params, *rest, state=state, num_valid=jnp.int32(0))[1], state) < 1e-12
        for n in (2, 5):  # 1 + 2 ends inside a chunk, 1 + 5 on a boundary
            out, new_state = masked(params, *rest, state=state, num_valid=jnp.int32(n))
            want, want_state = masked(params, *[x[:, :, :n] for x in rest], state=state)
            assert max_absolute_difference(out[:, :, :n], want) < 1e-12
            assert max_absolute_difference(new_state, want_state) < 1e-12


def test_memory_decode_cost_does_not_depend_on_the_chunk_size():
    """The compiled one-token call does the same work (XLA's flop count) at chunk sizes 4 and 64,
    while a 2-token call, which lays out whole chunks, grows with the chunk."""
    flops = {}
    for chunk_size in (4, 64):
        config = mem.MemoryConfig(key_dim=16, value_dim=16, depth=2, chunk_size=chunk_size)
        params = mem.init_memory_params(jax.random.PRNGKey(0), config, 2)
        state = mem.init_memory_state(params, 1, config)
        for length in (1, 2):
            inputs = random_memory_inputs(0, length, batch=1, key_dim=16, dtype=jnp.float32)
            compiled = jax.jit(functools.partial(mem.memory_apply, config=config)).lower(
                params, *inputs, state=state).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops[chunk_size, length] = cost["flops"]
    assert flops[4, 1] == flops[64, 1] > 0
    assert flops[64, 2] > 4 * flops[4, 2]
