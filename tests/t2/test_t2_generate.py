"""KV-cache decoding, batching with left padding, sampling and stop tokens (pure JAX)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t2_jax
from t2_jax import testing

CONFIG = t2_jax.get_config("tiny")
WINDOWED = CONFIG.replace(sliding_window=3, name="tiny-window")


@pytest.fixture(scope="module")
def params():
    return testing.tiny_params(CONFIG)


@pytest.mark.parametrize("config", [CONFIG, WINDOWED], ids=["full", "window3"])
def test_cached_decoding_equals_full_forward(params, config):
    tokens = testing.random_tokens(2, 11, config.vocab_size, seed=0)
    full, _ = t2_jax.apply(params, config, tokens)
    # prefill 4 tokens, then a chunk of 3 (a non-divisor), then one token at a time.
    cache = t2_jax.init_cache(config, 2, 16)
    pieces = []
    logits, cache = t2_jax.apply(params, config, tokens[:, :4], cache=cache)
    pieces.append(logits)
    logits, cache = t2_jax.apply(params, config, tokens[:, 4:7], cache=cache)
    pieces.append(logits)
    for t in range(7, 11):
        logits, cache = t2_jax.apply(params, config, tokens[:, t:t + 1], cache=cache)
        pieces.append(logits)
    assert cache["k"].shape == (config.num_layers, 2, 16, config.num_kv_heads, config.head_dim)
    assert int(cache["length"]) == 11
    with pytest.raises(ValueError, match="do not fit the cache: 5 of 16 slots are free"):
        t2_jax.apply(params, config, tokens[:, :6], cache=cache)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


def test_padded_batch_equals_one_by_one(params):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CONFIG.vocab_size, n) for n in (5, 9, 1)]
    T = max(len(p) for p in prompts)
    tokens = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    batched = t2_jax.generate(params, CONFIG, tokens, mask, max_new_tokens=8)
    padded_logits, _ = t2_jax.apply(params, CONFIG, tokens, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = t2_jax.generate(params, CONFIG, p[None].astype(np.int32), max_new_tokens=8)
        np.testing.assert_array_equal(batched.tokens[i], alone.tokens[0])
        alone_logits, _ = t2_jax.apply(params, CONFIG, p[None].astype(np.int32))
        np.testing.assert_allclose(padded_logits[i, T - len(p):], alone_logits[0], atol=1e-5)
    # the greedy tokens are not all the same, so the comparison above means something
    assert len(np.unique(np.asarray(batched.tokens))) > 3


def test_greedy_generation_is_argmax_of_full_forward(params):
    prompt = testing.random_tokens(1, 4, CONFIG.vocab_size, seed=2)
    out = t2_jax.generate(params, CONFIG, prompt, max_new_tokens=6)
    sequence = prompt
    for _ in range(6):
        logits, _ = t2_jax.apply(params, CONFIG, sequence)
        sequence = np.concatenate([sequence, np.argmax(logits[:, -1:], -1)], axis=1)
    np.testing.assert_array_equal(out.tokens, sequence[:, 4:])
    np.testing.assert_array_equal(out.lengths, [6])


def test_stop_tokens_end_rows_and_pad(params):
    prompts = testing.random_tokens(2, 5, CONFIG.vocab_size, seed=3)
    free = np.asarray(t2_jax.generate(params, CONFIG, prompts, max_new_tokens=10).tokens)
    stop = int(free[0, 3])
    first = int(np.argmax(free[0] == stop))  # first occurrence in row 0 (<= 3)
    pad = CONFIG.vocab_size - 1
    out = t2_jax.generate(params, CONFIG, prompts, max_new_tokens=10, stop_tokens=(stop,),
                          pad_id=pad)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[0, :first + 1], free[0, :first + 1])
    assert np.all(tokens[0, first + 1:] == pad)
    assert int(out.lengths[0]) == first + 1 and bool(out.stopped[0])
    np.testing.assert_array_equal(out.mask[0], np.arange(10) <= first)
    hits = np.flatnonzero(free[1] == stop)
    if hits.size:
        assert int(out.lengths[1]) == hits[0] + 1
    else:
        np.testing.assert_array_equal(tokens[1], free[1])
        assert int(out.lengths[1]) == 10 and not bool(out.stopped[1])


def test_top_p_sampling_distribution():
    logits = jnp.array([[2.0, 1.5, 1.0, 0.0, -1.0]])
    temperature, top_p = 0.7, 0.8
    probs = np.asarray(jax.nn.softmax(logits[0] / temperature))
    order = np.argsort(-probs)
    kept = order[:np.sum(np.cumsum(probs[order]) - probs[order] < top_p)]
    expected = np.zeros(5)
    expected[kept] = probs[kept] / probs[kept].sum()
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: t2_jax.sample_token(logits, k, temperature, top_p)[0])(keys)
    frequency = np.bincount(np.asarray(draws), minlength=5) / len(keys)
    assert 1 < len(kept) < 5
    np.testing.assert_allclose(frequency, expected, atol=0.015)


def test_sampled_generation_is_seeded_and_tiny_top_p_is_greedy(params):
    prompts = testing.random_tokens(2, 4, CONFIG.vocab_size, seed=4)
    greedy = t2_jax.generate(params, CONFIG, prompts, max_new_tokens=6).tokens
    key = jax.random.key(7)
    a = t2_jax.generate(params, CONFIG, prompts, max_new_tokens=6, key=key, temperature=1.0)
    b = t2_jax.generate(params, CONFIG, prompts, max_new_tokens=6, key=key, temperature=1.0)
    c = t2_jax.generate(params, CONFIG, prompts, max_new_tokens=6, key=key, temperature=1.0,
                        top_p=1e-6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(c.tokens, greedy)
    assert not np.array_equal(a.tokens, greedy)


def test_continuation_logprobs_padding_invariant(params):
    prompt = testing.random_tokens(1, 3, CONFIG.vocab_size, seed=5)
    cont = testing.random_tokens(1, 4, CONFIG.vocab_size, seed=6)
    alone = t2_jax.continuation_logprobs(params, CONFIG, prompt, None, cont)
    padded_prompt = np.concatenate([np.zeros((1, 2), np.int32), prompt], axis=1)
    padded_cont = np.concatenate([cont, np.zeros((1, 3), np.int32)], axis=1)
    both = t2_jax.continuation_logprobs(
        params, CONFIG, np.repeat(padded_prompt, 2, 0), np.array([[0, 0, 1, 1, 1]] * 2),
        np.repeat(padded_cont, 2, 0), np.array([[1, 1, 1, 1, 0, 0, 0]] * 2))
    np.testing.assert_allclose(both[:, :4], np.repeat(alone, 2, 0), atol=1e-5)
    assert np.all(np.asarray(both[:, 4:]) == 0) and np.all(np.asarray(alone) < 0)
    grads = jax.grad(lambda p: t2_jax.continuation_logprobs(p, CONFIG, prompt, None, cont).sum())(
        params)
    assert float(jnp.abs(grads["layers"]["mlp"]["up"]["kernel"]).sum()) > 0


def test_bad_inputs_raise_clear_errors(params):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        t2_jax.apply(params, CONFIG, np.array([[1, 128]]))
    with pytest.raises(ValueError, match="shape \\[batch, length\\]"):
        t2_jax.apply(params, CONFIG, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="left padded"):
        t2_jax.generate(params, CONFIG, np.array([[1, 2, 3]]), np.array([[1, 0, 1]]),
                        max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        t2_jax.generate(params, CONFIG, np.array([[1, 2]]), max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="lm_head"):
        t2_jax.check_params(params, CONFIG.replace(tie_embeddings=True))


def test_bfloat16_parameters_run_close_to_float32(params):
    tokens = testing.random_tokens(2, 8, CONFIG.vocab_size, seed=8)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    want, _ = t2_jax.apply(params, CONFIG, tokens)
    got, _ = t2_jax.apply(half, CONFIG, tokens)
    assert got.dtype == jnp.float32
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got - want).max()) < 0.05 * scale
    out = t2_jax.generate(half, CONFIG, tokens, max_new_tokens=3)
    assert out.tokens.shape == (2, 3)


def test_params_of_another_config_are_refused(params):
    other = CONFIG.replace(intermediate_size=96, name="tiny-wide")
    with pytest.raises(ValueError, match=r"layers'\]\['mlp'\]\['down'\]\['kernel'\].*tiny-wide"):
        t2_jax.apply(params, other, np.array([[1, 2]]))


# ---- under jit the eager checks cannot run: bad inputs poison the result with NaN -------------


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    # a GGUF-loaded model (adjacent-pair RoPE, q/k/v biases) must behave the same under jit
    config = CONFIG.replace(attention_bias=True, name="tiny-gguf-jit")
    path = testing.write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "jit.gguf",
                                   testing.tiny_params(config, seed=13), config)
    return t2_jax.load_gguf(path, rope_layout="pairs")


@pytest.fixture(params=["random", "gguf"])
def model(request, params):
    if request.param == "gguf":
        return request.getfixturevalue("gguf_model")
    return params, CONFIG


def test_out_of_range_ids_poison_their_row_under_jit(model):
    params, config = model
    tokens = testing.random_tokens(2, 6, config.vocab_size, seed=10)
    want, _ = t2_jax.apply(params, config, tokens)
    bad, negative = tokens.copy(), tokens.copy()
    bad[0, 3] = config.vocab_size  # would read the clamped last embedding row
    negative[0, 3] = -1
    forward = jax.jit(lambda p, t: t2_jax.apply(p, config, t)[0])
    for ids in (bad, negative):
        got = np.asarray(forward(params, ids))
        assert np.isnan(got[0]).all()
        np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        t2_jax.apply(params, config, bad)  # eagerly: a clear error


def test_decoding_past_the_cache_capacity_is_nan_under_jit(model):
    params, config = model
    tokens = testing.random_tokens(2, 7, config.vocab_size, seed=11)
    full, _ = t2_jax.apply(params, config, tokens)
    step = jax.jit(lambda p, t, c: t2_jax.apply(p, config, t, cache=c))
    logits, cache = step(params, tokens[:, :5], t2_jax.init_cache(config, 2, 6))
    logits, cache = step(params, tokens[:, 5:6], cache)  # the last free slot: exact
    np.testing.assert_allclose(logits[:, 0], full[:, 5], atol=1e-5, rtol=0)
    logits, cache = step(params, tokens[:, 6:7], cache)  # one past: would overwrite slot 5
    assert np.isnan(np.asarray(logits)).all()
    logits, _ = jax.jit(lambda p, c, t: t2_jax.decode_step(p, config, c, t))(
        params, cache, tokens[:, 6])
    assert np.isnan(np.asarray(logits)).all()  # and it stays poisoned
    with pytest.raises(ValueError, match=r"overflowed: length 7 > its 6 slots"):
        t2_jax.decode_step(params, config, cache, tokens[:, 6])  # eagerly: a clear error
    _, full_cache = t2_jax.apply(params, config, tokens[:, :6],
                                 cache=t2_jax.init_cache(config, 2, 6))
    with pytest.raises(ValueError, match="1 tokens do not fit the cache: 0 of 6 slots are free"):
        t2_jax.decode_step(params, config, full_cache, tokens[:, 6])


def test_decode_with_a_short_cache_emits_poisoned_tokens_under_jit(params):
    prompt = testing.random_tokens(1, 4, CONFIG.vocab_size, seed=12)
    first, cache = t2_jax.prefill(params, CONFIG, prompt, np.ones_like(prompt), 6)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="do not fit the cache: 2 of 6 slots are free"):
        t2_jax.decode(params, CONFIG, cache, first, key, 5)
    out = jax.jit(lambda c: t2_jax.decode(params, CONFIG, c, first, key, 5))(cache)
    greedy = t2_jax.generate(params, CONFIG, prompt, max_new_tokens=3).tokens
    np.testing.assert_array_equal(out.tokens[:, :3], greedy)  # slots 4 and 5 were free
    np.testing.assert_array_equal(out.tokens[:, 3:], t2_jax.POISONED)
