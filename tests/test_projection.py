"""The Dense projections' matmul with a hand-written backward == jax.lax.dot_general (float64)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titans_jax.projection import dense_dot_general, projection_matmul


def test_projection_matmul_matches_dot_general_forward_and_gradients():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7), jnp.float64)
        w = jax.random.normal(jax.random.PRNGKey(1), (7, 3), jnp.float64)
        cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 3), jnp.float64)
        reference = lambda x, w: jax.lax.dot_general(x, w, (((2,), (0,)), ((), ())))  # noqa: E731
        np.testing.assert_allclose(projection_matmul(x, w), reference(x, w), rtol=1e-14)
        ours = jax.vjp(projection_matmul, x, w)[1](cotangent)
        theirs = jax.vjp(reference, x, w)[1](cotangent)
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=1e-13)


def test_dense_with_it_matches_plain_dense_and_other_contractions_fall_through():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 6), jnp.float64)
        ours = nn.Dense(5, dot_general=dense_dot_general, param_dtype=jnp.float64)
        plain = nn.Dense(5, param_dtype=jnp.float64)
        params = plain.init(jax.random.PRNGKey(1), x)
        loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
        a = jax.grad(loss(ours), argnums=(0, 1))(params, x)
        b = jax.grad(loss(plain), argnums=(0, 1))(params, x)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-13)
        # a batched contraction is not Dense's: it goes to lax.dot_general unchanged
        lhs, rhs = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
        numbers = (((2,), (1,)), ((0,), (0,)))
        np.testing.assert_array_equal(dense_dot_general(lhs, rhs, numbers), jax.lax.dot_general(lhs, rhs, numbers))
