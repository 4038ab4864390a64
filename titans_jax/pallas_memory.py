"""Fused Pallas (Triton) kernels for the linear memory's chunk scan, forward and backward: a GPU prototype.

Why: on a GPU the chunk scan of `memory.memory_apply` is latency-bound. XLA runs every chunk's
dozen small matmuls ([C, K] x [K, V], C = K = V = 64) as separate kernels, one chunk after the
other, so a 4K-token sequence is 64 x ~30 kernel launches on a device that could do the work of a
chunk in one (issue [P]: TTT at 4K on an H200 ran 15K tok/s forward+backward against
sliding-window attention's 195K). Here one Triton program runs the whole scan of one (batch,
head) slice: the state (W, S) stays in registers from chunk to chunk, each chunk is seven
`dot`s on [64, 64] tiles, and the gate coefficients, which need no state, are computed by XLA
for all chunks at once beforehand (`memory.chunk_coefficients`). The backward is a second
kernel: the reverse chunk scan, which recomputes each chunk from the chunk-start states the
forward stored and carries (dW, dS) back (`_chunk_backward` has the formulas); the gradients of
the coefficients go back to the gates through XLA's autodiff of `chunk_coefficients`.

Scope (checked, with a clear error otherwise): depth 1 (the linear memory of the paper's
ablation, `presets` "linear"), no bias, with or without the residual LayerNorm, momentum and
forgetting on or off, surprise clip, first-order or full surprise gradient, a fresh state (the
training / prefill path), any length (the last chunk may be short: it is padded with tokens that
leave the state alone, as in `chunk_coefficients`' validity mask).

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
is how the tests compare it, forward and gradients, with the reference in float64;
`lower_for_gpu` lowers both kernels to Triton IR on any machine, so an unsupported operation
shows up without a GPU. The forward was timed on an H200 (README, experiments.kernel_bench); the
backward kernel has not yet run on a GPU.
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
BACKWARDS = ("fused", "xla")
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


def _make_dot(precision: str, interpret: bool):
    """a @ b (a^T / b^T on request) for 2-D tiles at the kernel's precision; interpret mode runs on
    the host, where only plain full-precision products exist."""
    algorithm = jax.lax.Precision.HIGHEST if interpret else _DOT_ALGORITHMS[precision]

    def dot(a, b, trans_a=False, trans_b=False):
        dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
        return jax.lax.dot_general(a, b, dims, precision=algorithm, preferred_element_type=a.dtype)

    return dot


def _layer_norm_rows(z, scale, bias, eps):
    """-> (LN(z), normalised z, 1 / std) for the rows of z [C, V]; scale, bias [V]."""
    centred = z - jnp.mean(z, axis=1)[:, None]
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=1) + eps)[:, None]
    normed = centred * rstd
    return normed * scale[None, :] + bias[None, :], normed, rstd


def _key_delta(z, k, v, scale, bias, config):
    """Per-token output gradients of the inner loss at Z = K W_0 (rows independent), clipped."""
    if config.residual_norm:
        ln, normed, rstd = _layer_norm_rows(z, scale, bias, config.layer_norm_eps)
        grad_normed = scale[None, :] * (2.0 * config.loss_scale * (k + ln - v))  # dl/d(normed)
        delta = rstd * (grad_normed - jnp.mean(grad_normed, axis=1)[:, None]
                        - normed * jnp.mean(grad_normed * normed, axis=1)[:, None])
    else:
        delta = 2.0 * config.loss_scale * (z - v)
    if config.surprise_clip is not None:  # |u_j|^2 = |k_j|^2 |delta_j|^2
        squared = jnp.sum(k * k, axis=1) * jnp.sum(delta * delta, axis=1)
        delta = delta * mem.clip_scale(squared, config.surprise_clip)[:, None]
    return delta


def _read_out(y, q, scale, bias, config):
    """The memory's output from the first layer's pre-activation: q + LN(y), or y."""
    if config.residual_norm:
        return q + _layer_norm_rows(y, scale, bias, config.layer_norm_eps)[0]
    return y


def _chunk_forward(dot, w, s, k, v, q, g, beta, f, g_last, a_last, beta_c, f_c, m_c, scale, bias, config):
    """One chunk (module doc): -> (outputs [C, V], W_C, S_C). Vectors beta, f, g_last, a_last
    are [C]; beta_c, f_c, m_c scalars; g is G [C, C]."""
    key_w = jax.lax.stop_gradient(w) if config.surprise_gradient == "first_order" else w  # memory.surprise_point
    delta = _key_delta(dot(k, key_w), k, v, scale, bias, config)
    kernel = g * dot(q, k, trans_b=True)  # G o Q K^T
    y = beta[:, None] * dot(q, w) + f[:, None] * dot(q, s) - dot(kernel, delta)
    w_new = beta_c * w + f_c * s - dot(k, g_last[:, None] * delta, trans_a=True)
    s_new = m_c * s - dot(k, a_last[:, None] * delta, trans_a=True)
    return _read_out(y, q, scale, bias, config), w_new, s_new


def _chunk_backward(dot, w, s, k, v, q, g, beta, f, g_last, a_last, beta_c, f_c, m_c, scale, bias, config,
                    d_out, d_w_new, d_s_new):
    """The vector-Jacobian product of _chunk_forward, by hand where it is matmuls (recomputing the
    chunk's forward from its start state) and by jax.vjp for the row-wise key delta and read-out.

    With Km = G o P, P = Q K^T, and the forward's Z, Delta, y:
        dy            = read-out VJP of d_out
        dbeta, df     = rowsum(dy o Q W), rowsum(dy o Q S)
        dQ            = (beta dy) W^T + (f dy) S^T + (G o dKm) K (+ d_out through the residual)
        dKm           = -dy Delta^T,  dG = dKm o P,  dDelta = -Km^T dy
        W_C, S_C      : dW += beta_C dW_C, dS = f_C dW_C + m_C dS_C + Q^T (f dy),
                        dDelta -= g_last o (K dW_C) + a_last o (K dS_C),
                        dK -= (g_last o Delta) dW_C^T + (a_last o Delta) dS_C^T,
                        dbeta_C, df_C, dm_C = <W, dW_C>, <S, dW_C>, <S, dS_C>
        Delta(Z, K, V): jax.vjp -> dZ, dK, dV, and Z = K W: dK += dZ W^T, dW += K^T dZ
                        (not with surprise_gradient="first_order": W_0 is a constant there).
    Returns a dict of cotangents named like the arguments.
    """
    z = dot(k, w)
    delta, delta_vjp = jax.vjp(lambda z_, k_, v_, sc, bi: _key_delta(z_, k_, v_, sc, bi, config),
                               z, k, v, scale, bias)
    scores = dot(q, k, trans_b=True)
    kernel = g * scores
    qw, qs = dot(q, w), dot(q, s)
    y = beta[:, None] * qw + f[:, None] * qs - dot(kernel, delta)
    _, read_vjp = jax.vjp(lambda y_, q_, sc, bi: _read_out(y_, q_, sc, bi, config), y, q, scale, bias)
    d_y, d_q, d_scale, d_bias = read_vjp(d_out)

    d_beta = jnp.sum(d_y * qw, axis=1)
    d_f = jnp.sum(d_y * qs, axis=1)
    d_qw, d_qs = beta[:, None] * d_y, f[:, None] * d_y
    d_kernel = -dot(d_y, delta, trans_b=True)
    d_scores = g * d_kernel
    d_q = d_q + dot(d_qw, w, trans_b=True) + dot(d_qs, s, trans_b=True) + dot(d_scores, k)
    d_k = dot(d_scores, q, trans_a=True)
    d_w = beta_c * d_w_new + dot(q, d_qw, trans_a=True)
    d_s = f_c * d_w_new + m_c * d_s_new + dot(q, d_qs, trans_a=True)

    k_dw, k_ds = dot(k, d_w_new), dot(k, d_s_new)
    d_delta = -dot(kernel, d_y, trans_a=True) - g_last[:, None] * k_dw - a_last[:, None] * k_ds
    d_k = d_k - dot(g_last[:, None] * delta, d_w_new, trans_b=True) - dot(a_last[:, None] * delta, d_s_new,
                                                                           trans_b=True)
    d_z, d_k_delta, d_v, d_scale_key, d_bias_key = delta_vjp(d_delta)
    d_k = d_k + d_k_delta + dot(d_z, w, trans_b=True)
    if config.surprise_gradient != "first_order":
        d_w = d_w + dot(k, d_z, trans_a=True)
    return {"w": d_w, "s": d_s, "k": d_k, "v": d_v, "q": d_q, "g": d_kernel * scores, "beta": d_beta, "f": d_f,
            "g_last": -jnp.sum(delta * k_dw, axis=1), "a_last": -jnp.sum(delta * k_ds, axis=1),
            "beta_c": jnp.sum(w * d_w_new), "f_c": jnp.sum(s * d_w_new), "m_c": jnp.sum(s * d_s_new),
            "scale": d_scale + d_scale_key, "bias": d_bias + d_bias_key}


def _forward_kernel(w0_ref, keys_ref, values_ref, queries_ref, g_ref, beta_ref, f_ref, g_last_ref, a_last_ref,
                    m_ref, scale_ref, bias_ref, out_ref, chunk_w_ref, w_ref, s_ref, *start_refs, num_chunks, chunk,
                    config, precision, interpret):
    """One (batch, head) slice: the whole chunk scan. Refs hold this slice's rows (padded length
    N C); per-chunk vectors are [N C] (one row of coefficients per token), m_C is [N]. With
    start_refs (W and S at every chunk start, [N K, V] each) the states are kept for the backward."""
    dot = _make_dot(precision, interpret)
    scale, bias = scale_ref[...], bias_ref[...]
    key_dim = w0_ref.shape[0]

    def chunk_step(n, state):
        w, s = state
        if start_refs:
            start_refs[0][pl.ds(n * key_dim, key_dim), :] = w
            start_refs[1][pl.ds(n * key_dim, key_dim), :] = s
        rows = pl.ds(n * chunk, chunk)
        last = n * chunk + chunk - 1
        out, w_new, s_new = _chunk_forward(
            dot, w, s, keys_ref[rows, :], values_ref[rows, :], queries_ref[rows, :], g_ref[rows, :], beta_ref[rows],
            f_ref[rows], g_last_ref[rows], a_last_ref[rows], beta_ref[last], f_ref[last], m_ref[n], scale, bias,
            config)
        out_ref[rows, :] = out.astype(out_ref.dtype)
        return w_new, s_new

    state = (w0_ref[...], jnp.zeros(w0_ref.shape, w0_ref.dtype))
    state = jax.lax.fori_loop(0, num_chunks - 1, chunk_step, state)
    chunk_w_ref[...] = state[0]  # the weights at the start of the last chunk (MemoryState.chunk_weights)
    w, s = chunk_step(num_chunks - 1, state)
    w_ref[...] = w
    s_ref[...] = s


def _backward_kernel(keys_ref, values_ref, queries_ref, g_ref, beta_ref, f_ref, g_last_ref, a_last_ref, m_ref,
                     scale_ref, bias_ref, w_starts_ref, s_starts_ref, d_out_ref, d_w_ref, d_s_ref, d_chunk_w_ref,
                     d_keys_ref, d_values_ref, d_queries_ref, d_g_ref, d_beta_ref, d_f_ref, d_g_last_ref,
                     d_a_last_ref, d_m_ref, d_w0_ref, d_scale_ref, d_bias_ref, *, num_chunks, chunk, config,
                     precision, interpret, partial_last):
    """The reverse chunk scan of one slice: chunk by chunk from the last, the chunk's forward is
    recomputed from its stored start state and _chunk_backward carries (dW, dS) to its start.
    The scalars beta_C, f_C, m_C of a chunk get their cotangents in the chunk's last row of
    d_beta, d_f, d_m ([N C] each). partial_last: the last chunk is short, so d_chunk_w (the
    cotangent of MemoryState.chunk_weights) meets the state at its start, else at the end."""
    dot = _make_dot(precision, interpret)
    scale, bias = scale_ref[...], bias_ref[...]
    key_dim = d_w_ref.shape[0]
    is_last_row = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1

    def chunk_step(n, carry):
        d_w_new, d_s_new, d_scale, d_bias = carry
        rows = pl.ds(n * chunk, chunk)
        last = n * chunk + chunk - 1
        starts = pl.ds(n * key_dim, key_dim)
        grads = _chunk_backward(
            dot, w_starts_ref[starts, :], s_starts_ref[starts, :], keys_ref[rows, :], values_ref[rows, :],
            queries_ref[rows, :], g_ref[rows, :], beta_ref[rows], f_ref[rows], g_last_ref[rows], a_last_ref[rows],
            beta_ref[last], f_ref[last], m_ref[n], scale, bias, config, d_out_ref[rows, :], d_w_new, d_s_new)
        d_keys_ref[rows, :] = grads["k"]
        d_values_ref[rows, :] = grads["v"]
        d_queries_ref[rows, :] = grads["q"]
        d_g_ref[rows, :] = grads["g"]
        d_beta_ref[rows] = grads["beta"] + jnp.where(is_last_row, grads["beta_c"], 0.0)
        d_f_ref[rows] = grads["f"] + jnp.where(is_last_row, grads["f_c"], 0.0)
        d_g_last_ref[rows] = grads["g_last"]
        d_a_last_ref[rows] = grads["a_last"]
        d_m_ref[rows] = jnp.where(is_last_row, grads["m_c"], 0.0)
        return grads["w"], grads["s"], d_scale + grads["scale"], d_bias + grads["bias"]

    d_w = d_w_ref[...] + (0.0 if partial_last else d_chunk_w_ref[...])
    carry = (d_w, d_s_ref[...], jnp.zeros(scale.shape, scale.dtype), jnp.zeros(bias.shape, bias.dtype))
    d_w, d_s, d_scale, d_bias = chunk_step(num_chunks - 1, carry)
    if partial_last:
        d_w = d_w + d_chunk_w_ref[...]
    d_w, _, d_scale, d_bias = jax.lax.fori_loop(
        0, num_chunks - 1, lambda i, c: chunk_step(num_chunks - 2 - i, c), (d_w, d_s, d_scale, d_bias))
    d_w0_ref[...] = d_w
    d_scale_ref[...] = d_scale
    d_bias_ref[...] = d_bias


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


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Everything static about one call (hashable: custom_vjp's non-differentiable argument)."""
    config: mem.MemoryConfig
    batch: int
    heads: int
    length: int
    interpret: bool
    precision: str
    num_warps: int
    num_stages: int
    backward: str

    @property
    def num_chunks(self) -> int:
        return -(-self.length // self.config.chunk_size)

    @property
    def padded(self) -> int:
        return self.num_chunks * self.config.chunk_size

    def spec(self, *shape):
        """One slice's block of an [S, *shape] array (grid: one program per slice)."""
        return pl.BlockSpec((_SQUEEZED,) + shape, lambda i: (i,) + (0,) * len(shape))

    def call(self, kernel, inputs, out_shapes, name):
        """pallas_call over the S = B H slices; inputs and outputs are [S, ...] arrays."""
        return pl.pallas_call(
            functools.partial(kernel, num_chunks=self.num_chunks, chunk=self.config.chunk_size, config=self.config,
                              precision=self.precision, interpret=self.interpret),
            grid=(self.batch * self.heads,),
            in_specs=[self.spec(*x.shape[1:]) for x in inputs],
            out_specs=[self.spec(*shape) for shape, _ in out_shapes],
            out_shape=[jax.ShapeDtypeStruct((self.batch * self.heads,) + shape, dtype) for shape, dtype in out_shapes],
            interpret=self.interpret,
            compiler_params=pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages),
            name=name,
        )(*inputs)


def _slice_inputs(launch: _Launch, w0, norm_scale, norm_bias, keys, values, queries, gates):
    """[B, H, ...] arrays -> the kernels' [S, ...] inputs, padded to whole chunks, and the
    chunk coefficients (from the gates, by XLA, all chunks at once)."""
    batch, heads, length, padded = launch.batch, launch.heads, launch.length, launch.padded
    slices, value_dim = batch * heads, values.shape[-1]

    def per_slice(x):
        x = x.reshape((slices,) + x.shape[2:])
        return jnp.pad(x, ((0, 0), (0, padded - length)) + ((0, 0),) * (x.ndim - 2))

    if norm_scale is None:
        norm_scale = norm_bias = jnp.zeros((heads, value_dim), w0.dtype)
    norm = [jnp.broadcast_to(x, (batch, heads, value_dim)).reshape(slices, value_dim) for x in (norm_scale, norm_bias)]
    w0 = jnp.broadcast_to(w0, (batch,) + w0.shape).reshape((slices,) + w0.shape[1:])  # M_0 per head
    coefficients = _coefficients(gates.reshape(slices, length, 3), length, launch.config.chunk_size)
    return w0, [per_slice(keys), per_slice(values), per_slice(queries)], list(coefficients), norm


def _run_forward(launch: _Launch, w0, norm_scale, norm_bias, keys, values, queries, gates, save_states: bool):
    """-> (outputs [B, H, T, V], final weights, final momentum, the weights at the last chunk
    boundary) and, with save_states, W and S at every chunk start ([S, N K, V] each)."""
    w0, data, coefficients, norm = _slice_inputs(launch, w0, norm_scale, norm_bias, keys, values, queries, gates)
    key_dim, value_dim = w0.shape[1:]
    dtype = w0.dtype
    state = ((key_dim, value_dim), dtype)
    starts = [((launch.num_chunks * key_dim, value_dim), dtype)] * 2 if save_states else []
    out, chunk_w, w, s, *saved = launch.call(
        _forward_kernel, [w0, *data, *coefficients, *norm],
        [((launch.padded, value_dim), dtype), state, state, state, *starts], "titans_linear_memory_forward")
    unflat = lambda x: x.reshape((launch.batch, launch.heads) + x.shape[1:])  # noqa: E731
    if launch.length % launch.config.chunk_size == 0:  # the last chunk is complete: the gradient point moved on
        chunk_w = w
    return (unflat(out[:, :launch.length]), unflat(w), unflat(s), unflat(chunk_w)), saved


def _xla_forward(w0, norm_scale, norm_bias, keys, values, queries, gates, config):
    """The same four arrays from memory.memory_apply (impl="chunked"): the gradient's definition."""
    params = {"layers": ({"w": w0},)}
    if norm_scale is not None:
        params["norm"] = {"scale": norm_scale, "bias": norm_bias}
    config = dataclasses.replace(config, impl="chunked")
    out, state = mem.memory_apply(params, keys, values, queries, gates[..., 0], gates[..., 1], gates[..., 2], config)
    return out, state.weights[0]["w"], state.momentum[0]["w"], state.chunk_weights[0]["w"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(w0, norm_scale, norm_bias, keys, values, queries, gates, launch):
    return _run_forward(launch, w0, norm_scale, norm_bias, keys, values, queries, gates, save_states=False)[0]


def _fused_fwd(w0, norm_scale, norm_bias, keys, values, queries, gates, launch):
    outputs, saved = _run_forward(launch, w0, norm_scale, norm_bias, keys, values, queries, gates,
                                  save_states=launch.backward == "fused")
    return outputs, ((w0, norm_scale, norm_bias, keys, values, queries, gates), saved)


def _fused_bwd(launch, residuals, cotangents):
    inputs, saved = residuals
    if launch.backward == "xla":
        return jax.vjp(functools.partial(_xla_forward, config=launch.config), *inputs)[1](cotangents)
    w0, norm_scale, norm_bias, keys, values, queries, gates = inputs
    d_out, d_w, d_s, d_chunk_w = cotangents
    slices, length, padded, chunk = launch.batch * launch.heads, launch.length, launch.padded, launch.config.chunk_size
    _, data, coefficients, norm = _slice_inputs(launch, *inputs)
    d_out = jnp.pad(d_out.reshape((slices, length, -1)), ((0, 0), (0, padded - length), (0, 0)))
    flat = [x.reshape((slices,) + x.shape[2:]) for x in (d_w, d_s, d_chunk_w)]
    shapes = [(x.shape[1:], x.dtype) for x in (*data, *coefficients[:5])]
    shapes += [((padded,), gates.dtype), (w0.shape[1:], w0.dtype), (norm[0].shape[1:], w0.dtype),
               (norm[1].shape[1:], w0.dtype)]
    (d_keys, d_values, d_queries, d_g, d_beta, d_f, d_g_last, d_a_last, d_m, d_w0, d_scale, d_bias) = launch.call(
        functools.partial(_backward_kernel, partial_last=length % chunk != 0),
        [*data, *coefficients, *norm, *saved, d_out, *flat], shapes, "titans_linear_memory_backward")
    d_m = d_m.reshape(slices, launch.num_chunks, chunk)[:, :, -1]  # only a chunk's last row carries m_C
    _, coefficients_vjp = jax.vjp(lambda x: _coefficients(x, length, chunk), gates.reshape(slices, length, 3))
    (d_gates,) = coefficients_vjp((d_g, d_beta, d_f, d_g_last, d_a_last, d_m))
    unflat = lambda x: x[:, :length].reshape((launch.batch, launch.heads, length) + x.shape[2:])  # noqa: E731
    per_head = lambda x: x.reshape((launch.batch, launch.heads) + x.shape[1:]).sum(0)  # noqa: E731
    d_norm = (None, None) if norm_scale is None else (per_head(d_scale), per_head(d_bias))
    return (per_head(d_w0), *d_norm, unflat(d_keys), unflat(d_values), unflat(d_queries),
            d_gates.reshape(gates.shape))


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_memory_apply(params: dict, keys: Array, values: Array, queries: Array, theta: Array,
                       log_eta: Array | None, log_keep: Array | None, config: mem.MemoryConfig, *,
                       interpret: bool = False, precision: str = "tf32x3", num_warps: int | None = None,
                       num_stages: int = 2, backward: str = "fused") -> tuple[Array, mem.MemoryState]:
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
      backward: "fused" (the reverse chunk scan kernel, from the chunk-start states the forward
        keeps: N K V floats per slice more memory, as many as the keys when C = V) or "xla"
        (jax.vjp of the XLA chunked path, recomputing its forward).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    mem._check_params(params, config)
    batch, heads, length = mem._check_inputs(keys, values, queries, theta, log_eta, log_keep, config)
    dtype = params["layers"][0]["w"].dtype
    check_supported(config, params, dtype, interpret)
    keys, values, queries, gates = mem.prepare_inputs(keys, values, queries, theta, log_eta, log_keep, dtype)
    norm = params.get("norm")
    norm_scale, norm_bias = (None, None) if norm is None else (norm["scale"], norm["bias"])
    key_dim, value_dim = params["layers"][0]["w"].shape[1:]
    if num_warps is None:  # the fastest on an H200 for a 64 x 64 state, chunk 64 (kernel_bench_gpu_h200*.txt)
        num_warps = 8 if precision == "tf32" and key_dim * value_dim >= 64 * 64 else 4
    launch = _Launch(config, batch, heads, length, interpret, precision, num_warps, num_stages, backward)
    out, w, s, chunk_w = _fused(params["layers"][0]["w"], norm_scale, norm_bias, keys, values, queries, gates, launch)
    state = mem.MemoryState(weights=({"w": w},), momentum=({"w": s},), chunk_weights=({"w": chunk_w},),
                            num_pending=jnp.asarray(length % config.chunk_size, jnp.int32))
    return out, state


def lower_for_gpu(params: dict, keys, values, queries, theta, log_eta, log_keep, config: mem.MemoryConfig,
                  with_backward: bool = False, **kwargs) -> str:
    """The StableHLO text of fused_memory_apply (with_backward: of the gradient of its outputs'
    sum, so the backward kernel too) lowered for CUDA, where it holds the Triton IR, on any
    machine: a check that every operation of the kernels has a Triton lowering, without a GPU."""
    def apply(params, *inputs):
        return fused_memory_apply(params, *inputs, config, **kwargs)[0]

    fn = jax.grad(lambda *a: jnp.sum(apply(*a)), argnums=tuple(range(7))) if with_backward else apply
    return jax.jit(fn).trace(params, keys, values, queries, theta, log_eta, log_keep).lower(
        lowering_platforms=("cuda",)).as_text()
