"""The shared LM primitives (titans_jax.primitives) that titans_jax's models and t2_jax's base
models both use: grouped-query attention against repeated heads and a plain softmax, RoPE's two
layouts, the two RMSNorm orders, sampling filters, token checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax import primitives as P


def test_grouped_query_attention_equals_repeated_heads_and_a_plain_softmax():
    rng = np.random.default_rng(0)
    B, T, S, H, K, E = 2, 3, 5, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((B, T, H, E), (B, S, K, E), (B, S, K, E)))
    mask = jnp.asarray(rng.random((B, 1, T, S)) < 0.7).at[:, :, :, 0].set(True).at[1, :, 2].set(False)
    out = np.asarray(P.softmax_attention(q, k, v, mask))
    repeated = P.softmax_attention(q, jnp.repeat(k, H // K, 2), jnp.repeat(v, H // K, 2), mask)
    np.testing.assert_allclose(out, np.asarray(repeated), rtol=1e-6, atol=1e-6)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                visible = np.asarray(mask[b, 0, t])
                if not visible.any():  # a query that sees nothing gets zeros, never NaN
                    assert np.all(out[b, t, h] == 0)
                    continue
                scores = np.asarray(k[b, :, h // 2]) @ np.asarray(q[b, t, h]) / np.sqrt(E)
                weights = np.where(visible, np.exp(scores - scores[visible].max()), 0)
                expected = (weights / weights.sum()) @ np.asarray(v[b, :, h // 2])
                np.testing.assert_allclose(out[b, t, h], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not group"):
        P.softmax_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), mask)


def test_rope_layouts_are_one_map_up_to_a_permutation():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float64 if jax.config.x64_enabled else jnp.float32)
    positions = jnp.asarray(rng.integers(0, 100, (2, 5)))
    inv = P.rope_inverse_frequencies(8, 10000.0)
    half = np.asarray(P.rope(x, positions, inv, "half"))
    order = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # pairs layout -> half layout
    pairs = np.asarray(P.rope(x[..., np.argsort(order)], positions, inv, "pairs"))[..., order]
    np.testing.assert_allclose(pairs, half, rtol=1e-5, atol=1e-5)
    assert np.allclose(np.asarray(P.rope(x, jnp.zeros((2, 5), int), inv)), np.asarray(x))  # position 0: identity
    with pytest.raises(ValueError, match="layout"):
        P.rope(x, positions, inv, "interleaved")


def test_rms_norm_orders_agree_in_float32_and_differ_only_in_rounding_in_bfloat16():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 16)), jnp.float32)
    scale = jnp.linspace(0.5, 1.5, 16)
    a = P.rms_norm(x, scale, 1e-5)
    b = P.rms_norm(x, scale, 1e-5, scale_in_input_dtype=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    expected = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-5) * np.asarray(scale)
    np.testing.assert_allclose(np.asarray(a), expected, rtol=1e-5)
    xb = x.astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(P.rms_norm(xb, scale, 1e-5), np.float32),
                               np.asarray(P.rms_norm(xb, scale.astype(jnp.bfloat16), 1e-5, scale_in_input_dtype=True),
                                          np.float32), rtol=2e-2, atol=2e-2)


def test_sampling_filters():
    logits = jnp.asarray([[3.0, 2.0, 1.0, -5.0]])
    assert int(P.sample(logits, None)[0]) == 0  # greedy needs no key
    keys = jax.random.split(jax.random.key(0), 400)
    top_k = np.asarray(jax.vmap(lambda k: P.sample(logits, k, 1.0, top_k=2))(keys))
    assert set(top_k.ravel().tolist()) == {0, 1}
    top_p = np.asarray(jax.vmap(lambda k: P.sample(logits, k, 1.0, top_p=0.5))(keys))
    assert set(top_p.ravel().tolist()) == {0}  # the most likely id alone holds 0.67 >= 0.5
    with pytest.raises(ValueError, match="PRNG key"):
        P.sample(logits, None, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        P.sample(logits, None, 1.0, top_p=0.0)


def test_token_checks():
    P.check_tokens(np.array([[0, 9]]), 10)
    with pytest.raises(ValueError, match=r"must be in \[0, 10\)"):
        P.check_tokens(np.array([[0, 10]]), 10)
    with pytest.raises(TypeError, match="integer ids"):  # a TypeError and a ValueError alike
        P.check_tokens(np.array([[0.5]]), 10)
    with pytest.raises(ValueError, match="integer ids"):
        P.check_tokens(np.array([[0.5]]), 10)
    with pytest.raises(ValueError, match=r"shape \[batch, length\]"):
        P.check_tokens(np.array([1, 2]), 10)
    with pytest.raises(ValueError, match="at least one position"):
        P.check_tokens(np.zeros((1, 0), int), 10)
