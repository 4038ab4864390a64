"""The Titans neural long-term memory (arXiv 2501.00663, §3): a pure-functional core.

The memory M is a small MLP whose weights are trained at test time. For every token t of one
(batch, head) slice, with key k_t, value v_t, query q_t and data-dependent gates:

    inner loss        l(M; x_t) = loss_scale * ||M(k_t) - v_t||^2            (eq. 12)
    surprise          S_t = eta_t S_{t-1} - theta_t grad_M l(M_{t-1}; x_t)     (eq. 10, 14)
    forgetting        M_t = (1 - alpha_t) M_{t-1} + S_t                        (eq. 13)
    retrieval         y_t = M_t(q_t)                                           (eq. 15)

Training is chunked (§3.2, eq. 16): inside a chunk of `chunk_size` tokens every gradient is taken
at the chunk-start weights. This mini-batch approximation defines the model (chunk_size = 1 is
plain online gradient descent), so streaming/decoding reproduces it exactly: the state carries
the running weights and momentum after the last token and the weights at the start of the
unfinished chunk, where its gradients are taken. One more token is then one step of the
recurrence (`token_step`), whatever the chunk size.

Three implementations share one signature and are selected by `MemoryConfig.impl`:

* ``reference``   token-by-token `lax.scan`; each gradient by `jax.grad` at the chunk-start
                  weights. Slow and obviously correct.
* ``chunked``     the matmul ("dual") form (`_chunk_step` has the formulas): per chunk and layer, only
                  [C, C] coefficient matrices and [C, I] / [C, O] activations; never a
                  per-token [C, I, O] weight tensor. The fast path and the default.
* ``associative`` the paper's literal recipe: per-token gradients at chunk start materialised
                  as [C, I, O], momentum and decay by `lax.associative_scan`. A cross-check.

Each call takes one of three paths (the same for every implementation where it applies): a
fresh state runs whole chunks from M_0 and one shorter chunk for the rest (training); a carried
state lays the new tokens out behind its pending ones in whole chunks and masks the rest (the
chunk steps take a validity mask); one token with a carried state is `token_step`.

Dimension letters used in shapes:
    B batch, H heads, T tokens in one call, L padded length, C chunk size, N number of chunks,
    K key width, V value width, I / O input / output width of one memory layer.

Gates arrive per token and head as ``theta`` (step size, > 0), ``log_eta`` (log momentum
decay, <= 0, -inf switches momentum off) and ``log_keep`` (log(1 - alpha), <= 0). Products of
gates over a chunk are sums in log space (segment sums), never products of small numbers.

Pytrees:
    MemoryParams (outer, learned by backprop):
        {"layers": ({"w": [H, I, O], "b": [H, O]?}, ...),      # M_0, the initial memory
         "norm": {"scale": [H, V], "bias": [H, V]}?}            # only with residual_norm
    inner weights / momentum (in MemoryState): ({"w": [B, H, I, O], "b": [B, H, O]?}, ...)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

IMPLEMENTATIONS = ("chunked", "reference", "associative")  # every configuration
KERNEL_IMPLEMENTATIONS = ("fused",)  # titans_jax.pallas_memory: the linear memory, fresh state (module doc)
SURPRISE_GRADIENTS = ("full", "first_order")
NORM_EPS = 1e-6  # the one default epsilon of every norm (model RMSNorms, LMM output norm, memory LayerNorm)
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Shape and semantics of the memory MLP and its test-time training.

    Attributes:
      key_dim / value_dim: K and V (per head). None: set by the enclosing layer (LMMConfig fills
        in its head_dim); the core functions need them set.
      depth: L_M, number of linear layers (1 = the linear memory of the paper's ablation).
      expansion: hidden width = expansion * key_dim for depth >= 2.
      activation: between layers; one of ACTIVATIONS ("gelu" is the tanh approximation).
      residual_norm: M(x) = x + LayerNorm(f(x)) (MIRAS form; the default); needs key_dim ==
        value_dim. The LayerNorm's scale/bias are outer parameters, fixed during the inner loop.
        False: the plain MLP f(x) of the paper's equations.
      use_bias: biases in the memory layers (trained by the inner loop like the weights).
      chunk_size: tokens per inner mini-batch (a model hyperparameter, see module doc).
      loss_scale: l = loss_scale * ||M(k) - v||^2 (0.5 gives the delta rule for L_M = 1).
      remat_every: checkpoint the chunk scan every this many chunks (0 = no remat).
      impl: one of IMPLEMENTATIONS, or "fused": the Pallas/Triton kernels of
        titans_jax.pallas_memory for a fresh state (depth 1, no bias; compiled on a GPU,
        interpreted elsewhere, which is slow), the chunked form for a carried state.
      norm_eps: epsilon of the residual LayerNorm. None: the enclosing layer's norm_eps
        (NORM_EPS when used on its own).
      surprise_gradient: how the outer gradient treats the weights W_0 at which a chunk's
        surprises are taken. "full" (the default): exact, through grad l(W_0; x) into W_0 as well,
        so backprop runs the inner optimiser's Jacobian (1 - alpha) I - theta * Hessian chunk
        after chunk. "first_order": W_0 is a constant there (stop_gradient, as first-order MAML);
        the forward is unchanged, the gradient still reaches every key, value, query and gate
        (and M_0 through decay and retrieval), but the backward pass through the memory's state
        is the linear decay/momentum recurrence, which cannot grow with the context. With the
        exact gradient, a trained MAC block with strong forgetting (alpha ~0.03) had a gradient
        w.r.t. keys 1K tokens back 3e10 times that of recent keys while its forward stayed
        bounded (experiments/results/long_context_gate_trace_cpu.md, which also gives our reading:
        the residual LayerNorm makes the memory scale-invariant, and forgetting then keeps the
        inner optimiser in a regime of large, chaotic steps).
      surprise_clip: None (the paper's update) or a positive cap on each token's surprise: the
        token's gradient u_t (all layers' weights and biases together) is scaled by
        min(1, surprise_clip / ||u_t||) before momentum, i.e. theta_t becomes
        theta_t min(1, surprise_clip / ||u_t||) (the per-token clipping of titans-pytorch's
        max_grad_norm, there per parameter tensor and soft; here one hard Frobenius cap per
        token). Under the residual LayerNorm the inner gradient scales like 1/|W|, so forgetting
        that shrinks the weights makes the next step huge: a trained mini MAC's memory weights
        swung from 4e-5 to 2e10 along one row and float32 overflowed
        (experiments/results/long_context_probe_cpu.md). The cap bounds every token's write to
        theta_t * surprise_clip. The outer gradient flows through the scale (it is a function
        of u_t); the clipped update is no longer affine in the state.
      last_layer_floor: False (the paper's update) or True: at every chunk boundary the last
        layer's weights and bias, and their momentum, are scaled by c = max(1, r / |W_L|), r the
        Frobenius norm of M_0's last layer (per head, weights and bias together): the forgetting
        gate can no longer shrink that layer below its initial norm. Under the residual LayerNorm
        (required) the read ignores the last layer's scale (up to the norm's epsilon), so this
        changes no read at the boundary; it changes the steps after it, whose size relative to
        the weights would otherwise grow like 1 / |W_L|^2 as the gate shrinks them (the
        amplifying layers of experiments/results/long_context_niah_cpu.md, "What the later
        writes do to it"). The momentum is scaled alike so that it keeps its size relative to
        the weights. Not affine in the state; not in the fused kernels.
      every_layer_floor: the same floor on every layer of the MLP, each at its own M_0 norm
        (implies last_layer_floor's; same requirements). With the last layer held, a gate shrinks
        the layers before it instead, and where W_1 k is small the activation is nearly linear, so
        under the LayerNorm W_1 is nearly scale-free too and its relative step grows the same way
        (experiments.stream_drift --norms, by layer of the MLP). Unlike the last layer's, scaling
        an earlier layer up changes the read (through the activation): an intervention, not an
        identity.
    """

    key_dim: int | None = None
    value_dim: int | None = None
    depth: int = 2
    expansion: int = 4
    activation: str = "gelu"
    residual_norm: bool = True  # without it deep memories diverge (see LMMConfig.theta_max)
    use_bias: bool = False
    chunk_size: int = 64
    loss_scale: float = 0.5
    remat_every: int = 1
    impl: str = "chunked"
    norm_eps: float | None = None
    surprise_gradient: str = "full"
    surprise_clip: float | None = None
    last_layer_floor: bool = False
    every_layer_floor: bool = False

    def __post_init__(self):
        for name in ("key_dim", "value_dim", "depth", "expansion", "chunk_size"):
            value = getattr(self, name)
            if value is None and name in ("key_dim", "value_dim"):
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MemoryConfig.{name} must be a positive integer, got {value!r}")
        if self.norm_eps is not None and not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"MemoryConfig.norm_eps must be a positive finite number (or None), got {self.norm_eps!r}")
        if self.depth > 4:
            raise ValueError(f"MemoryConfig.depth must be in 1..4 (the paper's range), got {self.depth}")
        if not isinstance(self.remat_every, (int, np.integer)) or self.remat_every < 0:
            raise ValueError(f"MemoryConfig.remat_every must be an integer >= 0, got {self.remat_every!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MemoryConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.impl not in IMPLEMENTATIONS + KERNEL_IMPLEMENTATIONS:
            raise ValueError(f"MemoryConfig.impl must be one of {IMPLEMENTATIONS + KERNEL_IMPLEMENTATIONS}, "
                             f"got {self.impl!r}")
        if self.impl == "fused" and (self.depth != 1 or self.use_bias):
            raise ValueError(f"MemoryConfig.impl='fused' (titans_jax.pallas_memory) covers the linear memory: "
                             f"depth 1 without biases, got depth {self.depth}, use_bias {self.use_bias}")
        if self.surprise_gradient not in SURPRISE_GRADIENTS:
            raise ValueError(f"MemoryConfig.surprise_gradient must be one of {SURPRISE_GRADIENTS}, "
                             f"got {self.surprise_gradient!r}")
        if self.residual_norm and None not in (self.key_dim, self.value_dim) and self.key_dim != self.value_dim:
            raise ValueError(
                f"residual_norm needs key_dim == value_dim (M(x) = x + LN(f(x))), got "
                f"{self.key_dim} != {self.value_dim}")
        if self.surprise_clip is not None and (isinstance(self.surprise_clip, bool) or not (
                isinstance(self.surprise_clip, (int, float)) and self.surprise_clip > 0
                and math.isfinite(self.surprise_clip))):
            raise ValueError(f"MemoryConfig.surprise_clip must be a positive finite number (or None), "
                             f"got {self.surprise_clip!r}")
        for name in ("last_layer_floor", "every_layer_floor"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"MemoryConfig.{name} must be True or False, got {value!r}")
            if value and not self.residual_norm:
                raise ValueError(f"MemoryConfig.{name} needs residual_norm=True: only under the residual "
                                 "LayerNorm does the read ignore the last layer's scale")
            if value and self.impl == "fused":
                raise ValueError(f"MemoryConfig.{name} is not implemented by the fused kernels "
                                 "(impl='fused'): use impl='chunked'")
        if not (self.loss_scale > 0 and math.isfinite(self.loss_scale)):
            raise ValueError(f"MemoryConfig.loss_scale must be a positive finite number, got {self.loss_scale!r}")

    def resolve(self, key_dim: int | None = None, value_dim: int | None = None,
                norm_eps: float | None = None) -> "MemoryConfig":
        """This config with its unset (None) fields taken from the enclosing layer: the dims
        must agree where both are set, an explicit norm_eps is kept."""
        changes = {}
        for name, value in (("key_dim", key_dim), ("value_dim", value_dim)):
            mine = getattr(self, name)
            if mine is None:
                changes[name] = value
            elif value is not None and mine != value:
                raise ValueError(f"MemoryConfig.{name}={mine} conflicts with the enclosing layer's {value} "
                                 "(the memory works on one head: leave it unset to inherit the head dim)")
        if self.norm_eps is None:
            changes["norm_eps"] = NORM_EPS if norm_eps is None else norm_eps
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def layer_norm_eps(self) -> float:
        return NORM_EPS if self.norm_eps is None else self.norm_eps

    @property
    def layer_dims(self) -> tuple[tuple[int, int], ...]:
        """(I, O) of every memory layer."""
        if self.key_dim is None or self.value_dim is None:
            raise ValueError("MemoryConfig.key_dim / value_dim are unset: set them, or use the memory through an "
                             "LMMConfig, which sets both to its head_dim")
        if self.depth == 1:
            return ((self.key_dim, self.value_dim),)
        hidden = self.expansion * self.key_dim
        dims = [self.key_dim] + [hidden] * (self.depth - 1) + [self.value_dim]
        return tuple(zip(dims[:-1], dims[1:]))


class MemoryState(NamedTuple):
    """Everything a memory needs to continue a sequence exactly, in a fixed shape.

    `weights` / `momentum` are the running inner weights M_t and surprise S_t after the last
    token seen. The gradients of the tokens of the current, unfinished chunk are taken at the
    weights of its start (eq. 16): `chunk_weights` (equal to `weights` when num_pending == 0).
    The keys and values of those tokens are not kept: their gradients are already folded into
    M_t and S_t, so one more token costs O(I O) per layer, whatever the chunk size.
    """

    weights: tuple  # per layer {"w": [B, H, I, O], "b": [B, H, O]?}: M_t
    momentum: tuple  # same structure as weights: S_t
    chunk_weights: tuple  # same structure: the weights at the last chunk boundary
    num_pending: Array  # int32 [], tokens since that boundary, in [0, C)


# ----------------------------------------------------------------------------------------------
# Parameters and state


def init_memory_params(rng: Array, config: MemoryConfig, num_heads: int, dtype=jnp.float32) -> dict:
    """M_0 (fan-in scaled normal weights, zero biases) and the residual LayerNorm, per head."""
    layers = []
    keys = jax.random.split(rng, config.depth)
    for key, (fan_in, fan_out) in zip(keys, config.layer_dims):
        layer = {"w": jax.random.normal(key, (num_heads, fan_in, fan_out), dtype) / math.sqrt(fan_in)}
        if config.use_bias:
            layer["b"] = jnp.zeros((num_heads, fan_out), dtype)
        layers.append(layer)
    params = {"layers": tuple(layers)}
    if config.residual_norm:
        params["norm"] = {"scale": jnp.ones((num_heads, config.value_dim), dtype),
                          "bias": jnp.zeros((num_heads, config.value_dim), dtype)}
    return params


def init_memory_state(params: dict, batch_size: int, config: MemoryConfig, dtype=None) -> MemoryState:
    """The state before the first token: weights M_0 (per head, broadcast over the batch)."""
    _check_params(params, config)
    dtype = dtype or params["layers"][0]["w"].dtype

    def broadcast(leaf):
        return jnp.broadcast_to(leaf.astype(dtype), (batch_size,) + leaf.shape)

    # Plain dicts and tuples (Flax may hand in FrozenDicts), so the scan carry keeps one structure.
    weights = tuple({name: broadcast(leaf) for name, leaf in layer.items()} for layer in params["layers"])
    momentum = jax.tree.map(jnp.zeros_like, weights)
    return MemoryState(weights=weights, momentum=momentum, chunk_weights=weights,
                       num_pending=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# The memory MLP for one (batch, head) slice


def _layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps) * scale + bias


def memory_mlp(weights: tuple, norm: dict | None, x: Array, config: MemoryConfig) -> Array:
    """M(x) for inner weights of one slice; x: [..., K] -> [..., V]."""
    act = ACTIVATIONS[config.activation]
    h = x
    for index, layer in enumerate(weights):
        h = h @ layer["w"]
        if "b" in layer:
            h = h + layer["b"]
        if index < len(weights) - 1:
            h = act(h)
    if config.residual_norm:
        h = x + _layer_norm(h, norm["scale"], norm["bias"], config.layer_norm_eps)
    return h


def inner_loss(weights: tuple, norm: dict | None, key: Array, value: Array, config: MemoryConfig) -> Array:
    """l(M; x) = loss_scale * ||M(k) - v||^2 for one token (eq. 12)."""
    error = memory_mlp(weights, norm, key, config) - value
    return config.loss_scale * jnp.sum(error * error)


def surprise_point(chunk_weights: tuple, config: MemoryConfig) -> tuple:
    """The weights a chunk's surprises are differentiated at, as the outer gradient sees them
    (MemoryConfig.surprise_gradient)."""
    return jax.lax.stop_gradient(chunk_weights) if config.surprise_gradient == "first_order" else chunk_weights


def clip_scale(squared_norm: Array, limit: float) -> Array:
    """min(1, limit / ||u||) from ||u||^2 (MemoryConfig.surprise_clip), with a gradient that is
    finite everywhere, also at u = 0 (where the scale is 1 and flat)."""
    limit_sq = limit * limit
    safe = jnp.where(squared_norm > limit_sq, squared_norm, limit_sq)
    return limit * jax.lax.rsqrt(safe)


def _select(predicate: Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), on_true, on_false)


def layer_squared_norm(layer: dict) -> Array:
    """|W|^2 + |b|^2 of one memory layer, over its own axes only: [..., I, O] and [..., O] -> [...]."""
    return sum(jnp.sum(leaf * leaf, axis=(-2, -1) if name == "w" else -1) for name, leaf in layer.items())


def floored_layers(config: MemoryConfig) -> tuple[int, ...]:
    """The layers of the MLP a floor holds (MemoryConfig.last_layer_floor / every_layer_floor)."""
    if config.every_layer_floor:
        return tuple(range(config.depth))
    return (config.depth - 1,) if config.last_layer_floor else ()


def floor_layers(weights: tuple, momentum: tuple, norm: dict | None, config: MemoryConfig):
    """At a chunk boundary (MemoryConfig.last_layer_floor / every_layer_floor): each floored
    layer l and its momentum scaled by max(1, r_l / |W_l|), r = norm["floor"] (M_0's layer
    norms, [..., L], from memory_apply). Works on one slice ([I, O], r [L]) or on a batch
    ([B, H, I, O], r [H, L]); the identity when no floor is set."""
    layers = floored_layers(config)
    if not layers:
        return weights, momentum
    def rescale(layer, scale):
        return {name: leaf * scale[..., None, None] if name == "w" else leaf * scale[..., None]
                for name, leaf in layer.items()}

    weights, momentum = list(weights), list(momentum)
    for index in layers:
        squared = layer_squared_norm(weights[index])
        tiny = jnp.finfo(squared.dtype).tiny
        scale = jnp.maximum(1.0, norm["floor"][..., index] * jax.lax.rsqrt(jnp.maximum(squared, tiny)))
        weights[index], momentum[index] = rescale(weights[index], scale), rescale(momentum[index], scale)
    return tuple(weights), tuple(momentum)


# ----------------------------------------------------------------------------------------------
# One token: the recurrence itself (the reference's step and the O(1) decoding path)


def token_step(chunk_weights, weights, momentum, norm, key, value, query, gate, config):
    """One token of one slice: its gradient at the chunk-start weights (eq. 16), then momentum
    (eq. 14), forgetting (eq. 13) and retrieval with the new weights (eq. 15).

    chunk_weights / weights / momentum: W_0, W_{t-1}, S_{t-1} (per layer [I, O] / [O]);
    key [K], value [V], query [K], gate [3] = (theta, log_eta, log_keep).
    Returns (y_t [V], W_t, S_t). Constant work per token: O(I O) per layer.
    """
    theta, log_eta, log_keep = gate[0], gate[1], gate[2]
    surprise = jax.grad(inner_loss)(surprise_point(chunk_weights, config), norm, key, value, config)
    if config.surprise_clip is not None:
        scale = clip_scale(sum(jnp.sum(g * g) for g in jax.tree.leaves(surprise)), config.surprise_clip)
        surprise = jax.tree.map(lambda g: scale * g, surprise)
    momentum = jax.tree.map(lambda s, g: jnp.exp(log_eta) * s - theta * g, momentum, surprise)
    weights = jax.tree.map(lambda w, s: jnp.exp(log_keep) * w + s, weights, momentum)
    return memory_mlp(weights, norm, query, config), weights, momentum


# ----------------------------------------------------------------------------------------------
# Implementation 1: token-by-token reference


def _reference_slice(chunk_weights, weights, momentum, norm, keys, values, queries, gates, offset, num_valid,
                     config):
    """One (batch, head) slice over T tokens, the first of which is token `offset` of its chunk
    (0 <= offset < C); only the first num_valid tokens are real (the state is the one after them)."""
    chunk = config.chunk_size

    def step(carry, inputs):
        chunk_w, w, s = carry
        index, key, value, query, gate = inputs
        out, new_w, new_s = token_step(chunk_w, w, s, norm, key, value, query, gate, config)
        real = index < num_valid
        w, s = _select(real, new_w, w), _select(real, new_s, s)
        commit = real & ((offset + index) % chunk == chunk - 1)  # the chunk is complete: new gradient point
        w, s = _select(commit, floor_layers(w, s, norm, config), (w, s))
        return (_select(commit, w, chunk_w), w, s), out

    (chunk_weights, weights, momentum), outputs = jax.lax.scan(
        step, (chunk_weights, weights, momentum), (jnp.arange(keys.shape[0]), keys, values, queries, gates))
    return outputs, chunk_weights, weights, momentum


# ----------------------------------------------------------------------------------------------
# Implementation 2: chunked matmul ("dual") form


def _segment_sum(log_a: Array) -> Array:
    """[C] -> [C, C]: out[i, j] = sum_{j < k <= i} log_a[k] for j <= i, -inf above the diagonal.

    Built by a masked cumulative sum (not a difference of cumsums), so it is exact for -inf
    entries (gates switched off) and does not cancel large numbers.
    """
    size = log_a.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((size, size), bool), -1)
    summed = jnp.cumsum(jnp.where(strictly_lower, log_a[:, None], 0.0), axis=0)
    return jnp.where(jnp.tril(jnp.ones((size, size), bool)), summed, -jnp.inf)


def chunk_coefficients(theta: Array, log_eta: Array, log_keep: Array, valid: Array | None = None):
    """Coefficients of the unrolled recurrence inside one chunk (chunk-local positions i, j, l).

    A[i, j] = theta_j prod_{j<k<=i} eta_k            surprise of token j still in S_i
    D[i, l] = prod_{l<k<=i} (1 - alpha_k)             decay from step l to step i
    m_i = prod_{k<=i} eta_k,  beta_i = prod_{k<=i} (1 - alpha_k)
    G = D A,  f = D m

    so that S_i = m_i S_0 - sum_j A[i, j] u_j and W_i = beta_i W_0 + f_i S_0 - sum_j G[i, j] u_j.

    valid [C] (optional) marks the real tokens of a chunk that a call fills only in part (a
    pending head, an unfinished tail). A token that is not real leaves the state alone: its
    gates become theta = 0, eta = 1, 1 - alpha = 1 and it does not add S to W, i.e. the
    recurrence is W_i = keep_i W_{i-1} + valid_i S_i, hence G = D diag(valid) A, f = D (valid m).
    """
    if valid is not None:
        theta = jnp.where(valid, theta, 0.0)
        log_eta = jnp.where(valid, log_eta, 0.0)
        log_keep = jnp.where(valid, log_keep, 0.0)
    surprise_decay = jnp.exp(_segment_sum(log_eta)) * theta[None, :]
    weight_decay = jnp.exp(_segment_sum(log_keep))
    momentum_carry = jnp.exp(jnp.cumsum(log_eta))
    weight_carry = jnp.exp(jnp.cumsum(log_keep))
    if valid is None:
        combined = weight_decay @ surprise_decay
        momentum_into_weights = weight_decay @ momentum_carry
    else:
        combined = weight_decay @ (valid[:, None] * surprise_decay)
        momentum_into_weights = weight_decay @ (valid * momentum_carry)
    return surprise_decay, combined, momentum_carry, weight_carry, momentum_into_weights


def _chunk_step(chunk_weights, weights, momentum, norm, keys, values, queries, gates, valid, config):
    """One chunk of one slice: outputs [C, V] and the state at the chunk end (titans.md §2).

    The gradients u_j are taken at chunk_weights W_0 (the key path); the recurrence starts from
    (weights, momentum) = (W_p, S_p), which is (W_0, S_0) for a chunk that starts at a boundary
    and the running state after p pending tokens otherwise (then the first p rows are not valid).
    Per layer Z = X W, with u_j = x_j^T delta_j:
        Zq  = diag(beta) Xq W_p + diag(f) Xq S_p - (G o (Xq X^T)) Delta
        W_C = beta_C W_p + f_C S_p - X^T (G[C,:]^T o Delta)
        S_C = m_C S_p - X^T (A[C,:]^T o Delta)
    and the next layer's Xq is act(Zq). Only [C, C], [C, I], [C, O] and [I, O] arrays.
    """
    act = ACTIVATIONS[config.activation]
    num_layers = len(weights)
    a_mat, g_mat, m_vec, beta, f_vec = chunk_coefficients(gates[:, 0], gates[:, 1], gates[:, 2], valid)

    # Key path at chunk-start weights: layer inputs, activation slopes, and per-token output
    # gradients (deltas) of the inner loss, by hand (rows are independent tokens).
    layer_inputs, slopes = [], []
    hidden = keys
    key_weights = surprise_point(chunk_weights, config)
    for index, layer in enumerate(key_weights):
        layer_inputs.append(hidden)
        pre = hidden @ layer["w"]
        if "b" in layer:
            pre = pre + layer["b"]
        if index < num_layers - 1:
            hidden, slope = jax.jvp(act, (pre,), (jnp.ones_like(pre),))  # elementwise: value and act'
            slopes.append(slope)
        else:
            hidden = pre
    if config.residual_norm:
        prediction, norm_vjp = jax.vjp(
            lambda z: keys + _layer_norm(z, norm["scale"], norm["bias"], config.layer_norm_eps), hidden)
        delta = norm_vjp(2.0 * config.loss_scale * (prediction - values))[0]
    else:
        delta = 2.0 * config.loss_scale * (hidden - values)
    deltas = [delta]
    for index in range(num_layers - 2, -1, -1):
        delta = (delta @ key_weights[index + 1]["w"].T) * slopes[index]
        deltas.append(delta)
    deltas = deltas[::-1]
    if config.surprise_clip is not None:  # ||u_j||^2 = sum over layers of |x_j|^2 |delta_j|^2 (+ |delta_j|^2: bias)
        squared = sum(jnp.sum(x * x, -1) * jnp.sum(d * d, -1) for x, d in zip(layer_inputs, deltas))
        if "b" in key_weights[0]:
            squared = squared + sum(jnp.sum(d * d, -1) for d in deltas)
        scale = clip_scale(squared, config.surprise_clip)[:, None]
        deltas = [scale * d for d in deltas]

    # Query path through the per-token weights W_i, without forming them.
    hidden = queries
    new_weights, new_momentum = [], []
    last_g, last_a = g_mat[-1][:, None], a_mat[-1][:, None]
    for index, (layer, surprise) in enumerate(zip(weights, momentum)):
        x_key, delta = layer_inputs[index], deltas[index]
        width = layer["w"].shape[-1]
        kernel = hidden @ x_key.T  # [C, C]: <xq_i, x_j>
        if "b" in layer:
            kernel = kernel + 1.0  # the bias sees a constant input 1
        pre = beta[:, None] * (hidden @ layer["w"]) + f_vec[:, None] * (hidden @ surprise["w"])
        pre = pre - (g_mat * kernel) @ delta
        if "b" in layer:
            pre = pre + beta[:, None] * layer["b"] + f_vec[:, None] * surprise["b"]
        hidden = act(pre) if index < num_layers - 1 else pre

        # Both state updates in one matmul: X^T [G[C,:] o Delta | A[C,:] o Delta].
        scaled = jnp.concatenate([last_g * delta, last_a * delta], axis=-1)  # [C, 2 O]
        update = x_key.T @ scaled  # [I, 2 O]
        layer_new = {"w": beta[-1] * layer["w"] + f_vec[-1] * surprise["w"] - update[:, :width]}
        surprise_new = {"w": m_vec[-1] * surprise["w"] - update[:, width:]}
        if "b" in layer:
            bias_update = jnp.sum(scaled, axis=0)
            layer_new["b"] = beta[-1] * layer["b"] + f_vec[-1] * surprise["b"] - bias_update[:width]
            surprise_new["b"] = m_vec[-1] * surprise["b"] - bias_update[width:]
        new_weights.append(layer_new)
        new_momentum.append(surprise_new)
    if config.residual_norm:
        hidden = queries + _layer_norm(hidden, norm["scale"], norm["bias"], config.layer_norm_eps)
    return hidden, tuple(new_weights), tuple(new_momentum)


def _associative_chunk_step(chunk_weights, weights, momentum, norm, keys, values, queries, gates, valid, config):
    """One chunk, the paper's literal recipe: per-token gradients at chunk start materialised
    as [C, I, O], momentum and decay by associative scans (same arguments as _chunk_step)."""
    grads = jax.vmap(jax.grad(inner_loss), in_axes=(None, None, 0, 0, None))(surprise_point(chunk_weights, config),
                                                                              norm, keys, values, config)
    if config.surprise_clip is not None:
        squared = sum(jnp.sum(g * g, axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads))
        scale = clip_scale(squared, config.surprise_clip)
        grads = jax.tree.map(lambda g: expand_to(scale, g) * g, grads)
    theta, eta, keep = gates[:, 0], jnp.exp(gates[:, 1]), jnp.exp(gates[:, 2])
    write = jnp.ones_like(theta)
    if valid is not None:  # tokens that are not real leave (W, S) unchanged
        theta, eta, keep = (jnp.where(valid, x, fill) for x, fill in ((theta, 0.0), (eta, 1.0), (keep, 1.0)))
        write = valid.astype(theta.dtype)

    def linear_recurrence(decay, inputs, initial):
        # x_i = decay_i x_{i-1} + inputs_i with x_0 = initial, for every leaf of the pytree.
        inputs = jax.tree.map(lambda b, x0: b.at[0].add(decay[0] * x0), inputs, initial)

        def combine(first, second):
            a1, b1 = first
            a2, b2 = second
            return a1 * a2, jax.tree.map(lambda u, v: expand_to(a2, u) * u + v, b1, b2)

        return jax.lax.associative_scan(combine, (decay, inputs))[1]

    surprises = linear_recurrence(eta, jax.tree.map(lambda g: -expand_to(theta, g) * g, grads), momentum)
    all_weights = linear_recurrence(keep, jax.tree.map(lambda s: expand_to(write, s) * s, surprises), weights)
    outputs = jax.vmap(memory_mlp, in_axes=(0, None, 0, None))(all_weights, norm, queries, config)
    last = lambda tree: jax.tree.map(lambda leaf: leaf[-1], tree)  # noqa: E731
    return outputs, last(all_weights), last(surprises)


def expand_to(vector: Array, leaf: Array) -> Array:
    """[C] -> [C, 1, ...] broadcastable against a [C, ...] leaf."""
    return vector.reshape(vector.shape + (1,) * (leaf.ndim - 1))


def _group_scan(body, carry, inputs, num_chunks, config):
    """lax.scan of body over num_chunks chunks (leading axis of every input), rematerialised
    every config.remat_every chunks; padded chunks (to fill the last group) are not real."""
    group = config.remat_every or 1
    num_groups = -(-num_chunks // group)
    pad = num_groups * group - num_chunks

    def split(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_groups, group) + x.shape[1:])

    index = jnp.arange(num_groups * group).reshape(num_groups, group)  # >= num_chunks: padding
    inputs = (index,) + tuple(jax.tree.map(split, tuple(inputs)))

    def chunk_body(carry, chunk_inputs):
        index, *rest = chunk_inputs
        new_carry, out = body(carry, rest)
        return _select(index < num_chunks, new_carry, carry), out

    def group_body(carry, group_inputs):
        return jax.lax.scan(chunk_body, carry, group_inputs)

    if config.remat_every:
        group_body = jax.checkpoint(group_body, prevent_cse=False)
    carry, outputs = jax.lax.scan(group_body, carry, inputs)
    return carry, outputs.reshape((num_groups * group,) + outputs.shape[2:])[:num_chunks]


def _fresh_chunk_slice(weights, momentum, norm, keys, values, queries, gates, config, chunk_fn):
    """A slice that starts at a chunk boundary with all T tokens real (static): scan the full
    chunks, then one shorter chunk for the rest (a chunk of r < C tokens is a chunk: no padding)."""
    chunk = config.chunk_size
    length = keys.shape[0]
    num_full, rest = divmod(length, chunk)
    outputs = []
    if num_full:
        def body(carry, chunk_inputs):
            w, s = carry
            out, w, s = chunk_fn(w, w, s, norm, *chunk_inputs, None, config)
            return floor_layers(w, s, norm, config), out

        pieces = [x[:num_full * chunk].reshape((num_full, chunk) + x.shape[1:]) for x in (keys, values, queries, gates)]
        (weights, momentum), out = _group_scan(body, (weights, momentum), pieces, num_full, config)
        outputs.append(out.reshape((num_full * chunk,) + out.shape[2:]))
    chunk_weights = weights
    if rest:
        tail = [x[num_full * chunk:] for x in (keys, values, queries, gates)]
        out, weights, momentum = chunk_fn(weights, weights, momentum, norm, *tail, None, config)
        outputs.append(out)
    return jnp.concatenate(outputs, axis=0), chunk_weights, weights, momentum


def _streaming_chunk_slice(chunk_weights, weights, momentum, norm, keys, values, queries, gates, offset,
                           num_valid, config, chunk_fn):
    """T tokens that start at chunk-local position `offset` (traced, in [0, C)), the first
    num_valid of them real: laid out at `offset` in a buffer of whole chunks (static length
    ceil((C - 1 + T) / C) C) and scanned with a validity mask; a chunk whose last position is
    real is complete and moves the gradient point."""
    chunk = config.chunk_size
    length = keys.shape[0]
    num_chunks = -(-(chunk - 1 + length) // chunk)
    padded = num_chunks * chunk
    position = jnp.arange(padded)
    valid = (position >= offset) & (position < offset + num_valid)

    def layout(x):
        buffer = jnp.zeros((padded,) + x.shape[1:], x.dtype)
        x = jax.lax.dynamic_update_slice_in_dim(buffer, x, offset, axis=0)
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    pieces = [layout(x) for x in (keys, values, queries, gates)] + [valid.reshape(num_chunks, chunk)]

    def body(carry, chunk_inputs):
        chunk_w, w, s = carry
        *inputs, chunk_valid = chunk_inputs
        out, w, s = chunk_fn(chunk_w, w, s, norm, *inputs, chunk_valid, config)
        complete = chunk_valid[-1]  # the chunk's last position is real: a boundary
        w, s = _select(complete, floor_layers(w, s, norm, config), (w, s))
        return (_select(complete, w, chunk_w), w, s), out

    (chunk_weights, weights, momentum), outputs = _group_scan(
        body, (chunk_weights, weights, momentum), pieces, num_chunks, config)
    outputs = outputs.reshape((padded,) + outputs.shape[2:])
    return jax.lax.dynamic_slice_in_dim(outputs, offset, length, axis=0), chunk_weights, weights, momentum


_CHUNK_FNS = {"chunked": _chunk_step, "associative": _associative_chunk_step, "fused": _chunk_step}


def prepare_inputs(keys, values, queries, theta, log_eta, log_keep, dtype):
    """(keys, values, queries, gates [B, H, T, 3] = (theta, log_eta, log_keep)) in the state's
    dtype, after checking that no input loses precision on the way; a missing gate is switched
    off (log_eta = -inf: no momentum; log_keep = 0: no forgetting)."""
    for name, x in (("keys", keys), ("values", values), ("queries", queries), ("theta", theta),
                    ("log_eta", log_eta), ("log_keep", log_keep)):
        if x is not None:
            check_lossless_dtype(name, x.dtype, dtype)
    if log_eta is None:
        log_eta = jnp.full(theta.shape, -jnp.inf, dtype)
    if log_keep is None:
        log_keep = jnp.zeros(theta.shape, dtype)
    gates = jnp.stack([theta, log_eta, log_keep], axis=-1).astype(dtype)
    keys, values, queries = (x.astype(dtype) for x in (keys, values, queries))
    return keys, values, queries, gates


# ----------------------------------------------------------------------------------------------
# Public entry point


def memory_apply(
    params: dict,
    keys: Array,
    values: Array,
    queries: Array,
    theta: Array,
    log_eta: Array | None,
    log_keep: Array | None,
    config: MemoryConfig,
    state: MemoryState | None = None,
    num_valid: Array | int | None = None,
) -> tuple[Array, MemoryState]:
    """Run the memory over T new tokens: retrieve y_t = M_t(q_t) while writing (k_t, v_t).

    Args:
      params: MemoryParams (M_0 is used only when `state` is None; the residual norm always).
      keys: [B, H, T, K]; values: [B, H, T, V]; queries: [B, H, T, K].
      theta: [B, H, T] step sizes. log_eta: [B, H, T] log momentum decay, or None for no
        momentum (eta = 0). log_keep: [B, H, T] log(1 - alpha), or None for no forgetting.
      config: MemoryConfig.
      state: the state returned by a previous call, or None to start from M_0.
      num_valid: None (all T tokens are real) or an int32 scalar in [0, T]: only the first
        num_valid tokens are real, the state returned is the one after them and the outputs of
        the others are not meaningful (callers with a static shape and a traced token count).

    Returns:
      outputs [B, H, T, V] (in the state's dtype) and the new MemoryState. Any split of a
      sequence into calls gives the same outputs as one call on the whole sequence.

    Paths: a fresh state runs whole chunks from a boundary (the training path); a carried
    state lays the tokens out behind its pending ones and masks the rest; one token (T = 1)
    is one step of the recurrence at constant cost, whatever the chunk size.
    """
    _check_params(params, config)
    batch, heads, length = _check_inputs(keys, values, queries, theta, log_eta, log_keep, config)
    fresh = state is None and num_valid is None
    if state is None:
        state = init_memory_state(params, batch, config)
    else:
        _check_state(state, batch, heads, config)
    keys, values, queries, gates = prepare_inputs(keys, values, queries, theta, log_eta, log_keep,
                                                  state.weights[0]["w"].dtype)
    chunk = config.chunk_size
    norm = params.get("norm")
    if floored_layers(config):  # the per-head floors [H, L] travel with the norm's parameters
        floor = jnp.stack([jnp.sqrt(layer_squared_norm(layer)) for layer in params["layers"]], axis=-1)
        norm = {**norm, "floor": floor.astype(state.weights[0]["w"].dtype)}

    def over_slices(fn, num_state, *args):
        """vmap fn over heads then batch: the first num_state args are per-slice states, then
        norm (per head only), then per-slice inputs, then shared scalars."""
        state_axes, input_axes = (0,) * num_state, (0,) * 4
        scalars = (None,) * (len(args) - num_state - 4)
        over_heads = jax.vmap(fn, in_axes=state_axes + (0 if norm is not None else None,) + input_axes + scalars)
        over_batch = jax.vmap(over_heads, in_axes=state_axes + (None,) + input_axes + scalars)
        return over_batch(*args[:num_state], norm, *args[num_state:])

    num_pending = state.num_pending
    if fresh:
        if config.impl == "reference":
            fn = functools.partial(_reference_slice, config=config)
            outputs, chunk_weights, weights, momentum = over_slices(
                fn, 3, state.weights, state.weights, state.momentum, keys, values, queries, gates, 0, length)
        elif config.impl == "fused":
            from titans_jax import pallas_memory  # imports this module

            return pallas_memory.fused_memory_apply(
                params, keys, values, queries, gates[..., 0], gates[..., 1], gates[..., 2], config,
                interpret=jax.default_backend() != "gpu")
        else:
            fn = functools.partial(_fresh_chunk_slice, config=config, chunk_fn=_CHUNK_FNS[config.impl])
            outputs, chunk_weights, weights, momentum = over_slices(
                fn, 2, state.weights, state.momentum, keys, values, queries, gates)
        return outputs, MemoryState(weights, momentum, chunk_weights, jnp.asarray(length % chunk, jnp.int32))

    count = length if num_valid is None else jnp.clip(jnp.asarray(num_valid, jnp.int32), 0, length)
    if length == 1 and num_valid is None:  # decoding: one step of the recurrence, O(I O) per layer
        def one_token(chunk_w, w, s, norm, key, value, query, gate):
            out, w, s = token_step(chunk_w, w, s, norm, key[0], value[0], query[0], gate[0], config)
            return out[None], w, s

        outputs, weights, momentum = over_slices(
            one_token, 3, state.chunk_weights, state.weights, state.momentum, keys, values, queries, gates)
        complete = num_pending + 1 == chunk
        weights, momentum = _select(complete, floor_layers(weights, momentum, norm, config), (weights, momentum))
        chunk_weights = _select(complete, weights, state.chunk_weights)
    elif config.impl == "reference":
        fn = functools.partial(_reference_slice, config=config)
        outputs, chunk_weights, weights, momentum = over_slices(
            fn, 3, state.chunk_weights, state.weights, state.momentum, keys, values, queries, gates, num_pending,
            count)
    else:
        fn = functools.partial(_streaming_chunk_slice, config=config, chunk_fn=_CHUNK_FNS[config.impl])
        outputs, chunk_weights, weights, momentum = over_slices(
            fn, 3, state.chunk_weights, state.weights, state.momentum, keys, values, queries, gates, num_pending,
            count)
    # a traced state with num_pending out of range (checked eagerly): poison, never clip
    outputs = jnp.where((num_pending >= 0) & (num_pending < chunk), outputs, jnp.nan)
    new_state = MemoryState(weights, momentum, chunk_weights, jnp.asarray((num_pending + count) % chunk, jnp.int32))
    return outputs, new_state


# ----------------------------------------------------------------------------------------------
# Validation: clear errors instead of silent wrong answers


def has_non_finite(x: Array) -> bool:
    """True if a concrete array holds NaN/inf. Traced values (inside jit/grad) are not checked:
    the check runs eagerly, on device, and only moves one boolean to the host."""
    if isinstance(x, jax.core.Tracer):
        return False
    with jax.ensure_compile_time_eval():
        return not bool(jnp.all(jnp.isfinite(x)))


def _has_bad_log_gate(x: Array) -> bool:
    if isinstance(x, jax.core.Tracer):
        return False
    with jax.ensure_compile_time_eval():
        return bool(jnp.any(jnp.isnan(x) | (x > 0)))


def _check_params(params: dict, config: MemoryConfig) -> None:
    if not isinstance(params, Mapping) or "layers" not in params:
        raise TypeError("memory params must be a dict with a 'layers' entry (see init_memory_params)")
    layers = params["layers"]
    if len(layers) != config.depth:
        raise ValueError(f"memory params have {len(layers)} layers but config.depth = {config.depth}")
    for index, (layer, (fan_in, fan_out)) in enumerate(zip(layers, config.layer_dims)):
        shape = tuple(layer["w"].shape)
        if len(shape) != 3 or shape[1:] != (fan_in, fan_out):
            raise ValueError(f"memory layer {index} weight has shape {shape}, expected [H, {fan_in}, {fan_out}]")
        if ("b" in layer) != config.use_bias:
            raise ValueError(f"memory layer {index}: bias presence does not match config.use_bias={config.use_bias}")
    if config.residual_norm and "norm" not in params:
        raise ValueError("config.residual_norm is set but the memory params have no 'norm' entry")


def _check_inputs(keys, values, queries, theta, log_eta, log_keep, config: MemoryConfig):
    named = {"keys": keys, "values": values, "queries": queries}
    for name, x in named.items():
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [batch, heads, tokens, dim], got shape {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    batch, heads, length, key_dim = keys.shape
    if length == 0:
        raise ValueError("memory_apply needs at least one token (got T = 0)")
    if key_dim != config.key_dim:
        raise ValueError(f"keys have width {key_dim}, config.key_dim = {config.key_dim}")
    if queries.shape != keys.shape:
        raise ValueError(f"queries shape {queries.shape} must equal keys shape {keys.shape}")
    if values.shape != (batch, heads, length, config.value_dim):
        raise ValueError(f"values shape {values.shape}, expected {(batch, heads, length, config.value_dim)}")
    gates = {"theta": theta, "log_eta": log_eta, "log_keep": log_keep}
    for name, gate in gates.items():
        if gate is None and name != "theta":
            continue
        if gate is None or tuple(gate.shape) != (batch, heads, length):
            raise ValueError(f"{name} must have shape {(batch, heads, length)}, got {getattr(gate, 'shape', None)}")
        if not jnp.issubdtype(gate.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {gate.dtype}")
    for name, x in {**named, "theta": theta}.items():
        if has_non_finite(x):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if not isinstance(theta, jax.core.Tracer):
        with jax.ensure_compile_time_eval():
            if bool(jnp.any(theta < 0)):
                raise ValueError("theta (the inner step size) must be >= 0; a negative step ascends the inner loss")
    for name, gate in (("log_eta", log_eta), ("log_keep", log_keep)):
        if gate is not None and _has_bad_log_gate(gate):
            raise ValueError(f"{name} must be <= 0 (a log of a gate in [0, 1]) and not NaN")
    return batch, heads, length


def _check_state(state: MemoryState, batch: int, heads: int, config: MemoryConfig) -> None:
    """Every field of a state against the inputs and config: structure, shapes, dtypes and (for
    concrete states) num_pending in [0, chunk_size)."""
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    fields = ("weights", "momentum", "chunk_weights")
    for name in fields:
        layers = getattr(state, name)
        if not isinstance(layers, (tuple, list)) or len(layers) != config.depth:
            raise ValueError(f"state.{name} must hold {config.depth} memory layers (config.depth), got "
                             f"{len(layers) if isinstance(layers, (tuple, list)) else type(layers).__name__}")
    dtype = state.weights[0]["w"].dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"state weights must be floating point, got {dtype}")
    names = ("w", "b") if config.use_bias else ("w",)
    for index, (fan_in, fan_out) in enumerate(config.layer_dims):
        expected = {"w": (batch, heads, fan_in, fan_out), "b": (batch, heads, fan_out)}
        for field in fields:
            layer = getattr(state, field)[index]
            if not isinstance(layer, Mapping) or set(layer) != set(names):
                raise ValueError(f"state.{field}[{index}] must have entries {names} (use_bias={config.use_bias}), "
                                 f"got {sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__}")
            for leaf_name in names:
                leaf = layer[leaf_name]
                if tuple(leaf.shape) != expected[leaf_name]:
                    raise ValueError(
                        f"state.{field}[{index}][{leaf_name!r}] has shape {tuple(leaf.shape)}, expected "
                        f"{expected[leaf_name]} (batch, heads or memory shape differ from the inputs/config)")
                if leaf.dtype != dtype:
                    raise TypeError(f"state.{field}[{index}][{leaf_name!r}] has dtype {leaf.dtype}, the state's "
                                    f"weights {dtype}: one state has one dtype")
    count = state.num_pending
    if getattr(count, "shape", None) != () or not jnp.issubdtype(count.dtype, jnp.integer):
        raise TypeError(f"state.num_pending must be an integer scalar, got "
                        f"{getattr(count, 'dtype', type(count).__name__)} of shape {getattr(count, 'shape', None)}")
    if not isinstance(count, jax.core.Tracer):
        with jax.ensure_compile_time_eval():
            value = int(count)
        if not 0 <= value < config.chunk_size:
            raise ValueError(f"state.num_pending = {value} is outside [0, chunk_size = {config.chunk_size})")


def check_lossless_dtype(name: str, dtype, compute_dtype) -> None:
    """Refuse an input that computing in `compute_dtype` would silently round (float64 inputs
    with float32 parameters, float32 inputs to a bfloat16 computation); narrower inputs are
    widened exactly and pass."""
    if jnp.promote_types(dtype, compute_dtype) != jnp.dtype(compute_dtype):
        raise TypeError(f"{name} has dtype {jnp.dtype(dtype).name} but the computation runs in "
                        f"{jnp.dtype(compute_dtype).name}, which would round it silently; cast it explicitly "
                        f"(x.astype({jnp.dtype(compute_dtype).name!r})) or use parameters of its dtype")
