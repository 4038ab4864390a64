"""The memory core: three implementations agree, streaming is exact, and it is the paper's math."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax import memory as mem
from titans_jax.testing import (max_absolute_difference, max_relative_difference, objective_and_grads, random_memory_inputs,
                                random_memory_params, run_all_implementations)

BATCH, HEADS, KEY_DIM = 2, 2, 6


def make_inputs(seed, length, dtype=jnp.float64):
    return random_memory_inputs(seed, length, batch=BATCH, heads=HEADS, key_dim=KEY_DIM, dtype=dtype)


def make_params(config, seed=7, dtype=jnp.float64):
    return random_memory_params(config, heads=HEADS, seed=seed, dtype=dtype)


scalar_objective = objective_and_grads
max_rel_diff = max_relative_difference


max_abs_diff = max_absolute_difference


# depth x chunk size: by default every depth and every chunk size appear at least once (compiling
# three implementations with gradients takes ~10 s a case on 2 cores); the full product runs
# with -m slow.
FAST_CASES = [(1, 5), (2, 1), (2, 16), (3, 3)]
ALL_CASES = [(d, c) for d in (1, 2, 3) for c in (1, 3, 16, 5)]
CASES = FAST_CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in ALL_CASES if case not in FAST_CASES]


@pytest.mark.parametrize("depth,chunk_size", CASES)
def test_implementations_agree_forward_and_gradients(depth, chunk_size):
    results = run_all_implementations(depth, chunk_size, "plain")
    ref_out, ref_grads = results["reference"]
    assert np.all(np.isfinite(np.asarray(ref_out)))
    for impl in ("chunked", "associative"):
        out, grads = results[impl]
        assert max_rel_diff(out, ref_out) < 1e-12, impl
        assert max_rel_diff(grads, ref_grads) < 1e-11, impl


# The last-layer floor is the every-layer floor's code path (floor_layers) on one layer of it, and
# test_last_layer_floor_holds_the_norm_reads_alike_and_streams_exactly runs it in two implementations:
# its three-way agreement is in the slow tier.
@pytest.mark.parametrize("variant", ["bias_residual_norm", "no_momentum", "no_forgetting", "silu_mean_loss",
                                     "first_order", "surprise_clip",
                                     pytest.param("last_layer_floor", marks=pytest.mark.slow), "every_layer_floor"])
def test_implementations_agree_variants(variant):
    results = run_all_implementations(2, 5, variant)
    ref_out, ref_grads = results["reference"]
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(ref_grads))
    for impl in ("chunked", "associative"):
        out, grads = results[impl]
        assert max_rel_diff(out, ref_out) < 1e-12, impl
        assert max_rel_diff(grads, ref_grads) < 1e-11, impl


@pytest.mark.parametrize("remat_every", [0, 2, 3])
def test_remat_does_not_change_results(remat_every):
    with jax.enable_x64(True):
        inputs = make_inputs(1, 29)
        base = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=4, remat_every=1)
        other = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=4, remat_every=remat_every)
        params = make_params(base)
        (_, out_a), grads_a = scalar_objective(base)(params, *inputs)
        (_, out_b), grads_b = scalar_objective(other)(params, *inputs)
    assert max_abs_diff(out_a, out_b) < 1e-12
    assert max_rel_diff(grads_a, grads_b) < 1e-11


def stream(config, params, inputs, splits):
    """Feed the sequence in pieces of the given sizes, carrying the state."""
    step = jax.jit(functools.partial(mem.memory_apply, config=config))
    state, outs, start = None, [], 0
    for size in splits:
        piece = [x[:, :, start:start + size] for x in inputs]
        out, state = step(params, *piece, state=state)
        outs.append(out)
        start += size
    return jnp.concatenate(outs, axis=2), state


@pytest.mark.parametrize("impl", mem.IMPLEMENTATIONS)
def test_streaming_equals_one_call(impl):
    length = 23
    with jax.enable_x64(True):
        config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, depth=2, expansion=2, chunk_size=5, impl=impl)
        params = make_params(config)
        inputs = make_inputs(3, length)
        whole, whole_state = stream(config, params, inputs, [length])
        pieces, pieces_state = stream(config, params, inputs, [7, 7, 7, 2])  # offsets 0, 2, 4, 1
        tokens, tokens_state = stream(config, params, inputs, [1] * length)
    for out, state in ((pieces, pieces_state), (tokens, tokens_state)):
        assert max_abs_diff(out, whole) < 1e-12
        assert max_abs_diff(state, whole_state) < 1e-12
    assert int(whole_state.num_pending) == length % 5


def test_streaming_across_exact_chunk_boundaries():
    """Pieces that end exactly on chunk boundaries, and a piece longer than several chunks."""
    with jax.enable_x64(True):
        config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, depth=1, chunk_size=4)
        params = make_params(config)
        inputs = make_inputs(4, 24)
        whole, whole_state = stream(config, params, inputs, [24])
        pieces, pieces_state = stream(config, params, inputs, [4, 8, 4, 8])
    assert max_abs_diff(pieces, whole) < 1e-12
    assert max_abs_diff(pieces_state, whole_state) < 1e-12
    assert int(whole_state.num_pending) == 0


def test_fresh_state_equals_explicit_initial_state():
    """A fresh call runs whole chunks from M_0; an explicit state takes the streaming path (its
    num_pending is a value, so the tokens are laid out behind it and masked): the same numbers
    up to float64 rounding."""
    with jax.enable_x64(True):
        config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=3)
        params = make_params(config)
        inputs = make_inputs(5, 10)
        out_a, state_a = mem.memory_apply(params, *inputs, config)
        initial = mem.init_memory_state(params, BATCH, config)
        out_b, state_b = mem.memory_apply(params, *inputs, config, state=initial)
    assert max_abs_diff(out_a, out_b) < 1e-13
    assert max_abs_diff(state_a, state_b) < 1e-13


def test_short_sequences():
    """Shorter than one chunk and length 1, for every implementation."""
    with jax.enable_x64(True):
        for impl in mem.IMPLEMENTATIONS:
            config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=16, impl=impl)
            params = make_params(config)
            apply = jax.jit(lambda *inputs: mem.memory_apply(params, *inputs, config))
            for length in (1, 7):
                out, state = apply(*make_inputs(6, length))
                assert out.shape == (BATCH, HEADS, length, KEY_DIM)
                assert int(state.num_pending) == length
                assert np.all(np.isfinite(np.asarray(out)))


# ------------------------------------------------------------------------------------------------
# The paper's math, written out by hand


def test_chunk_size_one_is_the_per_token_recurrence_of_eqs_10_13_14():
    """Plain Python loop over tokens, linear memory, gradient of 0.5 ||k W - v||^2 written by hand."""
    length = 13
    with jax.enable_x64(True):
        config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, depth=1, chunk_size=1)
        params = make_params(config)
        inputs = make_inputs(8, length)
        out, state = mem.memory_apply(params, *inputs, config)
    keys, values, queries, theta, log_eta, log_keep = (np.asarray(x) for x in inputs)
    w0 = np.asarray(params["layers"][0]["w"])
    for b in range(BATCH):
        for h in range(HEADS):
            weights, surprise = w0[h].copy(), np.zeros_like(w0[h])
            for t in range(length):
                k, v = keys[b, h, t][None, :], values[b, h, t][None, :]
                grad = k.T @ (k @ weights - v)  # d/dW 0.5 ||k W - v||^2
                surprise = np.exp(log_eta[b, h, t]) * surprise - theta[b, h, t] * grad  # eq. 10/14
                weights = np.exp(log_keep[b, h, t]) * weights + surprise  # eq. 13
                np.testing.assert_allclose(out[b, h, t], queries[b, h, t] @ weights, rtol=0, atol=1e-12)
            np.testing.assert_allclose(state.weights[0]["w"][b, h], weights, rtol=0, atol=1e-12)
            np.testing.assert_allclose(state.momentum[0]["w"][b, h], surprise, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cap", [None, 1.0], ids=["plain", "surprise_clip"])
def test_deep_memory_chunk_size_one_matches_a_python_loop_with_autodiff(cap):
    """Chunk size 1 written as a loop with autodiff; with surprise_clip each token's gradient
    (both layers together) is scaled by min(1, cap / ||u_t||) before momentum."""
    length = 9
    with jax.enable_x64(True):
        config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, depth=2, expansion=2,
                                  chunk_size=1, surprise_clip=cap)
        params = make_params(config)
        inputs = make_inputs(9, length)
        out, _ = mem.memory_apply(params, *inputs, config)
        keys, values, queries, theta, log_eta, log_keep = inputs
        b, h = 1, 0
        weights = tuple({"w": layer["w"][h]} for layer in params["layers"])
        surprise = jax.tree.map(jnp.zeros_like, weights)
        clipped = 0
        for t in range(length):
            grad = jax.grad(mem.inner_loss)(weights, None, keys[b, h, t], values[b, h, t], config)
            if cap is not None:
                size = float(np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(grad))))
                clipped += size > cap
                grad = jax.tree.map(lambda g: g * min(1.0, cap / size), grad)
            surprise = jax.tree.map(lambda s, g: jnp.exp(log_eta[b, h, t]) * s - theta[b, h, t] * g, surprise, grad)
            weights = jax.tree.map(lambda w, s: jnp.exp(log_keep[b, h, t]) * w + s, weights, surprise)
            expected = jax.nn.gelu(queries[b, h, t] @ weights[0]["w"], approximate=True) @ weights[1]["w"]
            np.testing.assert_allclose(out[b, h, t], expected, rtol=0, atol=1e-12)
    if cap is not None:
        assert 0 < clipped < length  # the case exercises both branches


def test_surprise_clip_above_every_norm_changes_nothing_and_bounds_writes():
    """A cap above every token's surprise gives bit-identical outputs; a small one bounds every
    token's write: without momentum or forgetting, ||W_t - W_{t-1}|| <= theta_t * cap."""
    with jax.enable_x64(True):
        base = mem.MemoryConfig(key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=4, use_bias=True)
        params = make_params(base)
        inputs = make_inputs(3, 11)
        out, _ = mem.memory_apply(params, *inputs, base)
        loose, _ = mem.memory_apply(params, *inputs, dataclasses.replace(base, surprise_clip=1e12))
        np.testing.assert_array_equal(np.asarray(loose), np.asarray(out))

        cap = 0.05
        config = dataclasses.replace(base, chunk_size=1, surprise_clip=cap)
        keys, values, queries, theta, _, _ = inputs
        state = mem.init_memory_state(params, BATCH, config)
        previous = state.weights
        one_token = jax.jit(lambda state, *piece: mem.memory_apply(params, *piece, None, None, config, state)[1])
        for t in range(keys.shape[2]):
            state = one_token(state, *[x[:, :, t:t + 1] for x in (keys, values, queries, theta)])
            step = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2, axis=tuple(range(2, np.ndim(a))))
                               for a, b in zip(jax.tree.leaves(state.weights), jax.tree.leaves(previous))))
            bound = np.asarray(theta[:, :, t]) * cap
            assert np.all(step <= bound * (1 + 1e-9)), (t, step, bound)
            previous = state.weights
        assert np.any(step >= bound * (1 - 1e-9))  # the cap is reached, not just respected


def test_first_order_surprise_keeps_the_forward_and_drops_only_the_second_order_term():
    """surprise_gradient="first_order": same outputs; the gradient is that of a Python loop in
    which each surprise is taken at stop_gradient(weights) (chunk size 1), and differs from the
    exact one."""
    length = 7
    with jax.enable_x64(True):
        exact = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, depth=2, expansion=2,
                                 chunk_size=1)
        first = dataclasses.replace(exact, surprise_gradient="first_order")
        params = make_params(exact)
        inputs = make_inputs(9, length)
        keys, values, queries, theta, log_eta, log_keep = inputs

        def loop(weights):
            surprise = jax.tree.map(jnp.zeros_like, weights)
            total = 0.0
            for t in range(length):
                grad = jax.grad(mem.inner_loss)(jax.lax.stop_gradient(weights), None, keys[0, 0, t], values[0, 0, t],
                                                first)
                surprise = jax.tree.map(lambda s, g: jnp.exp(log_eta[0, 0, t]) * s - theta[0, 0, t] * g, surprise, grad)
                weights = jax.tree.map(lambda w, s: jnp.exp(log_keep[0, 0, t]) * w + s, weights, surprise)
                total = total + jnp.sum(jnp.sin(mem.memory_mlp(weights, None, queries[0, 0, t], first)))
            return total

        def through(config):
            def objective(layers):
                out, _ = mem.memory_apply({"layers": layers}, *inputs, config)
                return jnp.sum(jnp.sin(out[0, 0]))
            return objective

        weights0 = tuple({"w": layer["w"][0]} for layer in params["layers"])
        expected = jax.grad(loop)(weights0)
        for config in (first, dataclasses.replace(first, impl="reference"), dataclasses.replace(first, impl="associative")):
            got = jax.grad(through(config))(params["layers"])
            assert max_abs_diff(tuple({"w": g["w"][0]} for g in got), expected) < 1e-12, config.impl
        exact_grad = jax.grad(through(exact))(params["layers"])
        assert max_abs_diff(exact_grad, jax.grad(through(first))(params["layers"])) > 1e-6
        out_exact, _ = mem.memory_apply(params, *inputs, exact)
        out_first, _ = mem.memory_apply(params, *inputs, first)
        np.testing.assert_array_equal(np.asarray(out_exact), np.asarray(out_first))


def test_no_momentum_no_forgetting_is_ttt_minibatch_gradient_descent():
    """eta = alpha = 0: TTT-Linear. Inside a chunk token i sees W_0 - sum_{j<=i} theta_j grad_j(W_0)."""
    length, chunk = 14, 4
    with jax.enable_x64(True):
        config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, depth=1, chunk_size=chunk)
        params = make_params(config)
        keys, values, queries, theta, _, _ = make_inputs(10, length)
        out, state = mem.memory_apply(params, keys, values, queries, theta, None, None, config)
    keys, values, queries, theta = (np.asarray(x) for x in (keys, values, queries, theta))
    w0 = np.asarray(params["layers"][0]["w"])
    for b in range(BATCH):
        for h in range(HEADS):
            weights = w0[h].copy()
            for start in range(0, length, chunk):
                stop = min(start + chunk, length)
                k, v = keys[b, h, start:stop], values[b, h, start:stop]
                per_token = theta[b, h, start:stop, None, None] * (k[:, :, None] * (k @ weights - v)[:, None, :])
                running = weights - np.cumsum(per_token, axis=0)
                expected = np.einsum("ci,cio->co", queries[b, h, start:stop], running)
                np.testing.assert_allclose(out[b, h, start:stop], expected, rtol=0, atol=1e-12)
                last = running[-1]  # the weights after the last token
                if stop - start == chunk:
                    weights = last
            # the running weights after token 14, and the chunk-start weights (token 12) of the pending chunk
            np.testing.assert_allclose(state.weights[0]["w"][b, h], last, rtol=0, atol=1e-12)
            np.testing.assert_allclose(state.chunk_weights[0]["w"][b, h], weights, rtol=0, atol=1e-12)


def test_gates_switched_off_give_finite_gradients_in_float32():
    config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=4)
    params = make_params(config, dtype=jnp.float32)
    keys, values, queries, theta, _, _ = make_inputs(11, 11, dtype=jnp.float32)

    def loss(params, theta):
        return jnp.sum(mem.memory_apply(params, keys, values, queries, theta, None, None, config)[0] ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, theta)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
        assert float(jnp.max(jnp.abs(leaf))) > 0


def test_strong_forgetting_is_stable():
    """log(1 - alpha) of -30 per token: the segment sums never form 0 * inf or inf - inf."""
    config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=8)
    params = make_params(config, dtype=jnp.float32)
    keys, values, queries, theta, log_eta, _ = make_inputs(12, 16, dtype=jnp.float32)
    log_keep = jnp.full(theta.shape, -30.0)
    out, _ = mem.memory_apply(params, keys, values, queries, theta, log_eta, log_keep, config)
    assert np.all(np.isfinite(np.asarray(out)))


# ------------------------------------------------------------------------------------------------
# Bad input gives clear errors


@pytest.fixture
def small():
    config = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=4)
    params = make_params(config, dtype=jnp.float32)
    return config, params, make_inputs(13, 6, dtype=jnp.float32)


@pytest.mark.parametrize("field,value", [("chunk_size", 0), ("chunk_size", -3), ("depth", 0), ("depth", 5),
                                         ("impl", "fast"), ("activation", "swish2"), ("remat_every", -1),
                                         ("loss_scale", 0.0), ("surprise_gradient", "second_order"),
                                         ("surprise_clip", 0.0), ("surprise_clip", -1.0),
                                         ("surprise_clip", float("inf")), ("surprise_clip", True),
                                         ("last_layer_floor", 1), ("every_layer_floor", "yes")])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        mem.MemoryConfig(residual_norm=False, key_dim=4, value_dim=4, **{field: value})


def test_residual_norm_needs_equal_widths():
    with pytest.raises(ValueError, match="key_dim == value_dim"):
        mem.MemoryConfig(key_dim=4, value_dim=8, residual_norm=True)


def test_wrong_rank_and_shape(small):
    config, params, (k, v, q, theta, le, lk) = small
    with pytest.raises(ValueError, match="rank 4"):
        mem.memory_apply(params, k[0], v, q, theta, le, lk, config)
    with pytest.raises(ValueError, match="key_dim"):
        mem.memory_apply(params, k[..., :3], v, q[..., :3], theta, le, lk, config)
    with pytest.raises(ValueError, match="values shape"):
        mem.memory_apply(params, k, v[:, :, :4], q, theta, le, lk, config)
    with pytest.raises(ValueError, match="theta must have shape"):
        mem.memory_apply(params, k, v, q, theta[:, :1], le, lk, config)


def test_wrong_dtype(small):
    config, params, (k, v, q, theta, le, lk) = small
    with pytest.raises(TypeError, match="floating-point"):
        mem.memory_apply(params, k.astype(jnp.int32), v, q, theta, le, lk, config)


def test_non_finite_input(small):
    config, params, (k, v, q, theta, le, lk) = small
    with pytest.raises(ValueError, match="non-finite"):
        mem.memory_apply(params, k.at[0, 0, 2, 1].set(jnp.nan), v, q, theta, le, lk, config)
    with pytest.raises(ValueError, match="non-finite"):
        mem.memory_apply(params, k, v, q, theta.at[0, 0, 0].set(jnp.inf), le, lk, config)
    with pytest.raises(ValueError, match="theta .* must be >= 0"):
        mem.memory_apply(params, k, v, q, -theta, le, lk, config)
    with pytest.raises(ValueError, match="<= 0"):
        mem.memory_apply(params, k, v, q, theta, jnp.abs(le), lk, config)


def test_mismatched_state(small):
    config, params, (k, v, q, theta, le, lk) = small
    _, state = mem.memory_apply(params, k, v, q, theta, le, lk, config)
    with pytest.raises(ValueError, match="expected"):
        mem.memory_apply(params, k[:1], v[:1], q[:1], theta[:1], le[:1], lk[:1], config, state=state)
    # 6 tokens at chunk 4 leave 2 pending, which no chunk of 2 can hold. (The state has no
    # chunk-sized buffer, so a state of another chunk size whose count fits is not detectable.)
    other = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=2)
    with pytest.raises(ValueError, match=r"num_pending = 2 is outside \[0, chunk_size = 2\)"):
        mem.memory_apply(params, k, v, q, theta, le, lk, other, state=state)
    deeper = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=4, depth=3)
    with pytest.raises(ValueError, match="memory layers"):
        mem.memory_apply(make_params(deeper, dtype=jnp.float32), k, v, q, theta, le, lk, deeper, state=state)
    with pytest.raises(TypeError, match="MemoryState"):
        mem.memory_apply(params, k, v, q, theta, le, lk, config, state=(1, 2))


def test_params_that_do_not_match_config(small):
    config, params, (k, v, q, theta, le, lk) = small
    deeper = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=4, depth=3)
    with pytest.raises(ValueError, match="layers"):
        mem.memory_apply(params, k, v, q, theta, le, lk, deeper)
    with_bias = mem.MemoryConfig(residual_norm=False, key_dim=KEY_DIM, value_dim=KEY_DIM, chunk_size=4, use_bias=True)
    with pytest.raises(ValueError, match="bias"):
        mem.memory_apply(params, k, v, q, theta, le, lk, with_bias)


def test_inputs_wider_than_the_memory_dtype_are_refused(small):
    config, params, (k, v, q, theta, le, lk) = small
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match="keys has dtype float64 but the computation runs in float32"):
            mem.memory_apply(params, k.astype(jnp.float64), v, q, theta, le, lk, config)
        with pytest.raises(TypeError, match="theta has dtype float64"):
            mem.memory_apply(params, k, v, q, theta.astype(jnp.float64), le, lk, config)
    out, _ = mem.memory_apply(params, k.astype(jnp.bfloat16), v, q, theta, le, lk, config)  # exact widening
    assert out.dtype == jnp.float32


def test_a_clipped_linear_memory_leaves_the_affine_sequence_parallel_path():
    """The clip's scale depends on the state, so sequence parallelism must not compose affine maps."""
    from titans_jax.sequence_parallel import is_affine

    linear = mem.MemoryConfig(key_dim=4, value_dim=4, depth=1, residual_norm=False)
    assert is_affine(linear)
    assert not is_affine(dataclasses.replace(linear, surprise_clip=1.0))


@pytest.mark.parametrize("use_bias", [False, True])
def test_residual_norm_read_ignores_the_last_layers_scale_and_its_gradient_scales_inversely(use_bias):
    """M(x) = x + LN(f(x)) with f's last layer linear: scaling that layer (and its bias) by c
    leaves the read unchanged and divides the layer's inner gradient by c (LN's eps negligible, here
    1e-30). What a forgetting gate that shrinks the weights does to the relative step
    (experiments.stream_drift --norms); without the norm, no such identity."""
    with jax.enable_x64(True):
        config = mem.MemoryConfig(key_dim=KEY_DIM, value_dim=KEY_DIM, depth=2, expansion=2, use_bias=use_bias,
                                  norm_eps=1e-30)
        params = make_params(config)
        weights = tuple({name: leaf[0] for name, leaf in layer.items()} for layer in params["layers"])
        norm = {name: leaf[0] for name, leaf in params["norm"].items()}
        key, value = (jax.random.normal(jax.random.key(seed), (KEY_DIM,), jnp.float64) for seed in (1, 2))
        c = 0.2
        scaled = (weights[0], jax.tree.map(lambda leaf: c * leaf, weights[1]))
        np.testing.assert_allclose(mem.memory_mlp(scaled, norm, key, config), mem.memory_mlp(weights, norm, key, config),
                                   rtol=1e-12)
        grads = jax.grad(mem.inner_loss)(weights, norm, key, value, config)
        grads_scaled = jax.grad(mem.inner_loss)(scaled, norm, key, value, config)
        for name in grads[1]:
            np.testing.assert_allclose(grads_scaled[1][name], grads[1][name] / c, rtol=1e-10)
        np.testing.assert_allclose(grads_scaled[0]["w"], grads[0]["w"], rtol=1e-10)  # f(x) scales, LN(f(x)) does not
        plain = dataclasses.replace(config, residual_norm=False)
        assert not np.allclose(mem.memory_mlp(scaled, None, key, plain), mem.memory_mlp(weights, None, key, plain))


@pytest.mark.parametrize("field", ["last_layer_floor", "every_layer_floor"])
def test_layer_floors_need_the_residual_norm_and_the_xla_path(field):
    with pytest.raises(ValueError, match=f"{field} needs residual_norm"):
        mem.MemoryConfig(key_dim=4, value_dim=4, residual_norm=False, **{field: True})
    with pytest.raises(ValueError, match=f"{field} is not implemented by the fused kernels"):
        mem.MemoryConfig(key_dim=4, value_dim=4, depth=1, impl="fused", **{field: True})


def _gate_dominated_inputs(length):
    """Inputs under which the forgetting gate outpaces the writes: the last layer shrinks."""
    keys, values, queries, theta, log_eta, _ = make_inputs(5, length)
    return keys, values, queries, 0.02 * theta, log_eta, jnp.full(theta.shape, np.log(0.8))


def _last_norm(weights):
    return np.sqrt(np.asarray(mem.layer_squared_norm(weights[-1])))


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_last_layer_floor_holds_the_norm_reads_alike_and_streams_exactly(impl):
    """MemoryConfig.last_layer_floor under a gate that shrinks the weights: the first chunk is
    untouched; the last layer's norm is M_0's after the first boundary and the last (tokens 5
    and 15; 0.8^5 a chunk without the floor); the floored state reads what the unfloored one reads (the LayerNorm
    ignores the last layer's scale) while the steps after it differ; pieces and single tokens
    give the one call's outputs and state."""
    chunk, length = 5, 17
    with jax.enable_x64(True):
        base = mem.MemoryConfig(key_dim=KEY_DIM, value_dim=KEY_DIM, depth=2, expansion=2, use_bias=True,
                                chunk_size=chunk, norm_eps=1e-30, impl=impl)
        floored = dataclasses.replace(base, last_layer_floor=True)
        params = make_params(base)
        inputs = _gate_dominated_inputs(length)
        initial = _last_norm(params["layers"])  # [H]
        free_out, _ = mem.memory_apply(params, *inputs, base)
        out, state = mem.memory_apply(params, *inputs, floored)
        np.testing.assert_array_equal(np.asarray(out[:, :, :chunk]), np.asarray(free_out[:, :, :chunk]))
        assert np.max(np.abs(np.asarray(out[:, :, chunk:] - free_out[:, :, chunk:]))) > 1e-3
        np.testing.assert_allclose(_last_norm(state.chunk_weights), np.broadcast_to(initial, (BATCH, HEADS)),
                                   rtol=1e-12)  # the boundary after token 15
        first = [x[:, :, :chunk] for x in inputs]  # one chunk: its end is a boundary
        _, free_state = mem.memory_apply(params, *first, base)
        _, floor_state = mem.memory_apply(params, *first, floored)
        scale = initial / _last_norm(free_state.weights)  # [B, H]
        assert np.all(scale > 1.6)
        for floor_tree, free_tree in ((floor_state.weights, free_state.weights),
                                      (floor_state.momentum, free_state.momentum)):  # the last layer scaled alike
            assert max_abs_diff(floor_tree[:-1], free_tree[:-1]) == 0
            for name, leaf in free_tree[-1].items():
                expected = leaf * scale.reshape(scale.shape + (1,) * (leaf.ndim - 2))
                np.testing.assert_allclose(floor_tree[-1][name], expected, rtol=1e-12)
        read = jax.vmap(jax.vmap(mem.memory_mlp, in_axes=(0, 0, 0, None)), in_axes=(0, None, 0, None))
        query = inputs[2][:, :, 0]  # the same read: the LayerNorm ignores the last layer's scale
        np.testing.assert_allclose(read(floor_state.weights, params["norm"], query, floored),
                                   read(free_state.weights, params["norm"], query, base), rtol=1e-11)
        pieces, pieces_state = stream(floored, params, inputs, [7, 4, 6])
        tokens, tokens_state = stream(floored, params, inputs, [1] * length)
    for other, other_state in ((pieces, pieces_state), (tokens, tokens_state)):
        assert max_abs_diff(other, out) < 1e-12
        assert max_abs_diff(other_state, state) < 1e-12


def test_every_layer_floor_holds_each_layers_norm_and_streams_exactly():
    """MemoryConfig.every_layer_floor under a gate that shrinks the weights: after a chunk every
    layer and its momentum are the unfloored ones scaled up to that layer's M_0 norm (each by its
    own factor), and the read changes (the first layer's scale passes through the activation);
    at the last boundary every layer is at M_0's norm; pieces and single tokens give the one
    call's outputs and state."""
    chunk, length = 5, 17
    with jax.enable_x64(True):
        base = mem.MemoryConfig(key_dim=KEY_DIM, value_dim=KEY_DIM, depth=2, expansion=2, use_bias=True,
                                chunk_size=chunk, norm_eps=1e-30)
        floored = dataclasses.replace(base, every_layer_floor=True)
        params = make_params(base)
        inputs = _gate_dominated_inputs(length)
        norms = lambda weights: [np.sqrt(np.asarray(mem.layer_squared_norm(layer))) for layer in weights]
        initial = norms(params["layers"])  # per layer [H]
        out, state = mem.memory_apply(params, *inputs, floored)
        for layer, expected in zip(norms(state.chunk_weights), initial):  # the boundary after token 15
            np.testing.assert_allclose(layer, np.broadcast_to(expected, (BATCH, HEADS)), rtol=1e-12)
        first = [x[:, :, :chunk] for x in inputs]
        _, free_state = mem.memory_apply(params, *first, base)
        _, floor_state = mem.memory_apply(params, *first, floored)
        scales = [r / n for r, n in zip(initial, norms(free_state.weights))]  # [B, H] per layer
        assert all(np.all(scale > 1.2) for scale in scales) and not np.allclose(scales[0], scales[1])
        for floor_tree, free_tree in ((floor_state.weights, free_state.weights),
                                      (floor_state.momentum, free_state.momentum)):
            for floor_layer, free_layer, scale in zip(floor_tree, free_tree, scales):
                for name, leaf in free_layer.items():
                    expected = leaf * scale.reshape(scale.shape + (1,) * (leaf.ndim - 2))
                    np.testing.assert_allclose(floor_layer[name], expected, rtol=1e-12)
        read = jax.vmap(jax.vmap(mem.memory_mlp, in_axes=(0, 0, 0, None)), in_axes=(0, None, 0, None))
        query = inputs[2][:, :, 0]
        assert max_abs_diff(read(floor_state.weights, params["norm"], query, floored),
                            read(free_state.weights, params["norm"], query, base)) > 1e-3
        pieces, pieces_state = stream(floored, params, inputs, [7, 4, 6])
        tokens, tokens_state = stream(floored, params, inputs, [1] * length)
    for other, other_state in ((pieces, pieces_state), (tokens, tokens_state)):
        assert max_abs_diff(other, out) < 1e-12
        assert max_abs_diff(other_state, state) < 1e-12
