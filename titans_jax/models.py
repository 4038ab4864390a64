"""Titans language models (MAC, MAG, MAL, LMM) and the paper's baselines (Transformer++,
sliding-window Transformer; TTT and linear memory are LMM configurations), with exact streaming.

One wrapper, `TitansLM`, and one call shape over the same parameters:

  logits = model.apply(v, tokens)                     training: a parallel pass, [B, T, V]
  cache = init_cache(model, params, batch, max_len)   the state before the first token
  logits, cache = model.apply(v, tokens, cache)       any T >= 1 tokens that continue the cache

T = 1 is decoding, T = a prompt is prefill, T = a window of a long text is streaming; any split
of a sequence into calls gives the logits of one parallel pass. `logits_at` ("all" | "last" |
"none") keeps a long call from materialising [B, T, V].

Caches are explicit values (the per-layer mixer caches, a tuple or with scan_layers one pytree
stacked over the layers, and the next position) with shapes that never change from call to
call: the memory state (running weights, momentum, chunk-start weights), conv states, a
sliding-window buffer of `window` keys, MAC's segment buffers. Only full attention
(transformer) grows with the context: its cache is sized by max_len up front and refuses more
(an error, or NaN logits under jit).

Block structure (pre-norm residual; every block ends with a SwiGLU MLP):

  transformer / swa  x += Attn(norm x)                  (full causal / sliding window, RoPE)
  lmm                x += LMM(norm x)                   (TTT = no momentum, no forgetting;
                                                         linear memory = memory_depth 1)
  mag                h = norm x;  x += gate(SWA(h), LMM(h))                       (eq. 26-28)
  mal                x += LMM(norm x);  x += SWA(norm x)                            (eq. 29-31)
  mac                x += MAC(norm x), a scan over segments                         (eq. 21-25)

  gate(y, m) = RMSNorm(y) * sigmoid(RMSNorm(m)), both norms with learned scales (§4.4).

Persistent memory (eq. 19-20): for transformer/swa/lmm/mag/mal, N_p learned vectors are
prepended to the embedded sequence (positions 0..N_p-1), always visible to sliding-window
attention and written first into every LMM; for MAC they are learned per layer and prepended
to every segment's attention window, as eq. 22 does.

MAC and causality. Read literally, eq. 22-25 let token i of a segment attend to the retrieved
vector h_j of a later token j of its segment (h_j = M*_{t-1}(q_j) depends on token j), and gate
token i with the memory after the whole segment was written. We keep everything causal:
  - mac_retrieval="causal" (default): h_j is visible to token i only for j <= i (the retrieved
    tokens get the causal mask of the tokens they come from);
  - mac_retrieval="learned": h = M*_{t-1}(Q_l) for N_l learned queries, input independent
    within the segment, so every token may see all of h;
  - the output gate o_i = gate(y_i, M*_i(y_i)) uses the memory after writing y_1..y_i (with the
    memory's chunk semantics), not after the whole segment.
The memory writes the attention outputs of the segment's own tokens (not of the persistent or
retrieved positions); the memory's W_Q/W_K/W_V act on y. mac_write="block_input" writes the
block's (normed) input x instead, as some ports do: not the paper's MAC (eq. 24 writes y), an
option to measure what the write path costs (experiments/results/recall_probe_cpu.md). The
retrieval query has its own projection W_Q' (+ conv, SiLU, l2-norm).

Dimension letters: B batch, T tokens, D d_model, V vocabulary, H heads, E head dim,
C segment length, N_p persistent tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titans_jax import attention as attn_lib
from titans_jax import config_tree
from titans_jax import memory as memory_lib
from titans_jax import primitives
from titans_jax import sequence_parallel, sharding
from titans_jax.lmm import FLOAT_DTYPES, LMMConfig, LMMLayer, LMMState, causal_depthwise_conv, l2_normalize, rms_norm
from titans_jax.projection import dense_dot_general

Array = jax.Array

ARCHITECTURES = ("transformer", "swa", "lmm", "mac", "mag", "mal")
MAC_RETRIEVAL = ("causal", "learned")
MAC_WRITE = ("attention", "block_input")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A language model of one architecture. Memory fields configure every LMM inside it."""

    arch: str = "mac"
    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 16
    mlp_hidden: int = 128
    # attention
    window: int = 64  # sliding window of swa / mag / mal (tokens, including the query itself)
    rope_base: float = 10000.0
    attention_block: int = 256  # queries per block in the parallel attention path
    attention_impl: str = "blocked"  # or "jax": jax.nn.dot_product_attention (not with a windowed prefix)
    # persistent memory and MAC
    num_persistent: int = 4
    segment_size: int = 128  # MAC segment length C; a multiple of lmm.memory.chunk_size
    mac_retrieval: str = "causal"
    mac_write: str = "attention"  # what MAC's memory writes: "attention" (y, eq. 24) or "block_input" (x)
    num_learned_queries: int = 8
    mac_remat_segments: bool = True  # rematerialise each MAC segment in training (memory ~ carries only)
    # The long-term memory of every lmm / mac / mag / mal block (its memory MLP and inner loop are
    # lmm.memory). Its d_model, heads, head dim, norm_eps and dtypes come from this config.
    lmm: LMMConfig = LMMConfig()
    # everything else
    tie_embeddings: bool = False
    remat: str = "none"  # per-block rematerialisation policy, a key of REMAT_POLICIES
    # False: the blocks are separate modules block_0 .. block_{L-1}, run by a Python loop (compile time
    # grows with depth). True: one `nn.scan` over the stacked blocks: every block parameter sits under
    # "blocks" with a leading axis of num_layers (a `layers` axis to shard), and a cache's "layers" is one
    # pytree of per-layer caches stacked on a leading axis instead of a tuple. The same model either way:
    # stack_layer_params / unstack_layer_params convert parameters between the two layouts.
    scan_layers: bool = False
    norm_eps: float = memory_lib.NORM_EPS
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {ARCHITECTURES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in FLOAT_DTYPES:
                raise ValueError(f"ModelConfig.{name} must be one of {FLOAT_DTYPES}, got {getattr(self, name)!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"ModelConfig.norm_eps must be a positive finite number, got {self.norm_eps!r}")
        if not isinstance(self.lmm, LMMConfig):
            raise TypeError(f"ModelConfig.lmm must be an LMMConfig, got {type(self.lmm).__name__}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_hidden",
                     "attention_block", "segment_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.window, (int, np.integer)) or self.window <= 0:
            raise ValueError(f"ModelConfig.window must be a positive integer, got {self.window!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not isinstance(self.num_persistent, (int, np.integer)) or self.num_persistent < 0:
            raise ValueError(f"num_persistent must be an integer >= 0, got {self.num_persistent!r}")
        if self.arch == "mac" and self.segment_size % self.lmm.memory.chunk_size:
            raise ValueError(
                f"MAC needs segment_size to be a multiple of the memory chunk size (so that segment "
                f"boundaries are chunk boundaries), got segment_size={self.segment_size}, "
                f"lmm.memory.chunk_size={self.lmm.memory.chunk_size}")
        if self.mac_retrieval not in MAC_RETRIEVAL:
            raise ValueError(f"unknown mac_retrieval {self.mac_retrieval!r}; choose one of {MAC_RETRIEVAL}")
        if self.mac_write not in MAC_WRITE:
            raise ValueError(f"unknown mac_write {self.mac_write!r}; choose one of {MAC_WRITE}")
        if self.mac_retrieval == "learned" and self.num_learned_queries <= 0:
            raise ValueError("mac_retrieval='learned' needs num_learned_queries > 0")
        if self.attention_impl not in ("blocked", "jax"):
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; choose 'blocked' or 'jax'")
        if self.attention_impl == "jax" and self.arch in ("swa", "mag", "mal") and self.num_persistent:
            raise ValueError("attention_impl='jax' cannot keep the persistent prefix visible beyond the window; "
                             "use attention_impl='blocked' or num_persistent=0")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose one of {tuple(REMAT_POLICIES)}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"ModelConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        if self.uses_memory:
            self.memory_layer  # validates the memory part (its dims against the model's)

    @property
    def uses_memory(self) -> bool:
        return self.arch in ("lmm", "mac", "mag", "mal")

    @property
    def attention_window(self) -> int | None:
        """None for full causal attention (transformer), the window otherwise."""
        return None if self.arch == "transformer" else self.window

    @property
    def prefix_length(self) -> int:
        """Persistent tokens prepended to the sequence (MAC keeps its own per segment)."""
        return 0 if self.arch == "mac" else self.num_persistent

    @property
    def memory_layer(self) -> LMMConfig:
        """The complete LMMConfig of this model's memory layers (lmm with the model's dims,
        norm_eps and dtypes filled in)."""
        return _memory_layer(self.lmm, self.d_model, self.num_heads, self.head_dim, self.norm_eps, self.dtype,
                             self.param_dtype)

    def replace(self, changes: dict | None = None, /, **fields) -> "ModelConfig":
        """A copy with fields changed; nested fields by dotted path or nested dict:
        config.replace({"lmm.memory.chunk_size": 8}, num_layers=4)."""
        return config_tree.replace(self, {**(changes or {}), **fields})


@functools.lru_cache(maxsize=256)
def _memory_layer(lmm: LMMConfig, d_model, num_heads, head_dim, norm_eps, dtype, param_dtype) -> LMMConfig:
    return lmm.resolve(d_model=d_model, num_heads=num_heads, head_dim=head_dim, norm_eps=norm_eps, dtype=dtype,
                       param_dtype=param_dtype)


# ----------------------------------------------------------------------------------------------
# Small pieces


class RMSNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps)


class SwiGLU(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = lambda n, name: _dense(cfg, n, name)  # noqa: E731
        return dense(cfg.d_model, "down")(jax.nn.silu(dense(cfg.mlp_hidden, "gate")(x)) * dense(cfg.mlp_hidden, "up")(x))


def _dense(cfg: ModelConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                    dot_general=dense_dot_general)


def _split_heads(x: Array, heads: int) -> Array:
    return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


class Attention(nn.Module):
    """Causal or sliding-window multi-head attention with RoPE; the first `num_prefix`
    positions are the persistent prefix (always visible)."""

    config: ModelConfig
    window: int | None
    num_prefix: int

    def setup(self):
        cfg = self.config
        self.qkv = _dense(cfg, 3 * cfg.num_heads * cfg.head_dim, "qkv")
        self.out = _dense(cfg, cfg.d_model, "out")

    def _project(self, x: Array, positions: Array):
        cfg = self.config
        q, k, v = jnp.split(_split_heads(self.qkv(x), 3 * cfg.num_heads), 3, axis=2)
        return attn_lib.rope(q, positions, cfg.rope_base), attn_lib.rope(k, positions, cfg.rope_base), v

    def init_cache(self, batch: int, max_len: int | None) -> attn_lib.KVCache:
        cfg = self.config
        capacity = self.window if self.window is not None else max_len
        return attn_lib.init_kv_cache(batch, self.num_prefix, capacity, cfg.num_heads, cfg.head_dim, cfg.dtype)

    def __call__(self, x: Array, cache: attn_lib.KVCache | None = None, position: Array | None = None,
                 prefix: bool = False, sharded: bool = False):
        """cache None: the parallel pass over positions 0 .. T - 1 (prefix included). Otherwise
        T tokens at positions position .. position + T - 1 over the cache; prefix=True is the
        call over the persistent prefix itself (positions 0 .. P - 1), which fills its buffer.
        sharded=True: T is split over the mesh's `sequence` axis, the cache holds only the
        prefix (a fresh cache), and each shard gets its halo from its neighbour."""
        cfg = self.config
        batch, length, _ = x.shape
        if sharded:
            q, k, v = self._project(x, position + jnp.arange(length))
            out = sequence_parallel.attention(q, k, v, cache.prefix_k, cache.prefix_v, position, window=self.window,
                                              block_size=cfg.attention_block)
            return self.out(out.reshape(batch, length, -1)), None
        if cache is None:
            q, k, v = self._project(x, jnp.arange(length))
            if cfg.attention_impl == "jax":
                out = attn_lib.fused_attention(q, k, v, window=self.window, num_prefix=self.num_prefix)
            else:
                out = attn_lib.blocked_attention(q, k, v, window=self.window, num_prefix=self.num_prefix,
                                                 block_size=cfg.attention_block)
        elif prefix:  # the prefix sees itself causally (every prefix key is visible to later queries)
            q, k, v = self._project(x, jnp.arange(length))
            out = attn_lib.blocked_attention(q, k, v, window=None, block_size=cfg.attention_block)
            cache = cache._replace(prefix_k=k.astype(cache.prefix_k.dtype), prefix_v=v.astype(cache.prefix_v.dtype))
        else:
            q, k, v = self._project(x, position + jnp.arange(length))
            out, cache = attn_lib.cached_attention(q, k, v, position, cache, window=self.window,
                                                   block_size=cfg.attention_block)
        return self.out(out.reshape(batch, length, -1)), cache


class OutputGate(nn.Module):
    """gate(y, m) = RMSNorm(y) * sigmoid(RMSNorm(m)) (§4.4: normalise both, non-linear gate)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, y: Array, m: Array) -> Array:
        cfg = self.config
        norm_y = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="norm_y")(y)
        norm_m = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="norm_m")(m)
        return norm_y * jax.nn.sigmoid(norm_m)


# ----------------------------------------------------------------------------------------------
# Memory as context


class MACCache(NamedTuple):
    retrieval_conv: Array | None  # [B, W - 1, H E]: last pre-conv retrieval-query projections
    segment_weights: tuple  # memory weights at the start of the current segment (M_{t-1})
    retrieved_k: Array  # [B, C, H, E]: attention keys of the retrieved tokens so far
    retrieved_v: Array
    segment_k: Array  # [B, C, H, E]: attention keys of the segment's tokens so far
    segment_v: Array
    fill: Array  # int32 []: tokens of the current segment seen so far, in [0, C)
    lmm: LMMState  # the memory that the attention outputs are written into


class MemoryAsContext(nn.Module):
    """One MAC token mixer. `segment(x, cache, position)` consumes L <= C - fill tokens of the
    current segment; a whole parallel pass is a scan of it over segments, decoding calls it
    with one token, so both share every line of the math."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.head_dim
        self.memory = LMMLayer(cfg.memory_layer, name="memory")
        if cfg.mac_retrieval == "causal":
            self.retrieval_query = _dense(cfg, heads * head_dim, "retrieval_query")
            if cfg.lmm.conv_width:
                bound = 1.0 / math.sqrt(cfg.lmm.conv_width)
                self.retrieval_conv_kernel = self.param(
                    "retrieval_conv_kernel", nn.initializers.uniform(2 * bound), (cfg.lmm.conv_width, heads * head_dim),
                    cfg.param_dtype)
                self.retrieval_conv_bias = self.param(
                    "retrieval_conv_bias", nn.initializers.zeros, (heads * head_dim,), cfg.param_dtype)
        else:
            self.learned_queries = self.param(
                "learned_queries", nn.initializers.normal(1.0), (heads, cfg.num_learned_queries, head_dim),
                cfg.param_dtype)
        self.retrieval_norm_scale = self.param(
            "retrieval_norm_scale", nn.initializers.ones, (heads, head_dim), cfg.param_dtype)
        self.retrieval_out = _dense(cfg, cfg.d_model, "retrieval_out")
        if cfg.num_persistent:
            self.persistent = self.param(
                "persistent", nn.initializers.normal(0.02), (cfg.num_persistent, cfg.d_model), cfg.param_dtype)
        self.qkv = _dense(cfg, 3 * heads * head_dim, "qkv")
        self.out = _dense(cfg, cfg.d_model, "out")
        self.gate = OutputGate(cfg, name="gate")

    def initial_cache(self, batch: int) -> MACCache:
        cfg = self.config
        lmm_state = self.memory.initial_state(batch)
        buffer = jnp.zeros((batch, cfg.segment_size, cfg.num_heads, cfg.head_dim), cfg.dtype)
        conv = None
        if cfg.mac_retrieval == "causal" and cfg.lmm.conv_width:
            conv = jnp.zeros((batch, cfg.lmm.conv_width - 1, cfg.num_heads * cfg.head_dim), cfg.dtype)
        return MACCache(conv, lmm_state.memory.weights, buffer, buffer, buffer, buffer,
                        jnp.zeros((), jnp.int32), lmm_state)

    def _retrieved_tokens(self, x: Array, cache: MACCache, num_valid: Array | None):
        """h = M*_{t-1}(q): the pre-segment memory read with the segment's own queries (causal)
        or with learned queries. Returns h in model space [B, L or N_l, D] and the conv state."""
        cfg = self.config
        batch = x.shape[0]
        conv = cache.retrieval_conv
        if cfg.mac_retrieval == "causal":
            queries = self.retrieval_query(x)
            if cfg.lmm.conv_width:
                queries, conv = causal_depthwise_conv(queries, self.retrieval_conv_kernel, self.retrieval_conv_bias,
                                                      conv, num_valid)
            queries = l2_normalize(jax.nn.silu(_split_heads(queries, cfg.num_heads)))
            queries = queries.transpose(0, 2, 1, 3)  # [B, H, L, E]
        else:
            queries = jnp.broadcast_to(self.learned_queries, (batch,) + self.learned_queries.shape)
        retrieved = self.memory.retrieve(cache.segment_weights, queries).transpose(0, 2, 1, 3)  # [B, L, H, E]
        retrieved = rms_norm(retrieved, self.retrieval_norm_scale, cfg.norm_eps)
        return self.retrieval_out(retrieved.reshape(retrieved.shape[:2] + (-1,)).astype(x.dtype)), conv

    def segment(self, x: Array, cache: MACCache, position: Array,
                num_valid: Array | None = None) -> tuple[Array, MACCache]:
        """x: [B, L, D] (normed block input) at absolute positions position .. position + L - 1,
        all inside one segment, which already holds `cache.fill` tokens. num_valid: None (all L
        tokens are real) or a traced count n: only x[:, :n] is real (fill + n <= C), the cache
        advances over those only and the other outputs are not meaningful."""
        cfg = self.config
        batch, length, _ = x.shape
        heads, seg = cfg.num_heads, cfg.segment_size
        fill = cache.fill
        count = length if num_valid is None else num_valid
        positions = position + jnp.arange(length)

        # 1. retrieval from the memory before this segment (eq. 21)
        retrieved, conv = self._retrieved_tokens(x, cache, num_valid)

        # 2. attention over [persistent || retrieved || segment] (eq. 22-23)
        q, k, v = jnp.split(_split_heads(self.qkv(x), 3 * heads), 3, axis=2)
        q = attn_lib.rope(q, positions, cfg.rope_base)
        k = attn_lib.rope(k, positions, cfg.rope_base)
        _, k_h, v_h = jnp.split(_split_heads(self.qkv(retrieved), 3 * heads), 3, axis=2)
        # slots fill .. fill + count - 1 of the segment buffers take the real new tokens
        slots = jnp.where(jnp.arange(length) < count, fill + jnp.arange(length), seg)  # seg: dropped

        def put(buffer, new):
            return buffer.at[:, slots].set(new.astype(buffer.dtype), mode="drop")

        seg_k, seg_v = put(cache.segment_k, k), put(cache.segment_v, v)
        query_idx = fill + jnp.arange(length)
        key_idx = jnp.arange(seg)
        causal = key_idx[None, :] <= query_idx[:, None]  # [L, C]
        if cfg.mac_retrieval == "causal":
            k_h = attn_lib.rope(k_h, positions, cfg.rope_base)
            ret_k, ret_v = put(cache.retrieved_k, k_h), put(cache.retrieved_v, v_h)
            keys, values, masks = [ret_k, seg_k], [ret_v, seg_v], [causal, causal]
        else:  # learned queries: h is input-independent within the segment, all of it visible
            ret_k, ret_v = cache.retrieved_k, cache.retrieved_v
            keys, values = [k_h, seg_k], [v_h, seg_v]
            masks = [jnp.ones((length, k_h.shape[1]), bool), causal]
        if cfg.num_persistent:
            persistent = jnp.broadcast_to(self.persistent.astype(x.dtype), (batch,) + self.persistent.shape)
            _, k_p, v_p = jnp.split(_split_heads(self.qkv(persistent), 3 * heads), 3, axis=2)
            keys, values = [k_p] + keys, [v_p] + values
            masks = [jnp.ones((length, cfg.num_persistent), bool)] + masks
        y = primitives.softmax_attention(q, jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1),
                             jnp.concatenate(masks, axis=1)[None, None])
        y = self.out(y.reshape(batch, length, -1))

        # 3. write y into the memory and read it back with the updated memory (eq. 24-25)
        read, lmm_state = self.memory(y if cfg.mac_write == "attention" else x, cache.lmm, num_valid)
        out = self.gate(y, read)

        # 4. at the end of a segment its memory becomes the next segment's M_{t-1}
        fill = fill + count
        done = fill == seg
        segment_weights = jax.tree.map(lambda new, old: jnp.where(done, new, old),
                                       lmm_state.memory.weights, cache.segment_weights)
        new_cache = MACCache(conv, segment_weights, ret_k, ret_v, seg_k, seg_v,
                             jnp.where(done, 0, fill).astype(jnp.int32), lmm_state)
        return out, new_cache

    def __call__(self, x: Array, cache: MACCache | None = None, position: Array | None = None,
                 sharded: bool = False):
        """cache None: the parallel pass (a scan over whole segments from a fresh cache), returns
        (outputs, None). Otherwise T tokens from position on, continuing the cache. sharded=True:
        T is split over the mesh's `sequence` axis (whole segments per shard) and the shards
        form a pipeline that hands the cache on (titans_jax.sequence_parallel.pipeline)."""
        cfg = self.config
        batch, length, _ = x.shape
        if sharded:
            sequence_parallel.local_length(length, "MAC", multiple_of=cfg.segment_size)
            module = MemoryAsContext(cfg, parent=None)

            def stream(params, x, cache, position):
                return module.apply({"params": params}, x, cache, position, method=MemoryAsContext._stream)

            cache = self.initial_cache(batch) if cache is None else cache
            return sequence_parallel.pipeline(stream, self.variables["params"], x, cache, position), None
        if cache is None:
            return self._parallel(x), None
        if length == 1:  # decoding: one token of the current segment
            return self.segment(x, cache, position)
        return self._stream(x, cache, position)

    def _parallel(self, x: Array) -> Array:
        cfg = self.config
        batch, length, _ = x.shape
        cache = self.initial_cache(batch)
        seg = cfg.segment_size
        num_full, rest = divmod(length, seg)
        outputs = []
        if num_full:
            def body(module, carry, inputs):
                cache, start = carry
                out, cache = module.segment(inputs, cache, start)
                return (cache, start + seg), out

            if cfg.mac_remat_segments:
                # keep only the carry per segment; recompute a segment's insides in the backward pass
                body = nn.remat(body, prevent_cse=False)
            # diagnostics (experiments.gate_trace): the memory's inputs per segment, stacked on axis 0;
            # intermediates (capture_intermediates=True): every submodule's output per segment
            scan = nn.scan(body, variable_broadcast="params", variable_axes={"diagnostics": 0, "intermediates": 0},
                           split_rngs={"params": False}, in_axes=1, out_axes=1, length=num_full)
            xs = x[:, :num_full * seg].reshape(batch, num_full, seg, -1)
            (cache, _), out = scan(self, (cache, jnp.zeros((), jnp.int32)), xs)
            outputs.append(out.reshape(batch, num_full * seg, -1))
        if rest:
            out, cache = self.segment(x[:, num_full * seg:], cache, jnp.asarray(num_full * seg, jnp.int32))
            outputs.append(out)
        return jnp.concatenate(outputs, axis=1)

    def _stream(self, x: Array, cache: MACCache, position: Array) -> tuple[Array, MACCache]:
        """T > 1 tokens that start at slot `cache.fill` (traced) of a segment: a scan over frames
        of F = min(T, C) tokens, each inside one segment (the first fills the current segment,
        or takes all T), with a traced count of real tokens per frame. 1 + ceil((T - 1) / F)
        frames always suffice: a frame either ends a segment or takes the rest, and when F < C
        (T < C) the second frame starts a segment and takes everything left."""
        cfg = self.config
        batch, length, width = x.shape
        seg = cfg.segment_size
        frame = min(length, seg)
        num_frames = 1 + -(-(length - 1) // frame)
        padded = jnp.concatenate([x, jnp.zeros((batch, frame, width), x.dtype)], axis=1)

        def body(module, carry, _):
            cache, start, out_buffer = carry
            count = jnp.clip(jnp.minimum(length - start, seg - cache.fill), 0, frame).astype(jnp.int32)
            x_frame = jax.lax.dynamic_slice_in_dim(padded, start, frame, axis=1)
            out, new_cache = module.segment(x_frame, cache, position + start, count)
            cache = jax.tree.map(lambda new, old: jnp.where(count > 0, new, old), new_cache, cache)
            out_buffer = jax.lax.dynamic_update_slice_in_dim(out_buffer, out.astype(out_buffer.dtype), start, axis=1)
            return (cache, start + count, out_buffer), None

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, length=num_frames)
        out_buffer = jnp.zeros((batch, length + frame, width), x.dtype)
        (cache, _, out_buffer), _ = scan(self, (cache, jnp.zeros((), jnp.int32), out_buffer), None)
        return out_buffer[:, :length], cache


# ----------------------------------------------------------------------------------------------
# Blocks and the language model


class Block(nn.Module):
    """One residual block of `config.arch`. __call__(x, cache, position, prefix) -> (x, cache):
    cache None is the parallel pass (returns cache None); otherwise the cache is a dict of the
    mixers' caches ("attention", "memory", "mac"), continued over the T tokens of x."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.param_dtype, name=name)  # noqa: E731
        self.mix_norm = norm("mix_norm")
        if cfg.arch in ("transformer", "swa", "mag", "mal"):
            self.attention = Attention(cfg, cfg.attention_window, cfg.prefix_length, name="attention")
        if cfg.arch in ("lmm", "mag", "mal"):
            self.memory = LMMLayer(cfg.memory_layer, name="memory")
        if cfg.arch == "mag":
            self.gate = OutputGate(cfg, name="gate")
        if cfg.arch == "mal":
            self.attention_norm = norm("attention_norm")
        if cfg.arch == "mac":
            self.mac = MemoryAsContext(cfg, name="mac")
        self.mlp_norm = norm("mlp_norm")
        self.mlp = SwiGLU(cfg, name="mlp")

    def init_cache(self, batch: int, max_len: int | None) -> dict:
        cfg = self.config
        cache = {}
        if cfg.arch in ("transformer", "swa", "mag", "mal"):
            cache["attention"] = self.attention.init_cache(batch, max_len)
        if cfg.arch in ("lmm", "mag", "mal"):
            cache["memory"] = self.memory.initial_state(batch)
        if cfg.arch == "mac":
            cache["mac"] = self.mac.initial_cache(batch)
        return cache

    def __call__(self, x, cache=None, position=None, prefix: bool = False, sharded: bool = False):
        """sharded=True: x is split over the mesh's `sequence` axis, `cache` is the fresh cache
        (the persistent prefix seen) and the mixers run per shard; returns (x, None)."""
        cfg = self.config
        streaming = cache is not None and not sharded
        new = {}
        if sharded:
            x = sharding.constrain(x, ("batch", "sequence", None))

        def memory(h):
            y, state = self.memory(h, cache["memory"] if cache is not None else None, sharded=sharded)
            new["memory"] = state
            return y

        def attention(h):
            y, kv = self.attention(h, cache["attention"] if cache is not None else None, position, prefix, sharded)
            new["attention"] = kv
            return y

        if cfg.arch in ("transformer", "swa"):
            x = x + attention(self.mix_norm(x))
        elif cfg.arch == "lmm":
            x = x + memory(self.mix_norm(x))
        elif cfg.arch == "mag":
            h = self.mix_norm(x)
            x = x + self.gate(attention(h), memory(h))
        elif cfg.arch == "mal":
            x = x + memory(self.mix_norm(x))
            x = x + attention(self.attention_norm(x))
        else:
            y, new["mac"] = self.mac(self.mix_norm(x), cache["mac"] if cache is not None else None, position, sharded)
            x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return x, (new if streaming else None)


LOGITS_AT = ("all", "last", "none")
STACKED_BLOCKS = "blocks"  # the parameters of the scanned blocks (ModelConfig.scan_layers)


class TitansLM(nn.Module):
    """The language model: one call shape for training, prefill, streaming and decoding.

      logits = model.apply({"params": p}, tokens)                  # training: [B, T, V]
      cache = model.apply({"params": p}, batch, max_len, method="init_cache")   # or init_cache(...)
      logits, cache = model.apply({"params": p}, tokens, cache)    # any T >= 1, continues the cache

    A call with a cache continues the sequence the cache has seen: T = 1 is decoding, T = a
    prompt is prefill, T = a window of a book is streaming; any split of a sequence into calls
    gives the logits of one parallel pass. `logits_at` = "all" ([B, T, V]), "last" ([B, 1, V]:
    the next-token logits only) or "none" (None: only the cache advances), so a long context
    never materialises [B, T, V].

    The blocks are block_0 .. block_{L-1} run in turn, or with config.scan_layers one scanned
    module "blocks" whose parameters and cache entries have a leading axis of L layers.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              embedding_init=nn.initializers.normal(0.02), name="embed")
        if cfg.prefix_length:
            self.persistent = self.param("persistent", nn.initializers.normal(0.02), (cfg.prefix_length, cfg.d_model),
                                         cfg.param_dtype)
        block_cls = Block
        if cfg.remat != "none":  # only changes what the backward pass stores
            # static_argnums: `prefix` and `sharded` (self is 0); inside a scan the loop already keeps XLA
            # from merging the recomputation with the forward pass, so CSE prevention is not needed there
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(4, 5),
                                 prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.blocks = block_cls(cfg, name=STACKED_BLOCKS)
        else:
            self.blocks = [block_cls(cfg, name=f"block_{index}") for index in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size, "lm_head")

    def _persistent(self, batch: int, dtype) -> Array:
        cfg = self.config
        return jnp.broadcast_to(self.persistent.astype(dtype), (batch, cfg.prefix_length, cfg.d_model))

    def _over_layers(self, step, x: Array | None, layer_caches):
        """Run `step(block, x, layer_cache) -> (x, layer_cache)` through the blocks in order;
        returns (x, the new layer caches). Unrolled: layer_caches is a tuple of per-layer
        caches (or None: every block gets None). Scanned: an `nn.scan` over the stacked blocks,
        x the carry and layer_caches one pytree stacked on a leading layers axis (or None)."""
        cfg = self.config
        if cfg.scan_layers:
            scan = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.num_layers)
            return scan(self.blocks, x, layer_caches)
        new_caches = []
        for index, block in enumerate(self.blocks):
            x, layer_cache = step(block, x, None if layer_caches is None else layer_caches[index])
            new_caches.append(layer_cache)
        return x, tuple(new_caches)

    def _logits(self, x: Array, logits_at: str):
        if logits_at == "none":
            return None
        if logits_at == "last":
            x = x[:, -1:]
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.config.tie_embeddings else self.lm_head(x)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    def __call__(self, tokens: Array, cache: dict | None = None, *, logits_at: str = "all"):
        cfg = self.config
        if logits_at not in LOGITS_AT:
            raise ValueError(f"unknown logits_at {logits_at!r}; choose one of {LOGITS_AT}")
        tokens = check_tokens(tokens, cfg.vocab_size)
        batch, length = tokens.shape
        x = self.embed(tokens)
        x = jnp.where((tokens >= 0) & (tokens < cfg.vocab_size), 1.0, jnp.nan)[..., None].astype(x.dtype) * x
        if cache is None and sequence_parallel.shards() > 1 and not self.is_initializing():
            return self._sharded(x, logits_at)
        if cache is None:  # training: one parallel pass from the start of a sequence
            prefix = cfg.prefix_length
            if prefix:
                x = jnp.concatenate([self._persistent(batch, x.dtype), x], axis=1)
            x, _ = self._over_layers(lambda block, x, _: block(x, None, None, False, False), x, None)
            return self._logits(x[:, prefix:], logits_at)

        check_cache(cfg, cache, batch)
        position = cache["position"]
        capacity = full_attention_capacity(cfg, cache)
        if capacity is not None and not isinstance(position, jax.core.Tracer):
            with jax.ensure_compile_time_eval():
                seen = int(position) - cfg.prefix_length
            if seen + length > capacity:
                raise ValueError(f"this full-attention cache holds {capacity} tokens and has seen {seen}: "
                                 f"{length} more do not fit (make the cache with a larger max_len)")
        x, layers = self._over_layers(lambda block, x, layer_cache: block(x, layer_cache, position, False, False),
                                      x, cache["layers"])
        logits = self._logits(x, logits_at)
        if capacity is not None and logits is not None:
            # Under jit the check above cannot run: past its capacity the cache would be written
            # at a clipped slot, so the logits become NaN instead (never a wrapped context).
            logits = jnp.where(position - cfg.prefix_length + length <= capacity, logits, jnp.nan)
        return logits, {"layers": layers, "position": position + length}

    def _sharded(self, x: Array, logits_at: str):
        """The parallel pass with the tokens split over the mesh's `sequence` axis: the
        persistent prefix goes through the model first (replicated, as init_cache does), then
        every block continues from its prefix cache with its mixers per shard."""
        cfg = self.config
        start = self.init_cache(x.shape[0], 1 if cfg.attention_window is None else None)
        x = sharding.constrain(x, ("batch", "sequence", None))
        x, _ = self._over_layers(lambda block, x, layer_cache: block(x, layer_cache, start["position"], False, True),
                                 x, start["layers"])
        return self._logits(x, logits_at)

    def init_cache(self, batch: int, max_len: int | None = None) -> dict:
        """The cache before the first token of `batch` sequences. Fixed shapes: MAC / MAG / MAL /
        LMM / SWA keep bounded state whatever the context (max_len is not needed and ignored);
        full attention (transformer) keeps every key and needs max_len, the most tokens the
        cache will hold. The persistent prefix (when the architecture prepends one) is run
        through the model here, so the cache starts at position N_p."""
        cfg = self.config
        if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch <= 0:
            raise ValueError(f"init_cache needs a positive integer batch size, got {batch!r}")
        if cfg.attention_window is None:
            if max_len is None:
                raise ValueError("a full-attention (transformer) cache keeps every key: give max_len, the most tokens "
                                 "it will hold")
        if max_len is not None and (not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool)
                                    or max_len <= 0):
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        _, layers = self._over_layers(lambda block, x, _: (x, block.init_cache(batch, max_len)), None, None)
        position = jnp.zeros((), jnp.int32)
        if cfg.prefix_length:
            x = self._persistent(batch, jnp.dtype(cfg.dtype))
            _, layers = self._over_layers(lambda block, x, layer_cache: block(x, layer_cache, position, True, False),
                                          x, layers)
            position = jnp.asarray(cfg.prefix_length, jnp.int32)
        return {"layers": layers, "position": position}


def init_cache(model: TitansLM, params, batch: int, max_len: int | None = None) -> dict:
    """model.init_cache through apply: the empty cache (persistent prefix already seen) for
    `batch` sequences; max_len only for full attention (see TitansLM.init_cache)."""
    return model.apply({"params": params}, batch, max_len, method=TitansLM.init_cache)


def full_attention_capacity(config: ModelConfig, cache: dict) -> int | None:
    """Tokens (after the prefix) a full-attention cache holds; None for bounded caches."""
    if config.attention_window is not None:
        return None
    if config.scan_layers:  # keys [L, B, capacity, H, E]
        return int(cache["layers"]["attention"].k.shape[2])
    return int(cache["layers"][0]["attention"].k.shape[1])


def check_tokens(tokens: Array, vocab_size: int) -> Array:
    """Rank-2 integer token ids in [0, vocab_size) (titans_jax.primitives.check_tokens): a clear
    error for concrete inputs; under jit an out-of-range id makes the sequence's logits NaN (from
    its position on, and usually all of them: masked attention weights multiply the NaN) instead
    of reading a clipped embedding."""
    return primitives.check_tokens(tokens, vocab_size)


def check_cache(config: ModelConfig, cache, batch: int) -> None:
    """A cache against the one init_cache makes for this model and `batch` sequences: the same
    structure (architecture, layers, mixers), and every leaf of the same shape and dtype.
    Runs on shapes only, so it also checks caches under jit; a mismatch names the first
    differing entry instead of failing deep inside a layer."""
    if not isinstance(cache, dict) or set(cache) != {"layers", "position"}:
        raise TypeError("the cache must be the dict made by init_cache / returned by a call with a cache (keys "
                        f"layers, position), got {type(cache).__name__}"
                        + (f" with keys {sorted(cache)}" if isinstance(cache, dict) else ""))
    layers = cache["layers"]
    if config.scan_layers:
        if not isinstance(layers, dict):
            raise ValueError(f"this model scans its layers (scan_layers=True): the cache's layers must be one dict "
                             f"of caches stacked over the {config.num_layers} layers, got {type(layers).__name__} "
                             "(a cache of a model with scan_layers=False?)")
        first_layer = layers
    else:
        if not isinstance(layers, (tuple, list)) or len(layers) != config.num_layers:
            raise ValueError(f"the cache holds {len(layers) if isinstance(layers, (tuple, list)) else '?'} layers, "
                             f"this {config.arch} model has {config.num_layers}"
                             + (" (a cache of a model with scan_layers=True?)" if isinstance(layers, dict) else ""))
        first_layer = layers[0]
    capacity = None
    if config.attention_window is None:  # full attention: the cache holds max_len positions
        attention = first_layer.get("attention") if isinstance(first_layer, dict) else None
        if not isinstance(attention, attn_lib.KVCache):
            raise ValueError(f"the cache has no attention cache in layer 0, which a {config.arch} model needs "
                             "(a cache of another architecture?)")
        capacity = int(attention.k.shape[2 if config.scan_layers else 1])
    expected = _expected_cache(config, int(batch), capacity)
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(cache)
    want_leaves, want_tree = jax.tree_util.tree_flatten_with_path(expected)
    if got_tree != want_tree:
        got_paths = [jax.tree_util.keystr(path) for path, _ in got_leaves]
        want_paths = [jax.tree_util.keystr(path) for path, _ in want_leaves]
        missing = [p for p in want_paths if p not in got_paths]
        extra = [p for p in got_paths if p not in want_paths]
        raise ValueError(f"the cache does not fit this {config.arch} model (another architecture or "
                         f"config?): missing {missing[:3]}, unexpected {extra[:3]}")
    for (path, leaf), (_, want) in zip(got_leaves, want_leaves, strict=True):
        shape, dtype = tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", type(leaf))
        if shape != tuple(want.shape) or dtype != want.dtype:
            raise ValueError(
                f"cache entry {jax.tree_util.keystr(path)} has shape {shape} and dtype {dtype}, this model "
                f"expects {tuple(want.shape)} {want.dtype} for {batch} sequences (a cache of another batch size or "
                "config?)")


@functools.lru_cache(maxsize=32)
def _expected_cache(config: ModelConfig, batch: int, max_len: int | None):
    model = TitansLM(config, parent=None)

    def make(tokens):
        variables = model.init(jax.random.PRNGKey(0), tokens)
        return model.apply(variables, batch, max_len, method=TitansLM.init_cache)

    return jax.eval_shape(make, jax.ShapeDtypeStruct((1, 1), jnp.int32))


# ----------------------------------------------------------------------------------------------
# The two parameter layouts (ModelConfig.scan_layers)


def _is_stacked(params) -> bool:
    """Whether a TitansLM parameter tree (or a tree of its structure: gradients, optimiser
    moments) has the scan_layers=True layout; a clear ValueError for any other tree."""
    if not isinstance(params, Mapping) or "embed" not in params:
        raise ValueError(f"not the parameters of a TitansLM (a mapping with embed, the blocks, ...): got "
                         f"{type(params).__name__}" + (f" with keys {sorted(map(str, params))}"
                                                       if isinstance(params, Mapping) else ""))
    stacked = STACKED_BLOCKS in params
    unrolled = any(isinstance(key, str) and key.startswith("block_") for key in params)
    if stacked == unrolled:
        raise ValueError(f"not the parameters of a TitansLM: {'both' if stacked else 'neither'} a "
                         f"{STACKED_BLOCKS!r} entry (scan_layers=True) {'and' if stacked else 'nor'} block_<i> "
                         "entries (scan_layers=False)")
    return stacked


def stack_layer_params(params) -> dict:
    """The parameters of a TitansLM with scan_layers=False (block_0 .. block_{L-1}) in the layout
    of scan_layers=True: the blocks' leaves stacked on a new leading axis of L under "blocks",
    everything else as it is. Also for trees of the same structure (gradients, optimiser moments)."""
    if _is_stacked(params):
        raise ValueError(f"the parameters are already stacked (a {STACKED_BLOCKS!r} entry, scan_layers=True)")
    names = sorted((key for key in params if isinstance(key, str) and key.startswith("block_")),
                   key=lambda name: (len(name), name))  # block_2 before block_10
    if names != [f"block_{index}" for index in range(len(names))]:
        raise ValueError(f"the blocks must be block_0 .. block_{len(names) - 1}, got {names}")
    blocks = [params[name] for name in names]
    for name, block in zip(names[1:], blocks[1:]):
        if jax.tree.structure(block) != jax.tree.structure(blocks[0]) or any(
                leaf.shape != first.shape for leaf, first in zip(jax.tree.leaves(block), jax.tree.leaves(blocks[0]))):
            raise ValueError(f"{name} has another structure or shapes than block_0; the blocks of a TitansLM are alike")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    result = {}
    for key, value in params.items():
        if key == "block_0":
            result[STACKED_BLOCKS] = stacked
        elif key not in names:
            result[key] = value
    return result


def unstack_layer_params(params) -> dict:
    """The inverse of stack_layer_params: the "blocks" entry of a scan_layers=True tree split
    along its leading layers axis into block_0 .. block_{L-1}, everything else as it is."""
    if not _is_stacked(params):
        raise ValueError("the parameters are not stacked (block_<i> entries, scan_layers=False)")
    leaves, structure = jax.tree.flatten(params[STACKED_BLOCKS])
    layers = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(layers) != 1 or None in layers:
        raise ValueError(f"every leaf under {STACKED_BLOCKS!r} needs the same leading layers axis, got leading sizes "
                         f"{sorted(layers, key=str)}")
    (num_layers,) = layers
    result = {}
    for key, value in params.items():
        if key == STACKED_BLOCKS:
            for index in range(num_layers):
                result[f"block_{index}"] = jax.tree.unflatten(structure, [leaf[index] for leaf in leaves])
        else:
            result[key] = value
    return result


# ----------------------------------------------------------------------------------------------
# Parameter counts and presets


def param_count(params) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def abstract_params(config: ModelConfig, length: int = 8):
    """Parameter shapes via jax.eval_shape (no memory is allocated)."""
    model = TitansLM(config)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]


def init_params(config: ModelConfig, rng: Array, length: int = 8):
    """Parameters of TitansLM(config), initialised under one jit (an eager Flax init dispatches
    hundreds of small programs)."""
    return jax.jit(TitansLM(config).init)(rng, jnp.zeros((1, length), jnp.int32))["params"]
