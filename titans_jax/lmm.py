"""The long-term memory (LMM) token mixer of Titans (§3, §4.4) as a thin Flax shell.

    x -> q, k, v projections -> causal depthwise conv -> SiLU -> l2-norm(q), l2-norm(k)
      -> per-token, per-head gates theta, eta, alpha
      -> memory core (titans_jax.memory.memory_apply)
      -> RMSNorm(y) * sigmoid(x W_g) -> W_O

The module only creates parameters and calls pure functions. State is explicit:
``y, state = layer.apply(variables, x, state)``; ``state=None`` starts a new sequence, and any
split of a sequence into calls (down to one token per call) gives the outputs of one call.

Dimension letters: B batch, T tokens, D d_model, H heads, E head dim, W conv width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titans_jax import memory as memory_lib
from titans_jax import sequence_parallel, sharding, tnt
from titans_jax.primitives import rms_norm  # noqa: F401 - re-exported (models import it from here)
from titans_jax.projection import dense_dot_general

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LMMConfig:
    """Configuration of one LMM layer; the memory MLP and its inner loop are the nested
    `memory` (a MemoryConfig). Every component the paper ablates can be switched off: conv
    (conv_width=0), momentum (use_momentum=False), forgetting (use_forgetting=False), deep vs
    linear memory (memory.depth=1).

    Fields left None are inherited from the enclosing model (ModelConfig fills d_model,
    num_heads, head_dim, norm_eps, dtype and param_dtype); `resolve()` gives the complete
    config a layer runs with (a standalone layer must set the three dims itself).
    """

    d_model: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    # The memory MLP and its inner loop. Its key/value dims are this layer's head_dim; its norm_eps
    # is this layer's unless set.
    memory: memory_lib.MemoryConfig = memory_lib.MemoryConfig()
    # gates: theta = theta_max * sigmoid(.), eta = sigmoid(.), alpha = sigmoid(.)
    use_momentum: bool = True
    use_forgetting: bool = True
    # theta_max bounds the inner step size. Inside a chunk all C gradients are taken at the same
    # weights, so for correlated keys a chunk moves the memory by ~C * theta: theta_max = 1 made
    # the default layer diverge to NaN within ~100 tokens of real-looking input (d 256, chunk 32);
    # 0.1 with the residual LayerNorm stays finite for constant inputs and saturated gates
    # (tests/test_lmm.py::test_default_layer_stays_finite_on_long_hard_inputs).
    theta_max: float = 0.1
    theta_bias_init: float = -2.0  # theta ~ 0.12 * theta_max at init
    eta_bias_init: float = 2.0  # eta ~ 0.88
    # alpha ~ 3.4e-4 per token (memory half-life ~2K tokens). With alpha ~ 0.018 (bias -4) the
    # decayed weights made f(x) tiny, the residual LayerNorm rescaled it, and gradients w.r.t.
    # early tokens grew ~10x per 256 tokens (5e13 at 4K tokens, d 512) while the forward stayed
    # bounded (tests/test_lmm.py::test_gradients_stay_bounded_over_long_sequences).
    alpha_bias_init: float = -8.0
    # write=False: the memory never changes (theta and alpha are zero, so with the zero initial
    # momentum M_t = M_0 at every token) and retrieves M_0(q_t), its learned initial weights applied
    # to each query. An intervention for trained models (the parameters are the same): what a
    # model reads without what its memory learns at test time (experiments.qa_choice --set).
    write: bool = True
    # short convolution and normalisation
    conv_width: int = 4
    qk_l2_norm: bool = True
    norm_eps: float | None = None  # None: the model's (memory_lib.NORM_EPS standalone)
    # precision: projections may run in bf16; memory state and gate math stay in param_dtype.
    # None: the model's (float32 standalone).
    dtype: str | None = None
    param_dtype: str | None = None
    # TNT (arXiv 2511.07343, titans_jax.tnt), opt-in: local_period > 0 adds a local memory (own
    # M_0, the same projections and gates, chunks of local_chunk_size) that restarts every
    # local_period tokens; its retrieval adds to the main memory's, which then usually gets large
    # chunks (memory.chunk_size). Periods are independent, so they run in parallel.
    local_period: int = 0
    local_chunk_size: int = 16

    def __post_init__(self):
        for name in ("d_model", "num_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"LMMConfig.{name} must be a positive integer, got {value!r}")
        for name in ("use_momentum", "use_forgetting", "write", "qk_l2_norm"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"LMMConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.memory, memory_lib.MemoryConfig):
            raise TypeError(f"LMMConfig.memory must be a MemoryConfig, got {type(self.memory).__name__}")
        if not isinstance(self.conv_width, (int, np.integer)) or self.conv_width < 0:
            raise ValueError(f"LMMConfig.conv_width must be an integer >= 0 (0 = no conv), got {self.conv_width!r}")
        if not (self.theta_max > 0 and math.isfinite(self.theta_max)):
            raise ValueError(f"LMMConfig.theta_max must be positive and finite, got {self.theta_max!r}")
        if self.norm_eps is not None and not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"LMMConfig.norm_eps must be positive and finite (or None), got {self.norm_eps!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in (None,) + FLOAT_DTYPES:
                raise ValueError(f"LMMConfig.{name} must be one of {FLOAT_DTYPES}, got {getattr(self, name)!r}")
        for name in ("local_period", "local_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LMMConfig.{name} must be an integer >= 0, got {value!r}")
        if self.local_period and (not self.local_chunk_size or self.local_period % self.local_chunk_size):
            raise ValueError(f"LMMConfig.local_period ({self.local_period}) must be a multiple of local_chunk_size "
                             f"({self.local_chunk_size}): a TNT local period restarts at a chunk boundary")
        if self.head_dim is not None:
            self.memory_config  # validates the memory part

    def resolve(self, **inherited) -> "LMMConfig":
        """The complete config: unset (None) fields from `inherited` (d_model, num_heads,
        head_dim, norm_eps, dtype, param_dtype), then the standalone defaults. The dims must
        agree where both are set."""
        unknown = set(inherited) - set(_INHERITED)
        if unknown:
            raise TypeError(f"LMMConfig.resolve got unknown fields {sorted(unknown)}")
        changes = {}
        for name in _INHERITED:
            mine, theirs = getattr(self, name), inherited.get(name)
            if mine is None:
                value = theirs if theirs is not None else _STANDALONE.get(name)
                if value is None:
                    raise ValueError(f"LMMConfig.{name} is unset: give it, or use the layer inside a ModelConfig")
                changes[name] = value
            elif name in ("d_model", "num_heads", "head_dim") and theirs is not None and mine != theirs:
                raise ValueError(f"LMMConfig.{name}={mine} conflicts with the model's {name}={theirs}; leave it unset "
                                 "to inherit it")
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def memory_config(self) -> memory_lib.MemoryConfig:
        """The memory's config as the core runs it: key/value dims = head_dim, norm_eps inherited."""
        return self.memory.resolve(key_dim=self.head_dim, value_dim=self.head_dim,
                                   norm_eps=_STANDALONE["norm_eps"] if self.norm_eps is None else self.norm_eps)

    @property
    def local_memory_config(self) -> memory_lib.MemoryConfig:
        """TNT's local memory: the main memory's config with chunks of local_chunk_size."""
        return dataclasses.replace(self.memory_config, chunk_size=self.local_chunk_size)

    @property
    def num_gates(self) -> int:
        return 1 + int(self.use_momentum) + int(self.use_forgetting)


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
_INHERITED = ("d_model", "num_heads", "head_dim", "norm_eps", "dtype", "param_dtype")
_STANDALONE = {"norm_eps": memory_lib.NORM_EPS, "dtype": "float32", "param_dtype": "float32"}


# Logical names of the memory's independent slices. The memory runs separately per (batch, head),
# so the mesh axes that titans_jax.sharding.LOGICAL_RULES maps "batch" and "heads" to (data /
# fsdp, tensor) split the chunk scan across devices with no communication inside it; without a
# mesh (jax.set_mesh) the constraints do nothing. See experiments/memory_bench.py --devices.
SLICE_AXES = ("batch", "heads")


class LMMState(NamedTuple):
    conv: Array | None  # [B, W - 1, 3 H E]: the last pre-conv q/k/v projections
    memory: memory_lib.MemoryState
    local: memory_lib.MemoryState | None = None  # TNT's local memory (local_period > 0)
    local_position: Array | None = None  # int32 []: tokens of the current local period seen, in [0, period)


def causal_depthwise_conv(x: Array, kernel: Array, bias: Array, previous: Array,
                          num_valid: Array | None = None) -> tuple[Array, Array]:
    """y_t = bias + sum_i kernel[i] * x_{t - W + 1 + i}, with `previous` the W - 1 inputs before x.

    x: [B, T, F]; kernel: [W, F]; previous: [B, W - 1, F]. Returns y [B, T, F] and the new
    `previous`: the last W - 1 inputs of previous ++ x, or of previous ++ x[:, :num_valid] when
    only the first num_valid (a traced count) of the T inputs are real.
    """
    width = kernel.shape[0]
    length = x.shape[1]
    extended = jnp.concatenate([previous.astype(x.dtype), x], axis=1)
    out = bias.astype(x.dtype)
    for tap in range(width):
        out = out + extended[:, tap: tap + length] * kernel[tap].astype(x.dtype)
    if num_valid is None:
        return out, extended[:, extended.shape[1] - (width - 1):]
    return out, jax.lax.dynamic_slice_in_dim(extended, num_valid, width - 1, axis=1)


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


@functools.lru_cache(maxsize=256)
def _resolved(config: LMMConfig) -> LMMConfig:
    return config.resolve()


class LMMLayer(nn.Module):
    """Titans neural long-term memory layer. ``__call__(x [B, T, D], state) -> (y [B, T, D], state)``."""

    config: LMMConfig

    def setup(self):
        cfg = _resolved(self.config)
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        inner = cfg.num_heads * cfg.head_dim
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name, dot_general=dense_dot_general)
        self.qkv_proj = dense(3 * inner, "qkv")
        self.gate_out_proj = dense(inner, "output_gate")
        self.out_proj = dense(cfg.d_model, "out")
        if cfg.conv_width:
            bound = 1.0 / math.sqrt(cfg.conv_width)
            self.conv_kernel = self.param(
                "conv_kernel", nn.initializers.uniform(2 * bound), (cfg.conv_width, 3 * inner), param_dtype)
            self.conv_bias = self.param("conv_bias", nn.initializers.zeros, (3 * inner,), param_dtype)
        self.gate_kernel = self.param(
            "gate_kernel", nn.initializers.normal(0.02), (cfg.d_model, cfg.num_gates, cfg.num_heads), param_dtype)
        bias_init = [cfg.theta_bias_init]
        if cfg.use_momentum:
            bias_init.append(cfg.eta_bias_init)
        if cfg.use_forgetting:
            bias_init.append(cfg.alpha_bias_init)
        self.gate_bias = self.param(
            "gate_bias",
            lambda _, shape, dt: jnp.broadcast_to(jnp.asarray(bias_init, dt)[:, None], shape),
            (cfg.num_gates, cfg.num_heads), param_dtype)
        self.memory = self.param(
            "memory", lambda rng: memory_lib.init_memory_params(rng, cfg.memory_config, cfg.num_heads, param_dtype))
        if cfg.local_period:
            self.local_memory = self.param("local_memory", lambda rng: memory_lib.init_memory_params(
                rng, cfg.local_memory_config, cfg.num_heads, param_dtype))
        self.out_norm_scale = self.param("out_norm_scale", nn.initializers.ones, (cfg.num_heads, cfg.head_dim), param_dtype)

    def initial_state(self, batch_size: int) -> LMMState:
        cfg = _resolved(self.config)
        conv = None
        if cfg.conv_width:
            conv = jnp.zeros((batch_size, cfg.conv_width - 1, 3 * cfg.num_heads * cfg.head_dim), jnp.dtype(cfg.dtype))
        state = LMMState(conv=conv, memory=memory_lib.init_memory_state(self.memory, batch_size, cfg.memory_config))
        if cfg.local_period:
            state = state._replace(
                local=memory_lib.init_memory_state(self.local_memory, batch_size, cfg.local_memory_config),
                local_position=jnp.zeros((), jnp.int32))
        return state

    def retrieve(self, weights: tuple, queries: Array) -> Array:
        """M*(q) with given inner weights and no update (eq. 15): weights per layer [B, H, I, O]
        (e.g. a MemoryState's), queries [B, H, T, K] -> [B, H, T, V]."""
        cfg = _resolved(self.config)
        norm = self.memory.get("norm")
        mlp = lambda w, n, q: memory_lib.memory_mlp(w, n, q, cfg.memory_config)  # noqa: E731
        over_heads = jax.vmap(mlp, in_axes=(0, 0 if norm is not None else None, 0))
        return jax.vmap(over_heads, in_axes=(0, None, 0))(weights, norm, queries.astype(weights[0]["w"].dtype))

    def __call__(self, x: Array, state: LMMState | None = None,
                 num_valid: Array | None = None, sharded: bool = False) -> tuple[Array, LMMState | None]:
        """x [B, T, D] -> (y [B, T, D], state). num_valid: None, or a traced count in [0, T]
        of the leading tokens that are real (the state advances over those only).

        sharded=True: x is split over the mesh's `sequence` axis and `state` is the state
        before its first token; conv and memory run per shard (titans_jax.sequence_parallel)
        and the returned state is None (the parallel pass of training and evaluation)."""
        cfg = _resolved(self.config)
        if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"LMMLayer expects x of shape [batch, tokens, {cfg.d_model}], got {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"LMMLayer expects floating-point inputs, got dtype {x.dtype}")
        if memory_lib.has_non_finite(x):
            raise ValueError("LMMLayer input contains non-finite values (NaN or inf)")
        batch, length, _ = x.shape
        fresh = state is None
        if fresh:  # the memory core then takes its static path from M_0
            state = self.initial_state(batch)._replace(memory=None)
        elif not isinstance(state, LMMState):
            raise TypeError(f"state must be an LMMState (or None), got {type(state).__name__}")
        heads, head_dim = cfg.num_heads, cfg.head_dim
        memory_lib.check_lossless_dtype("LMMLayer input", x.dtype, cfg.dtype)
        x = x.astype(jnp.dtype(cfg.dtype))

        qkv = self.qkv_proj(x)
        conv_state = state.conv
        if sharded:
            if fresh or num_valid is not None:
                raise ValueError("a sequence-sharded LMM call needs the state before its first token and no num_valid")
            if cfg.conv_width:
                qkv = sequence_parallel.causal_conv(qkv, self.conv_kernel, self.conv_bias, conv_state)
        elif cfg.conv_width:
            if conv_state is None or conv_state.shape != (batch, cfg.conv_width - 1, qkv.shape[-1]):
                raise ValueError(f"conv state shape {getattr(conv_state, 'shape', None)} does not match "
                                 f"{(batch, cfg.conv_width - 1, qkv.shape[-1])}")
            qkv, conv_state = causal_depthwise_conv(qkv, self.conv_kernel, self.conv_bias, conv_state, num_valid)
        qkv = jax.nn.silu(qkv)
        split = qkv.reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)  # [3, B, H, T, E]
        queries, keys, values = split[0], split[1], split[2]
        if cfg.qk_l2_norm:
            queries, keys = l2_normalize(queries), l2_normalize(keys)
        token_axes = SLICE_AXES + ("sequence" if sharded else None, None)
        queries, keys, values = (sharding.constrain(t, token_axes) for t in (queries, keys, values))

        gate_dtype = jnp.dtype(cfg.param_dtype)
        logits = jnp.einsum("btd,dgh->gbht", x.astype(gate_dtype), self.gate_kernel) + self.gate_bias[:, None, :, None]
        theta = cfg.theta_max * jax.nn.sigmoid(logits[0])
        log_eta = jax.nn.log_sigmoid(logits[1]) if cfg.use_momentum else None
        log_keep = jax.nn.log_sigmoid(-logits[-1]) if cfg.use_forgetting else None  # log(1 - alpha)
        if not cfg.write:
            theta, log_keep = jnp.zeros_like(theta), None if log_keep is None else jnp.zeros_like(log_keep)
        theta, log_eta, log_keep = (None if t is None else sharding.constrain(t, token_axes[:3])
                                    for t in (theta, log_eta, log_keep))
        # The memory's inputs, kept only when a caller makes "diagnostics" mutable
        # (experiments.gate_trace: gate values over the context, chunk step sizes, gradient growth).
        self.sow("diagnostics", "memory_inputs", (keys, values, queries, theta, log_eta, log_keep))

        if sharded:
            retrieved, memory_state = sequence_parallel.memory(
                self.memory, keys, values, queries, theta, log_eta, log_keep, cfg.memory_config, state.memory), None
        else:
            retrieved, memory_state = memory_lib.memory_apply(
                self.memory, keys, values, queries, theta, log_eta, log_keep, cfg.memory_config, state.memory,
                num_valid)
        new_state = None if sharded else LMMState(conv=conv_state, memory=memory_state)
        if cfg.local_period:  # TNT: the local memory's retrieval adds to the main memory's
            inputs = (keys, values, queries, theta, log_eta, log_keep)
            local_config, period = cfg.local_memory_config, cfg.local_period
            if sharded:
                local = sequence_parallel.local_memory(self.local_memory, inputs, local_config, period, state.local,
                                                       state.local_position)
            else:
                if fresh:
                    local, local_state, position = tnt.fresh_local_memory(self.local_memory, inputs, local_config,
                                                                          period)
                else:
                    local, local_state, position = tnt.stream_local_memory(
                        self.local_memory, inputs, local_config, period, state.local, state.local_position, num_valid)
                new_state = new_state._replace(local=local_state, local_position=position)
            retrieved = retrieved + local.astype(retrieved.dtype)
        retrieved = rms_norm(retrieved.transpose(0, 2, 1, 3), self.out_norm_scale, cfg.norm_eps)  # [B, T, H, E]
        gated = retrieved.reshape(batch, length, heads * head_dim).astype(x.dtype) * jax.nn.sigmoid(self.gate_out_proj(x))
        return self.out_proj(gated), new_state
