"""The fused Pallas kernel of the linear memory (titans_jax.pallas_memory): on CPU it runs in
Pallas' interpret mode, in float64, against the token-by-token reference; its Triton lowering is
checked without a GPU (experiments.kernel_bench times it compiled on one)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax import memory as mem
from titans_jax import pallas_memory as pm
from titans_jax.testing import max_relative_difference, random_memory_inputs, random_memory_params

VARIANTS = {  # name: (MemoryConfig changes, drop log_eta, drop log_keep)
    "residual_norm": ({}, False, False),
    "plain": ({"residual_norm": False}, False, False),
    "surprise_clip": ({"surprise_clip": 0.3}, False, False),
    "no_momentum": ({}, True, False),
    "no_forgetting": ({"residual_norm": False}, False, True),
    "mean_loss": ({"loss_scale": 1 / 6}, False, False),
    "first_order": ({"surprise_gradient": "first_order"}, False, False),
}


def case(variant, chunk_size, length, key_dim=6):
    changes, no_eta, no_keep = VARIANTS[variant]
    config = mem.MemoryConfig(key_dim=key_dim, value_dim=key_dim, depth=1, chunk_size=chunk_size, **changes)
    params = random_memory_params(config)
    keys, values, queries, theta, log_eta, log_keep = random_memory_inputs(3, length, key_dim=key_dim)
    inputs = (keys, values, queries, 3 * theta, None if no_eta else log_eta, None if no_keep else log_keep)
    return config, params, inputs


def value_and_grads(apply):
    """jit(value_and_grad) of a scalar over the outputs and every part of the state (weights,
    momentum, the weights at the last chunk boundary) w.r.t. params and all six inputs."""
    def objective(params, keys, values, queries, theta, log_eta, log_keep):
        out, state = apply(params, keys, values, queries, theta, log_eta, log_keep)
        total = jnp.sum(jnp.sin(3 * out)) + jnp.sum(jnp.cos(state.weights[0]["w"]))
        total += jnp.sum(state.momentum[0]["w"] ** 2) + jnp.sum(jnp.sin(2 * state.chunk_weights[0]["w"]))
        return total, out

    return jax.jit(jax.value_and_grad(objective, argnums=tuple(range(7)), has_aux=True))


SLOW = pytest.mark.slow  # the gradient cases below check these forwards too; -m slow runs every case


@pytest.mark.parametrize("variant,chunk_size,length", [
    ("residual_norm", 5, 23), ("plain", 4, 16), ("residual_norm", 16, 7),
    pytest.param("surprise_clip", 16, 16, marks=SLOW), pytest.param("no_momentum", 3, 10, marks=SLOW),
    pytest.param("no_forgetting", 7, 9, marks=SLOW), pytest.param("mean_loss", 1, 5, marks=SLOW)])
def test_fused_kernel_matches_the_reference_forward_and_state(variant, chunk_size, length):
    """Outputs and every part of the returned state (running weights and momentum, the weights
    at the last chunk boundary, pending count) equal the token-by-token reference to float64
    rounding; lengths with a short last chunk and shorter than one chunk included."""
    with jax.enable_x64(True):
        config, params, inputs = case(variant, chunk_size, length)
        ref_out, ref_state = mem.memory_apply(params, *inputs, dataclasses.replace(config, impl="reference"))
        out, state = pm.fused_memory_apply(params, *inputs, config, interpret=True)
        assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
        assert max_relative_difference(out, ref_out) < 1e-12
        for name in ("weights", "momentum", "chunk_weights"):
            assert max_relative_difference(getattr(state, name), getattr(ref_state, name)) < 1e-12, name
        assert int(state.num_pending) == int(ref_state.num_pending) == length % chunk_size


GRADIENT_CASES = [("residual_norm", 4, 11, "fused"), ("residual_norm", 4, 11, "xla"), ("surprise_clip", 3, 10, "fused"),
                  ("no_momentum", 5, 9, "fused"), ("first_order", 4, 9, "fused"), ("residual_norm", 16, 7, "fused"),
                  pytest.param("plain", 4, 12, "fused", marks=SLOW),
                  pytest.param("no_forgetting", 1, 4, "fused", marks=SLOW)]


@pytest.mark.parametrize("variant,chunk_size,length,backward", GRADIENT_CASES)
def test_fused_kernel_gradients_match_the_reference(variant, chunk_size, length, backward):
    """Both backward passes (the reverse chunk-scan kernel, and jax.vjp of the XLA chunked path)
    give the reference's gradients w.r.t. M_0, the norm, keys, values, queries and all three
    gates, through the outputs and every part of the returned state; short last chunks, one
    chunk shorter than C, chunk size 1 and the first-order surprise gradient included."""
    with jax.enable_x64(True):
        config, params, inputs = case(variant, chunk_size, length)
        reference = functools.partial(mem.memory_apply, config=dataclasses.replace(config, impl="reference"))
        fused = functools.partial(pm.fused_memory_apply, config=config, interpret=True, backward=backward)
        (_, ref_out), ref_grads = value_and_grads(reference)(params, *inputs)
        (_, out), grads = value_and_grads(fused)(params, *inputs)
        assert max_relative_difference(out, ref_out) < 1e-12
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
        assert max_relative_difference(grads, ref_grads) < 1e-11


def test_fused_kernels_lower_to_triton_without_a_gpu():
    """Every operation of both kernels has a Triton lowering (shapes of the benchmark: 64 x 64
    state, chunk 64, a number of chunks that is not a power of two, clip and norm on)."""
    config = mem.MemoryConfig(key_dim=64, value_dim=64, depth=1, chunk_size=64, surprise_clip=10.0)
    params = random_memory_params(config, heads=2, dtype=jnp.float32)
    inputs = random_memory_inputs(0, 200, batch=1, heads=2, key_dim=64, dtype=jnp.float32)
    text = pm.lower_for_gpu(params, *inputs, config, with_backward=True)
    assert text.count("xla.gpu.triton") == 2
    assert "titans_linear_memory_forward" in text and "titans_linear_memory_backward" in text


def test_fused_kernel_rejects_what_it_does_not_cover():
    base = mem.MemoryConfig(key_dim=16, value_dim=16, depth=1, chunk_size=16)
    inputs = random_memory_inputs(0, 16, key_dim=16, dtype=jnp.float32)
    deep = dataclasses.replace(base, depth=2)
    with pytest.raises(ValueError, match="depth=1"):
        pm.fused_memory_apply(random_memory_params(deep, dtype=jnp.float32), *inputs, deep)
    biased = dataclasses.replace(base, use_bias=True)
    with pytest.raises(ValueError, match="use_bias"):
        pm.fused_memory_apply(random_memory_params(biased, dtype=jnp.float32), *inputs, biased)
    odd = dataclasses.replace(base, chunk_size=12)
    with pytest.raises(ValueError, match="chunk_size a power of two"):
        pm.fused_memory_apply(random_memory_params(odd, dtype=jnp.float32), *inputs, odd)
    with pytest.raises(ValueError, match="backward"):
        pm.fused_memory_apply(random_memory_params(base, dtype=jnp.float32), *inputs, base, backward="autodiff")
    with pytest.raises(ValueError, match="precision"):
        pm.fused_memory_apply(random_memory_params(base, dtype=jnp.float32), *inputs, base, precision="fp8")
    with jax.enable_x64(True):
        params64 = random_memory_params(base, dtype=jnp.float64)
        inputs64 = random_memory_inputs(0, 16, key_dim=16, dtype=jnp.float64)
        with pytest.raises(ValueError, match="float32"):
            pm.fused_memory_apply(params64, *inputs64, base)
    with pytest.raises(ValueError, match="keys"):  # the shared input checks of memory_apply
        pm.fused_memory_apply(random_memory_params(base, dtype=jnp.float32), inputs[0][..., :8], *inputs[1:], base)


def test_impl_fused_in_memory_apply_and_streaming():
    """MemoryConfig(impl="fused"): memory_apply takes the kernel for a fresh state and the
    chunked form for a carried one, so a stream split into calls equals one call."""
    with jax.enable_x64(True):
        config = mem.MemoryConfig(key_dim=6, value_dim=6, depth=1, chunk_size=4, impl="fused")
        params = random_memory_params(config)
        inputs = random_memory_inputs(5, 14)
        whole, whole_state = mem.memory_apply(params, *inputs, config)
        ref, ref_state = mem.memory_apply(params, *inputs, dataclasses.replace(config, impl="reference"))
        assert max_relative_difference(whole, ref) < 1e-12
        assert max_relative_difference(whole_state, ref_state) < 1e-12
        first, state = mem.memory_apply(params, *(x[:, :, :9] for x in inputs), config)
        rest, state = mem.memory_apply(params, *(x[:, :, 9:] for x in inputs), config, state=state)
        assert max_relative_difference(jnp.concatenate([first, rest], axis=2), ref) < 1e-12
        assert max_relative_difference(state, ref_state) < 1e-12
    with pytest.raises(ValueError, match="impl='fused'.*depth 1"):
        mem.MemoryConfig(depth=2, impl="fused")


@pytest.mark.slow  # 25 s: a whole model twice; test_impl_fused_in_memory_apply_and_streaming covers the routing
def test_linear_model_with_the_fused_memory_trains_like_the_chunked_one():
    """A whole model (the tiny "linear" preset) with lmm.memory.impl="fused": the same loss and
    gradients as with the chunked memory (float32, interpreted kernel on CPU)."""
    from experiments.arch_bench import next_token_loss
    from titans_jax.models import TitansLM, init_params
    from titans_jax.presets import preset

    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 40), 0, 256, jnp.int32)
    results = {}
    for impl in ("chunked", "fused"):
        config = preset("tiny", "linear", {"lmm.memory.impl": impl})
        params = init_params(config, jax.random.PRNGKey(0))
        results[impl] = jax.jit(jax.value_and_grad(next_token_loss(TitansLM(config))))(params, tokens)
    (loss_chunked, grads_chunked), (loss_fused, grads_fused) = results["chunked"], results["fused"]
    assert abs(float(loss_fused) - float(loss_chunked)) < 1e-5
    assert max_relative_difference(grads_fused, grads_chunked) < 1e-4
