"""The attention paths agree with a dense masked reference: blocked parallel (forward and
gradients) and one-token decoding over the ring-buffer cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax import attention as attn


def _qkv(length, seed=0, batch=2, heads=2, head_dim=4, dtype=jnp.float64):
    r = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(k, (batch, length, heads, head_dim), dtype) for k in r)


@pytest.mark.parametrize("window,num_prefix,block", [(None, 0, 4), (None, 3, 5), (3, 0, 4), (5, 2, 4), (7, 3, 16), (1, 2, 3)])
def test_blocked_attention_matches_dense_reference(window, num_prefix, block):
    with jax.enable_x64(True):
        q, k, v = _qkv(13)
        ours = attn.blocked_attention(q, k, v, window=window, num_prefix=num_prefix, block_size=block)
        ref = attn.attention_reference(q, k, v, window=window, num_prefix=num_prefix)
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_blocked_attention_gradients_match_reference():
    with jax.enable_x64(True):
        q, k, v = _qkv(11, seed=1)
        weights = jax.random.normal(jax.random.PRNGKey(5), q.shape, jnp.float64)

        def loss(fn):
            return lambda q, k, v: jnp.sum(weights * fn(q, k, v))

        blocked = lambda q, k, v: attn.blocked_attention(q, k, v, window=4, num_prefix=2, block_size=3)  # noqa: E731
        dense = lambda q, k, v: attn.attention_reference(q, k, v, window=4, num_prefix=2)  # noqa: E731
        ours = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
        ref = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("window,num_prefix,prefill", [(None, 0, 1), (4, 2, 3), (3, 0, 5)])
def test_decode_over_ring_cache_matches_reference(window, num_prefix, prefill):
    with jax.enable_x64(True):
        length = 14
        q, k, v = _qkv(length, seed=2)
        ref = attn.attention_reference(q, k, v, window=window, num_prefix=num_prefix)
        capacity = window if window is not None else length - num_prefix
        cache = attn.cache_from_prefill(k[:, :prefill], v[:, :prefill], num_prefix=num_prefix, capacity=capacity)
        step = jax.jit(lambda q, k, v, cache, pos: attn.decode_attention(q, k, v, cache, pos, window=window))
        for pos in range(prefill, length):
            out, cache = step(q[:, pos:pos + 1], k[:, pos:pos + 1], v[:, pos:pos + 1], cache, jnp.int32(pos))
            np.testing.assert_allclose(out[:, 0], ref[:, pos], rtol=1e-12, atol=1e-12)


def test_rope_preserves_norms_and_depends_on_relative_position_only():
    with jax.enable_x64(True):
        q, k, _ = _qkv(6, seed=3)
        positions = jnp.arange(6)
        rq, rk = attn.rope(q, positions), attn.rope(k, positions)
        np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-12)
        shifted_q, shifted_k = attn.rope(q, positions + 37), attn.rope(k, positions + 37)
        np.testing.assert_allclose(jnp.einsum("bthe,bshe->bhts", rq, rk),
                                   jnp.einsum("bthe,bshe->bhts", shifted_q, shifted_k), rtol=1e-10, atol=1e-12)


def test_attention_rejects_bad_window_and_shapes():
    q, k, v = (jnp.ones((1, 4, 2, 4)),) * 3
    with pytest.raises(ValueError, match="window must be positive"):
        attn.blocked_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="do not match"):
        attn.blocked_attention(q, k[:, :3], v, window=None)
    with pytest.raises(ValueError, match="even head dim"):
        attn.rope(jnp.ones((1, 2, 1, 3)), jnp.arange(2))


@pytest.mark.parametrize("window", [None, 4])
def test_fused_jax_attention_matches_blocked_path_in_float32(window):
    q, k, v = _qkv(13, seed=4, dtype=jnp.float32)
    blocked = attn.blocked_attention(q, k, v, window=window, block_size=4)
    np.testing.assert_allclose(attn.fused_attention(q, k, v, window=window), blocked, rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="persistent prefix"):
        attn.fused_attention(q, k, v, window=4, num_prefix=2)
