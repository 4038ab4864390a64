"""The attention paths agree with a dense masked reference: blocked parallel (forward and
gradients) and streaming (calls of any length, one token included) over the fixed-shape cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.rope_precision import score_errors
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


@pytest.mark.parametrize("window,num_prefix,splits,block", [
    (None, 0, [1, 1, 5, 1, 6], 4), (4, 2, [3, 1, 7, 1], 3), (3, 0, [5, 1, 1, 7], 2), (1, 1, [2, 11], 4)])
def test_streaming_over_the_cache_matches_reference(window, num_prefix, splits, block):
    """The prefix first, then calls of the given sizes (longer than the window, one token, query
    blocks that do not divide the call) against the dense reference over the whole sequence."""
    with jax.enable_x64(True):
        length = num_prefix + sum(splits)
        q, k, v = _qkv(length, seed=2)
        ref = attn.attention_reference(q, k, v, window=window, num_prefix=num_prefix)
        capacity = window if window is not None else length - num_prefix
        cache = attn.init_kv_cache(2, num_prefix, capacity, 2, 4, jnp.float64)
        cache = cache._replace(prefix_k=k[:, :num_prefix], prefix_v=v[:, :num_prefix])
        start = num_prefix
        for size in splits:
            piece = slice(start, start + size)
            out, cache = attn.cached_attention(q[:, piece], k[:, piece], v[:, piece], jnp.int32(start), cache,
                                               window=window, block_size=block)
            np.testing.assert_allclose(out, ref[:, piece], rtol=1e-12, atol=1e-12)
            start += size
        assert cache.k.shape[1] == capacity  # the cache never grows
        if window is not None:  # the last `window` positions, oldest first
            np.testing.assert_array_equal(cache.slot_pos, np.arange(length - capacity, length))


def test_rope_preserves_norms_and_depends_on_relative_position_only():
    with jax.enable_x64(True):
        q, k, _ = _qkv(6, seed=3)
        positions = jnp.arange(6)
        rq, rk = attn.rope(q, positions), attn.rope(k, positions)
        np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-12)
        shifted_q, shifted_k = attn.rope(q, positions + 37), attn.rope(k, positions + 37)
        np.testing.assert_allclose(jnp.einsum("bthe,bshe->bhts", rq, rk),
                                   jnp.einsum("bthe,bshe->bhts", shifted_q, shifted_k), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("position", [1_000, 2_097_152, 2**31 - 200])
def test_float32_rope_scores_stay_exact_at_millions_of_positions(position):
    """A query at `position` against keys 0-127 tokens back, as sliding-window attention sees them
    in a streamed 2M-token context: the float32 scores (fixed-point phases) equal the float64 ones.
    The plain float32 product p * f, measured alongside, does not (it errs by ~4e-2 at 2M)."""
    plain, ours = score_errors(position)
    assert ours <= 5e-6
    if position > 2**20:
        assert plain > 1e-3  # what the fixed-point phases are for


def test_rope_phase_angles_are_the_angles_modulo_two_pi():
    positions = np.array([0, 1, 7, 4096, 65_537, 2_097_151, 2**31 - 1])
    E, base = 16, 500_000.0
    angles = attn.primitives.rope_phase_angles(jnp.asarray(positions), E, base)
    assert angles.shape == (len(positions), E // 2) and angles.dtype == jnp.float32
    angles = np.asarray(angles, np.float64)
    frequencies = base ** (-np.arange(E // 2) / (E // 2))
    exact = positions[:, None].astype(np.float64) * frequencies  # float64: ~1e-7 rad at 2^31
    difference = np.angle(np.exp(1j * (angles - exact)))  # wrapped into (-pi, pi]
    assert np.all((angles >= -np.pi) & (angles < np.pi))
    # frequency quantisation (<= 7.3e-10 rad per token) + float32 phase + float64 reference
    assert np.all(np.abs(difference) <= 7.4e-10 * positions[:, None] + 1e-6)
    np.testing.assert_array_equal(angles[0], 0.0)


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
