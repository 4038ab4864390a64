"""The linear projections' matmul, with a backward pass written as two plain contractions.

``jax.grad`` of ``x @ w`` for x [B, T, I] gives the weight gradient as a dot_general whose output
XLA:CPU lays out transposed and then copies: for the LMM layer's q/k/v projection (batch 2 x 4096
x 512 -> 1536, float32, 2 cores) forward+backward ran at 68.5 GFLOP/s with autodiff and 100.9
GFLOP/s with the backward below, the whole LMM layer's at 2283 vs 2548 tokens/s
(python -m experiments.projection_bench; experiments/results/projection_bench_cpu.txt).
The forward is the same ``dot_general``; the backward computes

    dx = g @ w^T            (einsum "...o,io->...i")
    dw = sum over leading axes of x^T g   (einsum "...i,...o->io")

which is exactly what autodiff computes, in another memory layout. ``dense_dot_general`` is a
drop-in ``dot_general`` for ``flax.linen.Dense``; any contraction other than Dense's
([..., I] x [I, O] -> [..., O], no batch dimensions, default precision) goes to
``jax.lax.dot_general`` unchanged. Forward-mode differentiation (jax.jvp) is not defined for a
custom_vjp function: use ``jax.lax.dot_general`` there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def projection_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O] (same dtype rules as jnp.matmul)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _forward(x, w):
    return projection_matmul(x, w), (x, w)


def _backward(residuals, grad):
    x, w = residuals
    dx = jnp.einsum("...o,io->...i", grad, w).astype(x.dtype)
    dw = jnp.einsum("...i,...o->io", x, grad).astype(w.dtype)
    return dx, dw


projection_matmul.defvjp(_forward, _backward)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """``jax.lax.dot_general`` that routes Dense's contraction through `projection_matmul`."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    is_dense = (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
                and not lhs_batch and not rhs_batch and precision is None and not kwargs
                and lhs.dtype == rhs.dtype and preferred_element_type in (None, lhs.dtype))
    if not is_dense:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    return projection_matmul(lhs, rhs)
