"""Titans language models (MAC, MAG, MAL, LMM) and the paper's baselines (Transformer++,
sliding-window Transformer; TTT and linear memory are LMM configurations), with exact decoding.

One wrapper, `TitansLM`, runs in three modes over the same parameters:

  mode="train"    logits for a whole sequence (parallel; MAC scans over segments)
  mode="prefill"  the same logits and a cache sized for `max_len` tokens
  mode="decode"   one token per call with that cache; its logits equal the parallel pass

Caches are explicit values (a dict of per-layer NamedTuples and the next position) with shapes
that never change from step to step, so one jitted decode step serves a whole generation.

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
retrieved positions). The retrieval query has its own projection W_Q' (+ conv, SiLU, l2-norm);
the memory's W_Q/W_K/W_V act on the attention output y.

Dimension letters: B batch, T tokens, D d_model, V vocabulary, H heads, E head dim,
C segment length, N_p persistent tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titans_jax import attention as attn_lib
from titans_jax import config_tree
from titans_jax import memory as memory_lib
from titans_jax.lmm import FLOAT_DTYPES, LMMConfig, LMMLayer, LMMState, causal_depthwise_conv, l2_normalize, rms_norm
from titans_jax.projection import dense_dot_general

Array = jax.Array

ARCHITECTURES = ("transformer", "swa", "lmm", "mac", "mag", "mal")
MAC_RETRIEVAL = ("causal", "learned")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
MODES = ("train", "prefill", "decode")


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
    num_learned_queries: int = 8
    mac_remat_segments: bool = True  # rematerialise each MAC segment in training (memory ~ carries only)
    # The long-term memory of every lmm / mac / mag / mal block (its memory MLP and inner loop are
    # lmm.memory). Its d_model, heads, head dim, norm_eps and dtypes come from this config.
    lmm: LMMConfig = LMMConfig()
    # everything else
    tie_embeddings: bool = False
    remat: str = "none"  # per-block rematerialisation policy, a key of REMAT_POLICIES
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
        if self.mac_retrieval == "learned" and self.num_learned_queries <= 0:
            raise ValueError("mac_retrieval='learned' needs num_learned_queries > 0")
        if self.attention_impl not in ("blocked", "jax"):
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; choose 'blocked' or 'jax'")
        if self.attention_impl == "jax" and self.arch in ("swa", "mag", "mal") and self.num_persistent:
            raise ValueError("attention_impl='jax' cannot keep the persistent prefix visible beyond the window; "
                             "use attention_impl='blocked' or num_persistent=0")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose one of {tuple(REMAT_POLICIES)}")
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

    def __call__(self, x: Array, cache, position, mode: str, max_len: int | None):
        cfg = self.config
        batch, length, _ = x.shape
        if mode == "decode":
            q, k, v = self._project(x, position[None])
            out, cache = attn_lib.decode_attention(q, k, v, cache, position, window=self.window)
        else:
            q, k, v = self._project(x, jnp.arange(length))
            if cfg.attention_impl == "jax":
                out = attn_lib.fused_attention(q, k, v, window=self.window, num_prefix=self.num_prefix)
            else:
                out = attn_lib.blocked_attention(q, k, v, window=self.window, num_prefix=self.num_prefix,
                                                 block_size=cfg.attention_block)
            cache = None
            if mode == "prefill":
                capacity = self.window if self.window is not None else max_len
                cache = attn_lib.cache_from_prefill(k, v, num_prefix=self.num_prefix, capacity=capacity)
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

    def _retrieved_tokens(self, x: Array, cache: MACCache):
        """h = M*_{t-1}(q): the pre-segment memory read with the segment's own queries (causal)
        or with learned queries. Returns h in model space [B, L or N_l, D] and the conv state."""
        cfg = self.config
        batch = x.shape[0]
        conv = cache.retrieval_conv
        if cfg.mac_retrieval == "causal":
            queries = self.retrieval_query(x)
            if cfg.lmm.conv_width:
                queries, conv = causal_depthwise_conv(queries, self.retrieval_conv_kernel, self.retrieval_conv_bias, conv)
            queries = l2_normalize(jax.nn.silu(_split_heads(queries, cfg.num_heads)))
            queries = queries.transpose(0, 2, 1, 3)  # [B, H, L, E]
        else:
            queries = jnp.broadcast_to(self.learned_queries, (batch,) + self.learned_queries.shape)
        retrieved = self.memory.retrieve(cache.segment_weights, queries).transpose(0, 2, 1, 3)  # [B, L, H, E]
        retrieved = rms_norm(retrieved, self.retrieval_norm_scale, cfg.norm_eps)
        return self.retrieval_out(retrieved.reshape(retrieved.shape[:2] + (-1,)).astype(x.dtype)), conv

    def segment(self, x: Array, cache: MACCache, position: Array) -> tuple[Array, MACCache]:
        """x: [B, L, D] (normed block input) at absolute positions position .. position + L - 1,
        all inside one segment, which already holds `cache.fill` tokens."""
        cfg = self.config
        batch, length, _ = x.shape
        heads, seg = cfg.num_heads, cfg.segment_size
        fill = cache.fill
        positions = position + jnp.arange(length)

        # 1. retrieval from the memory before this segment (eq. 21)
        retrieved, conv = self._retrieved_tokens(x, cache)

        # 2. attention over [persistent || retrieved || segment] (eq. 22-23)
        q, k, v = jnp.split(_split_heads(self.qkv(x), 3 * heads), 3, axis=2)
        q = attn_lib.rope(q, positions, cfg.rope_base)
        k = attn_lib.rope(k, positions, cfg.rope_base)
        _, k_h, v_h = jnp.split(_split_heads(self.qkv(retrieved), 3 * heads), 3, axis=2)
        seg_k = jax.lax.dynamic_update_slice_in_dim(cache.segment_k, k.astype(cache.segment_k.dtype), fill, axis=1)
        seg_v = jax.lax.dynamic_update_slice_in_dim(cache.segment_v, v.astype(cache.segment_v.dtype), fill, axis=1)
        query_idx = fill + jnp.arange(length)
        key_idx = jnp.arange(seg)
        causal = key_idx[None, :] <= query_idx[:, None]  # [L, C]
        if cfg.mac_retrieval == "causal":
            k_h = attn_lib.rope(k_h, positions, cfg.rope_base)
            ret_k = jax.lax.dynamic_update_slice_in_dim(cache.retrieved_k, k_h.astype(cache.retrieved_k.dtype), fill, axis=1)
            ret_v = jax.lax.dynamic_update_slice_in_dim(cache.retrieved_v, v_h.astype(cache.retrieved_v.dtype), fill, axis=1)
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
        y = attn_lib._attend(q, jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1),
                             jnp.concatenate(masks, axis=1)[None, None])
        y = self.out(y.reshape(batch, length, -1))

        # 3. write y into the memory and read it back with the updated memory (eq. 24-25)
        read, lmm_state = self.memory(y, cache.lmm)
        out = self.gate(y, read)

        # 4. at the end of a segment its memory becomes the next segment's M_{t-1}
        fill = fill + length
        done = fill == seg
        segment_weights = jax.tree.map(lambda new, old: jnp.where(done, new, old),
                                       lmm_state.memory.weights, cache.segment_weights)
        new_cache = MACCache(conv, segment_weights, ret_k, ret_v, seg_k, seg_v,
                             jnp.where(done, 0, fill).astype(jnp.int32), lmm_state)
        return out, new_cache

    def __call__(self, x: Array, cache: MACCache | None, position, mode: str, max_len):
        cfg = self.config
        batch, length, _ = x.shape
        if mode == "decode":
            return self.segment(x, cache, position)
        cache = self.initial_cache(batch)
        seg = cfg.segment_size
        num_full, rest = divmod(length, seg)
        outputs = []
        if num_full:
            def body(module, carry, inputs):
                cache, start = carry
                out, cache = module.segment(inputs, cache, start)
                return (cache, start + seg), out

            if cfg.mac_remat_segments and mode == "train":
                # keep only the carry per segment; recompute a segment's insides in the backward pass
                body = nn.remat(body, prevent_cse=False)
            scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                           in_axes=1, out_axes=1, length=num_full)
            xs = x[:, :num_full * seg].reshape(batch, num_full, seg, -1)
            (cache, _), out = scan(self, (cache, jnp.zeros((), jnp.int32)), xs)
            outputs.append(out.reshape(batch, num_full * seg, -1))
        if rest:
            out, cache = self.segment(x[:, num_full * seg:], cache, jnp.asarray(num_full * seg, jnp.int32))
            outputs.append(out)
        return jnp.concatenate(outputs, axis=1), cache


# ----------------------------------------------------------------------------------------------
# Blocks and the language model


class Block(nn.Module):
    """One residual block of `config.arch`. __call__(x, cache, position, mode, max_len) ->
    (x, cache); the cache is a dict of the mixers' caches (None in train mode)."""

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

    def __call__(self, x, cache, position, mode: str, max_len: int | None):
        cfg = self.config
        cache = dict(cache or {})
        new = {}

        def memory(h):
            y, state = self.memory(h, cache.get("memory") if mode == "decode" else None)
            new["memory"] = state
            return y

        def attention(h):
            y, kv = self.attention(h, cache.get("attention"), position, mode, max_len)
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
            y, new["mac"] = self.mac(self.mix_norm(x), cache.get("mac"), position, mode, max_len)
            x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return x, (new if mode != "train" else None)


class TitansLM(nn.Module):
    """Token ids [B, T] -> logits [B, T, V]; see the module docstring for the three modes."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, cache: dict | None = None, *, mode: str = "train",
                 max_len: int | None = None):
        cfg = self.config
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        tokens = check_tokens(tokens, cfg.vocab_size)
        batch, length = tokens.shape
        prefix = cfg.prefix_length
        if mode == "decode":
            if cache is None:
                raise ValueError("mode='decode' needs the cache returned by mode='prefill'")
            if length != 1:
                raise ValueError(f"mode='decode' takes one token per call, got {length}")
            check_cache(cfg, cache, batch)
            position = cache["position"]
        else:
            if cache is not None:
                raise ValueError(f"mode={mode!r} starts a new sequence and takes no cache")
            if mode == "prefill" and (max_len is None or max_len < length):
                raise ValueError(f"mode='prefill' needs max_len >= the prompt length {length}, got {max_len}")
            position = None

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        x = embed(tokens)
        x = jnp.where((tokens >= 0) & (tokens < cfg.vocab_size), 1.0, jnp.nan)[..., None].astype(x.dtype) * x
        if prefix and mode != "decode":
            persistent = self.param("persistent", nn.initializers.normal(0.02), (prefix, cfg.d_model), cfg.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(persistent.astype(x.dtype), (batch, prefix, cfg.d_model)), x], axis=1)

        block_cls = Block
        if cfg.remat != "none" and mode == "train":
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(4, 5))
        layer_caches = []
        for index in range(cfg.num_layers):
            layer_cache = cache["layers"][index] if mode == "decode" else None
            x, layer_cache = block_cls(cfg, name=f"block_{index}")(x, layer_cache, position, mode, max_len)
            layer_caches.append(layer_cache)
        x = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")(x[:, x.shape[1] - length:])
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg, cfg.vocab_size, "lm_head")(x)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        if mode == "train":
            return logits
        if mode == "prefill":
            new_position = jnp.asarray(prefix + length, jnp.int32)
            limit = jnp.asarray(prefix + max_len, jnp.int32)
        else:
            new_position = position + 1
            limit = cache["limit"]
            if cfg.attention_window is None:
                # Full attention holds at most max_len tokens: past that, poison instead of wrapping.
                logits = jnp.where(position < limit, logits, jnp.nan)
        return logits, {"layers": tuple(layer_caches), "position": new_position, "limit": limit}


def check_tokens(tokens: Array, vocab_size: int) -> Array:
    """Rank-2 integer token ids in [0, vocab_size): a clear error for concrete inputs; under jit
    an out-of-range id makes the sequence's logits NaN (from its position on, and usually all of
    them: masked attention weights multiply the NaN) instead of reading a clipped embedding."""
    if not hasattr(tokens, "ndim") or tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, length], got {getattr(tokens, 'shape', None)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.shape[0] == 0:
        raise ValueError(f"tokens must hold at least one sequence, got shape {tuple(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise ValueError("tokens must hold at least one position")
    if not isinstance(tokens, jax.core.Tracer):
        with jax.ensure_compile_time_eval():  # also for concrete arrays closed over under jit
            low, high = int(jnp.min(tokens)), int(jnp.max(tokens))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got values in [{low}, {high}]")
    return tokens


def check_cache(config: ModelConfig, cache, batch: int) -> None:
    """A decode cache against the one this model's prefill makes for `batch` sequences: the
    same structure (architecture, layers, mixers), and every leaf of the same shape and dtype.
    Runs on shapes only, so it also checks caches under jit; a mismatch names the first
    differing entry instead of failing deep inside a layer."""
    if not isinstance(cache, dict) or set(cache) != {"layers", "position", "limit"}:
        raise TypeError("the decode cache must be the dict returned by mode='prefill' (keys layers, position, "
                        f"limit), got {type(cache).__name__}" + (f" with keys {sorted(cache)}" if isinstance(cache, dict) else ""))
    layers = cache["layers"]
    if not isinstance(layers, (tuple, list)) or len(layers) != config.num_layers:
        raise ValueError(f"the decode cache holds {len(layers) if isinstance(layers, (tuple, list)) else '?'} layers, "
                         f"this {config.arch} model has {config.num_layers}")
    capacity = 1
    if config.attention_window is None:  # full attention: the ring holds max_len positions
        attention = layers[0].get("attention") if isinstance(layers[0], dict) else None
        if not isinstance(attention, attn_lib.KVCache):
            raise ValueError(f"the decode cache has no attention cache in layer 0, which a {config.arch} model needs "
                             "(a cache of another architecture?)")
        capacity = int(attention.k.shape[1])
    expected = _expected_cache(config, int(batch), capacity)
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(cache)
    want_leaves, want_tree = jax.tree_util.tree_flatten_with_path(expected)
    if got_tree != want_tree:
        got_paths = [jax.tree_util.keystr(path) for path, _ in got_leaves]
        want_paths = [jax.tree_util.keystr(path) for path, _ in want_leaves]
        missing = [p for p in want_paths if p not in got_paths]
        extra = [p for p in got_paths if p not in want_paths]
        raise ValueError(f"the decode cache does not fit this {config.arch} model (another architecture or "
                         f"config?): missing {missing[:3]}, unexpected {extra[:3]}")
    for (path, leaf), (_, want) in zip(got_leaves, want_leaves, strict=True):
        shape, dtype = tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", type(leaf))
        if shape != tuple(want.shape) or dtype != want.dtype:
            raise ValueError(
                f"decode cache entry {jax.tree_util.keystr(path)} has shape {shape} and dtype {dtype}, this model "
                f"expects {tuple(want.shape)} {want.dtype} for {batch} sequences (a cache of another batch size or "
                "config?)")


@functools.lru_cache(maxsize=32)
def _expected_cache(config: ModelConfig, batch: int, max_len: int):
    model = TitansLM(config, parent=None)

    def prefill(tokens):
        variables = model.init(jax.random.PRNGKey(0), tokens)
        return model.apply(variables, tokens, mode="prefill", max_len=max_len)[1]

    return jax.eval_shape(prefill, jax.ShapeDtypeStruct((batch, 1), jnp.int32))


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
