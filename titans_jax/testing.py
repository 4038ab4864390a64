"""Small random inputs for tests and equivalence checks of the memory core (not for training)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from titans_jax import memory as mem


def random_memory_inputs(seed: int, length: int, *, batch: int = 2, heads: int = 2, key_dim: int = 6,
                         value_dim: int | None = None, dtype=jnp.float64):
    """(keys, values, queries, theta, log_eta, log_keep) with unit-norm keys and gates in the
    ranges the layer produces: theta in (0, 0.4), eta around sigmoid(1), 1 - alpha around sigmoid(2)."""
    value_dim = key_dim if value_dim is None else value_dim
    r = jax.random.split(jax.random.PRNGKey(seed), 6)
    keys = jax.random.normal(r[0], (batch, heads, length, key_dim), dtype)
    keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    values = jax.random.normal(r[1], (batch, heads, length, value_dim), dtype)
    queries = jax.random.normal(r[2], (batch, heads, length, key_dim), dtype)
    theta = 0.4 * jax.nn.sigmoid(jax.random.normal(r[3], (batch, heads, length), dtype))
    log_eta = jax.nn.log_sigmoid(jax.random.normal(r[4], (batch, heads, length), dtype) + 1.0)
    log_keep = jax.nn.log_sigmoid(jax.random.normal(r[5], (batch, heads, length), dtype) + 2.0)
    return keys, values, queries, theta, log_eta, log_keep


def random_memory_params(config: mem.MemoryConfig, heads: int = 2, seed: int = 7, dtype=jnp.float64) -> dict:
    """init_memory_params with non-trivial biases and residual-norm parameters, so that their
    gradients are exercised too."""
    params = mem.init_memory_params(jax.random.PRNGKey(seed), config, heads, dtype)
    r = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 2 * config.depth + 2))
    layers = tuple({name: leaf + 0.1 * jax.random.normal(next(r), leaf.shape, dtype) if name == "b" else leaf
                    for name, leaf in layer.items()} for layer in params["layers"])
    params = {**params, "layers": layers}
    if "norm" in params:
        params["norm"] = {"scale": 1 + 0.1 * jax.random.normal(next(r), params["norm"]["scale"].shape, dtype),
                          "bias": 0.1 * jax.random.normal(next(r), params["norm"]["bias"].shape, dtype)}
    return params


def objective_and_grads(config: mem.MemoryConfig):
    """jit(value_and_grad) of a scalar over the outputs and the final state (weights and
    momentum), w.r.t. (params, keys, values, queries, theta, log_eta, log_keep)."""

    def objective(params, keys, values, queries, theta, log_eta, log_keep):
        out, state = mem.memory_apply(params, keys, values, queries, theta, log_eta, log_keep, config)
        total = jnp.sum(jnp.sin(3 * out))
        for layer, surprise in zip(state.weights, state.momentum):
            total += sum(jnp.sum(jnp.cos(leaf)) for leaf in layer.values())
            total += sum(jnp.sum(leaf * leaf) for leaf in surprise.values())
        return total, out

    return jax.jit(jax.value_and_grad(objective, argnums=tuple(range(7)), has_aux=True))


VARIANTS = {
    "plain": dict(residual_norm=False),
    "bias_residual_norm": dict(use_bias=True, residual_norm=True),
    "no_momentum": dict(residual_norm=False),  # log_eta = None
    "no_forgetting": dict(residual_norm=False),  # log_keep = None
    "silu_mean_loss": dict(activation="silu", loss_scale=1.0 / 6, residual_norm=False),
    "first_order": dict(use_bias=True, residual_norm=True, surprise_gradient="first_order"),
    # per-token surprise norms of these inputs at M_0 range 2-24: a cap of 12 clips about half
    "surprise_clip": dict(use_bias=True, residual_norm=True, surprise_clip=12.0),
    # the writes mostly outgrow the gate here: the floor acts in batch 0, head 0 by the last boundary (a
    # reference without it fails this case); test_memory has a case where it acts at every boundary
    "last_layer_floor": dict(use_bias=True, residual_norm=True, last_layer_floor=True),
    # under these inputs the writes outgrow the gate in the first layer: run_all_implementations
    # shrinks the steps and strengthens the forgetting for this one so that every layer's floor acts
    "every_layer_floor": dict(use_bias=True, residual_norm=True, every_layer_floor=True),
}


def run_all_implementations(depth: int, chunk_size: int, variant: str = "plain", length: int = 23,
                            key_dim: int = 6) -> dict:
    """{impl: (outputs, gradients)} in float64 for one memory configuration (see VARIANTS); the
    gradients cover the params and every input that is not None."""
    results = {}
    with jax.enable_x64(True):
        inputs = list(random_memory_inputs(0, length, key_dim=key_dim))
        if variant == "no_momentum":
            inputs[4] = None
        if variant == "no_forgetting":
            inputs[5] = None
        if variant == "every_layer_floor":  # the gate outpaces the writes: every layer shrinks
            inputs[3], inputs[5] = 0.05 * inputs[3], inputs[5] + jnp.log(0.7)
        for impl in mem.IMPLEMENTATIONS:
            config = mem.MemoryConfig(key_dim=key_dim, value_dim=key_dim, depth=depth, expansion=2,
                                      chunk_size=chunk_size, impl=impl, **VARIANTS[variant])
            params = random_memory_params(config)
            (_, out), grads = objective_and_grads(config)(params, *inputs)
            results[impl] = (out, [g for g, x in zip(grads, [params] + inputs) if x is not None])
    return results


def _max_difference(a, b, relative: bool) -> float:
    import numpy as np

    structure_a, structure_b = jax.tree.structure(a), jax.tree.structure(b)
    if structure_a != structure_b:
        raise ValueError(f"trees differ in structure: {structure_a} vs {structure_b}")
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    worst, compared = 0.0, 0
    for index, (x, y) in enumerate(pairs):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            raise ValueError(f"leaf {index} has shape {x.shape} vs {y.shape}")
        if x.size == 0:
            continue
        compared += x.size
        if np.isnan(x).any() or np.isnan(y).any():
            return float("inf")  # a NaN is the largest difference, never a match
        scale = max(1.0, float(np.max(np.abs(y)))) if relative else 1.0
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    if not compared:
        raise ValueError("nothing to compare: the trees hold no elements")
    return worst


def max_relative_difference(a, b) -> float:
    """Largest |a - b| of any leaf, relative to that leaf's scale max(1, max |b|). The trees must
    have the same structure and leaf shapes and hold at least one element, and a NaN counts as
    an infinite difference: mismatched, empty or NaN trees never compare as equal."""
    return _max_difference(a, b, relative=True)


def max_absolute_difference(a, b) -> float:
    """Largest |a - b| of any leaf, with the checks of max_relative_difference."""
    return _max_difference(a, b, relative=False)
