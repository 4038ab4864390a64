"""A fused Pallas (Triton) forward of the linear memory's chunk scan: a GPU prototype.

Why: on a GPU the chunk scan of `memory.memory_apply` is latency-bound. XLA runs every chunk's
dozen small matmuls ([C, K] x [K, V], C = K = V = 64) as separate kernels, one chunk after the
other, so a 4K-token sequence is 64 x ~30 kernel launches on a device that could do the work of a
chunk in one (issue [P]: TTT at 4K on an H200 ran 15K tok/s forward+backward against
sliding-window attention's 195K). Here one Triton program runs the whole scan of one (batch,
head) slice: the state (W, S) stays in registers from chunk to chunk, each chunk is seven
`dot`s on [64, 64] tiles, and the gate coefficients, which need no state, are computed by XLA
for all chunks at once beforehand (`memory.chunk_coefficients`).

Scope (checked, with a clear error otherwise): depth 1 (the linear memory of the paper's
ablation, `presets` "linear"), no bias, with or without the residual LayerNorm, momentum and
forgetting on or off, surprise clip, a fresh state (the training / prefill path), any length
(the last chunk may be short: it is padded with tokens that leave the state alone, as in
`chunk_coefficients`' validity mask). Forward only: the gradient is the XLA chunked path's,
recomputed in the backward pass (`jax.custom_vjp`), so training is not faster with it.

Per chunk, from the chunk-start state (W_0, S_0) and the coefficients beta, f, G, A, m of
`memory.chunk_coefficients` (titans.md §2; `memory._chunk_step` is the same for depth 1):

    Z     = K W_0                              key path at the chunk-start weights, [C, V]
    Delta = dl/dZ per row                      2 ls (Z - V), or through x + LN(z) with the norm
    clip  Delta_j *= min(1, clip / (|k_j| |Delta_j|))        (the token's gradient is k_j^T Delta_j)
    Y     = diag(beta) Q W_0 + diag(f) Q S_0 - (G o Q K^T) Delta       then Q + LN(Y) with the norm
    W_C   = beta_C W_0 + f_C S_0 - K^T (G[C-1, :]^T o Delta)
    S_C   = m_C S_0 - K^T (A[C-1, :]^T o Delta)

`fused_memory_apply` has `memory.memory_apply`'s signature for a fresh state and returns the
same outputs and MemoryState. On CPU it runs in Pallas' interpret mode (`interpret=True`), which
is how the tests compare it with the reference in float64; `lower_for_gpu` lowers it to Triton IR
on any machine, so an unsupported operation shows up without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from titans_jax import memory as mem

Array = jax.Array
# Products of float32 tiles on the GPU (Triton's input precisions): three TensorFloat-32 passes
# (~float32 accuracy on tensor cores), IEEE float32 (CUDA cores), or one TensorFloat-32 pass.
_DOT_ALGORITHMS = {"tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
                   "highest": jax.lax.DotAlgorithmPreset.F32_F32_F32,
                   "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32}
PRECISIONS = tuple(_DOT_ALGORITHMS)
_SQUEEZED = getattr(pl, "squeezed", None)  # a block dimension that is dropped (None in older jax)


def check_supported(config: mem.MemoryConfig, params: dict, dtype, interpret: bool) -> None:
    """Raise ValueError naming what the kernel does not cover (never a silent fallback)."""
    if config.depth != 1:
        raise ValueError(f"fused_memory_apply covers the linear memory (MemoryConfig.depth=1), got depth "
                         f"{config.depth}: use memory.memory_apply")
    if config.use_bias or "b" in params["layers"][0]:
        raise ValueError("fused_memory_apply covers memories without biases (MemoryConfig.use_bias=False)")
    if interpret:
        return
    if jnp.dtype(dtype) != jnp.float32:
        raise ValueError(f"the compiled kernel computes in float32, got {jnp.dtype(dtype).name} inputs (float64 "
                         "runs with interpret=True)")
    for name in ("chunk_size", "key_dim", "value_dim"):
        size = getattr(config, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"the compiled kernel needs MemoryConfig.{name} a power of two >= 16 (Triton tile "
                             f"sizes), got {size}")


def _forward_kernel(w0_ref, keys_ref, values_ref, queries_ref, g_ref, beta_ref, f_ref, g_last_ref, a_last_ref,
                    m_ref, scale_ref, bias_ref, out_ref, chunk_w_ref, w_ref, s_ref, *, num_chunks, chunk, config,
                    precision, interpret):
    """One (batch, head) slice: the whole chunk scan. Refs hold this slice's rows (padded length
    N C); per-chunk vectors are [N C] (one row of coefficients per token), m_C is [N]."""
    # interpret mode runs on the host, where only plain full-precision products exist
    algorithm = jax.lax.Precision.HIGHEST if interpret else _DOT_ALGORITHMS[precision]

    def dot(a, b, trans_a=False, trans_b=False):
        dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
        return jax.lax.dot_general(a, b, dims, precision=algorithm, preferred_element_type=a.dtype)
    two_ls = 2.0 * config.loss_scale
    eps = config.layer_norm_eps
    if config.residual_norm:
        norm_scale = scale_ref[...][None, :]
        norm_bias = bias_ref[...][None, :]

    def layer_norm(z):  # -> (LN(z), normalised z, 1 / std), rows of [C, V]
        centred = z - jnp.mean(z, axis=1)[:, None]
        rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=1) + eps)[:, None]
        normed = centred * rstd
        return normed * norm_scale + norm_bias, normed, rstd

    def chunk_step(n, state):
        w, s = state
        rows = pl.ds(n * chunk, chunk)
        k = keys_ref[rows, :]
        v = values_ref[rows, :]
        q = queries_ref[rows, :]
        z = dot(k, w)
        if config.residual_norm:
            ln, normed, rstd = layer_norm(z)
            grad_pred = norm_scale * (two_ls * (k + ln - v))  # dl/d(normed)
            delta = rstd * (grad_pred - jnp.mean(grad_pred, axis=1)[:, None]
                            - normed * jnp.mean(grad_pred * normed, axis=1)[:, None])
        else:
            delta = two_ls * (z - v)
        if config.surprise_clip is not None:  # |u_j|^2 = |k_j|^2 |delta_j|^2
            squared = jnp.sum(k * k, axis=1) * jnp.sum(delta * delta, axis=1)
            delta = delta * mem.clip_scale(squared, config.surprise_clip)[:, None]
        beta = beta_ref[rows][:, None]
        f = f_ref[rows][:, None]
        kernel = g_ref[rows, :] * dot(q, k, trans_b=True)  # G o Q K^T, [C, C]
        y = beta * dot(q, w) + f * dot(q, s) - dot(kernel, delta)
        if config.residual_norm:
            y = q + layer_norm(y)[0]
        out_ref[rows, :] = y.astype(out_ref.dtype)
        last = n * chunk + chunk - 1
        beta_c, f_c, m_c = beta_ref[last], f_ref[last], m_ref[n]
        w_new = beta_c * w + f_c * s - dot(k, g_last_ref[rows][:, None] * delta, trans_a=True)
        s_new = m_c * s - dot(k, a_last_ref[rows][:, None] * delta, trans_a=True)
        return w_new, s_new

    state = (w0_ref[...], jnp.zeros(w0_ref.shape, w0_ref.dtype))
    state = jax.lax.fori_loop(0, num_chunks - 1, chunk_step, state)
    chunk_w_ref[...] = state[0]  # the weights at the start of the last chunk (MemoryState.chunk_weights)
    w, s = chunk_step(num_chunks - 1, state)
    w_ref[...] = w
    s_ref[...] = s


def _coefficients(gates: Array, length: int, chunk: int):
    """Gates [S, T, 3] -> per-token rows of the chunk coefficients over the padded length N C:
    G [S, N C, C], beta, f, G[C-1, :], A[C-1, :] as [S, N C] and m_C [S, N]. Padding tokens have
    theta = 0, eta = 1 - alpha = 1 and are not valid (they leave the state alone)."""
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    gates = jnp.pad(gates, ((0, 0), (0, pad), (0, 0)))
    valid = (jnp.arange(num_chunks * chunk) < length).reshape(num_chunks, chunk)
    gates = gates.reshape(gates.shape[0], num_chunks, chunk, 3)
    per_chunk = jax.vmap(mem.chunk_coefficients, in_axes=(0, 0, 0, 0))
    a_mat, g_mat, m_vec, beta, f_vec = jax.vmap(per_chunk, in_axes=(0, 0, 0, None))(
        gates[..., 0], gates[..., 1], gates[..., 2], valid)
    flat = lambda x: x.reshape(x.shape[0], num_chunks * chunk, *x.shape[3:])  # noqa: E731
    return (flat(g_mat), flat(beta), flat(f_vec), flat(g_mat[:, :, -1, :]), flat(a_mat[:, :, -1, :]),
            m_vec[:, :, -1])


def _fused_forward(w0, norm_scale, norm_bias, keys, values, queries, gates, config, interpret, precision, num_warps,
                   num_stages):
    """M_0 [H, K, V], norm [H, V] (or None), [B, H, ...] inputs -> (outputs [B, H, T, V], final
    weights, final momentum, the weights at the last chunk boundary), all [B, H, ...]."""
    batch, heads, length, key_dim = keys.shape
    value_dim = values.shape[-1]
    chunk = config.chunk_size
    num_chunks = -(-length // chunk)
    padded = num_chunks * chunk
    slices = batch * heads
    dtype = w0.dtype

    def per_slice(x):
        x = x.reshape((slices,) + x.shape[2:])
        return jnp.pad(x, ((0, 0), (0, padded - length)) + ((0, 0),) * (x.ndim - 2))

    keys, values, queries = per_slice(keys), per_slice(values), per_slice(queries)
    coefficients = _coefficients(gates.reshape(slices, length, 3), length, chunk)
    w0 = jnp.broadcast_to(w0, (batch,) + w0.shape).reshape(slices, key_dim, value_dim)  # M_0 per head
    if norm_scale is None:
        norm_scale = norm_bias = jnp.zeros((heads, value_dim), dtype)
    norm_scale, norm_bias = (jnp.broadcast_to(x, (batch, heads, value_dim)).reshape(slices, value_dim)
                             for x in (norm_scale, norm_bias))

    def spec(*shape):  # this slice's block of a [S, *shape] array
        return pl.BlockSpec((_SQUEEZED,) + shape, lambda i: (i,) + (0,) * len(shape))

    state_spec = spec(key_dim, value_dim)
    kernel = functools.partial(_forward_kernel, num_chunks=num_chunks, chunk=chunk, config=config,
                               precision=precision, interpret=interpret)
    state_shape = jax.ShapeDtypeStruct((slices, key_dim, value_dim), dtype)
    if num_warps is None:  # the fastest on an H200 for a 64 x 64 state, chunk 64 (kernel_bench_gpu_h200*.txt)
        num_warps = 8 if precision == "tf32" and key_dim * value_dim >= 64 * 64 else 4
    out, chunk_w, w, s = pl.pallas_call(
        kernel,
        grid=(slices,),
        in_specs=[state_spec, spec(padded, key_dim), spec(padded, value_dim), spec(padded, key_dim),
                  spec(padded, chunk), spec(padded), spec(padded), spec(padded), spec(padded), spec(num_chunks),
                  spec(value_dim), spec(value_dim)],
        out_specs=[spec(padded, value_dim), state_spec, state_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct((slices, padded, value_dim), dtype), state_shape, state_shape, state_shape],
        interpret=interpret,
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="titans_linear_memory_forward",
    )(w0, keys, values, queries, *coefficients, norm_scale, norm_bias)
    unflat = lambda x: x.reshape((batch, heads) + x.shape[1:])  # noqa: E731
    if length % chunk == 0:  # the last chunk is complete: the gradient point moved to its end
        chunk_w = w
    return unflat(out[:, :length]), unflat(w), unflat(s), unflat(chunk_w)


def _xla_forward(w0, norm_scale, norm_bias, keys, values, queries, gates, config):
    """The same four arrays from memory.memory_apply (impl="chunked"): the gradient's definition."""
    params = {"layers": ({"w": w0},)}
    if norm_scale is not None:
        params["norm"] = {"scale": norm_scale, "bias": norm_bias}
    config = dataclasses.replace(config, impl="chunked")
    out, state = mem.memory_apply(params, keys, values, queries, gates[..., 0], gates[..., 1], gates[..., 2], config)
    return out, state.weights[0]["w"], state.momentum[0]["w"], state.chunk_weights[0]["w"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _fused(w0, norm_scale, norm_bias, keys, values, queries, gates, config, interpret, precision, num_warps,
           num_stages):
    return _fused_forward(w0, norm_scale, norm_bias, keys, values, queries, gates, config, interpret, precision,
                          num_warps, num_stages)


def _fused_fwd(w0, norm_scale, norm_bias, keys, values, queries, gates, config, interpret, precision, num_warps,
               num_stages):
    outputs = _fused_forward(w0, norm_scale, norm_bias, keys, values, queries, gates, config, interpret, precision,
                             num_warps, num_stages)
    return outputs, (w0, norm_scale, norm_bias, keys, values, queries, gates)


def _fused_bwd(config, interpret, precision, num_warps, num_stages, residuals, cotangents):
    _, vjp = jax.vjp(functools.partial(_xla_forward, config=config), *residuals)
    return vjp(cotangents)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_memory_apply(params: dict, keys: Array, values: Array, queries: Array, theta: Array,
                       log_eta: Array | None, log_keep: Array | None, config: mem.MemoryConfig, *,
                       interpret: bool = False, precision: str = "tf32x3", num_warps: int | None = None,
                       num_stages: int = 2) -> tuple[Array, mem.MemoryState]:
    """memory.memory_apply for a fresh state (state=None), by the fused kernel (module doc).

    Same arguments and results as memory_apply, plus:
      interpret: run the kernel in Pallas' interpreter (any backend and dtype; the CPU tests).
      precision: of the products of float32 tiles on the GPU. "tf32x3" (three TensorFloat-32
        passes; outputs within 7e-7 of float64, like XLA's "highest"), "tf32" (one pass, 1e-3:
        what XLA's default float32 precision does on a GPU) or "highest" (IEEE float32 on CUDA
        cores: exact but 5x slower than XLA there). Measured on an H200 at batch 2 x 4096, 8 x 64
        heads: 4.0M / 8.2M / 0.5M tok/s against XLA's 2.7M (highest) / 3.3M (default).
      num_warps, num_stages: Triton's launch settings. None: 8 warps for "tf32" with a 64 x 64
        state, else 4; 2 stages (the fastest measured there).
    Differentiable: the backward pass recomputes the XLA chunked path (module doc); it is not a
    fused backward, so forward+backward is no faster than XLA's.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    mem._check_params(params, config)
    batch, heads, length = mem._check_inputs(keys, values, queries, theta, log_eta, log_keep, config)
    dtype = params["layers"][0]["w"].dtype
    check_supported(config, params, dtype, interpret)
    keys, values, queries, gates = mem.prepare_inputs(keys, values, queries, theta, log_eta, log_keep, dtype)
    norm = params.get("norm")
    norm_scale, norm_bias = (None, None) if norm is None else (norm["scale"], norm["bias"])
    out, w, s, chunk_w = _fused(params["layers"][0]["w"], norm_scale, norm_bias, keys, values, queries, gates, config,
                                interpret, precision, num_warps, num_stages)
    state = mem.MemoryState(weights=({"w": w},), momentum=({"w": s},), chunk_weights=({"w": chunk_w},),
                            num_pending=jnp.asarray(length % config.chunk_size, jnp.int32))
    return out, state


def lower_for_gpu(params: dict, keys, values, queries, theta, log_eta, log_keep, config: mem.MemoryConfig,
                  **kwargs) -> str:
    """The StableHLO text of fused_memory_apply lowered for CUDA (it holds the Triton IR), on any
    machine: a check that every operation of the kernel has a Triton lowering, without a GPU."""
    fn = jax.jit(functools.partial(fused_memory_apply, config=config, **kwargs))
    return fn.trace(params, keys, values, queries, theta, log_eta, log_keep).lower(
        lowering_platforms=("cuda",)).as_text()
