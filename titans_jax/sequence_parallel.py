"""Sequence (context) parallelism: the token mixers with the `sequence` mesh axis split.

GSPMD (titans_jax.sharding) splits everything that acts token by token; the mixers connect
tokens, so each runs per shard under `jax.shard_map` (manual over every mesh axis: batch and
heads are independent slices, so the data / fsdp / tensor axes need no communication inside)
and talks to its neighbours explicitly:

  sliding-window attention  a halo: the last `window` keys/values of the left neighbour, one
                            `ppermute`; never an all-gather of the sequence. (Full causal
                            attention all-gathers keys/values: MaxText's default strategy.)
  causal depthwise conv     a halo of width - 1 inputs, the same way.
  linear memory (L_M = 1)   exact and length-parallel. Over one shard the memory state
                            X = [W_chunk; W; S] (3I x O) evolves by an affine map X -> T X + c
                            (titans.md §2: the gradient at the chunk start is affine in the
                            weights, momentum and forgetting are linear). Every shard computes
                            its own (T, c) in one run of the memory on [identity | values]
                            (the recurrence acts on columns independently), the maps are
                            all-gathered (P small matrices, not the sequence) and composed up to
                            the shard, and each shard reruns from its true starting state.
                            Cost ~ (3I + O) / O + 1 times one shard's memory work, on P devices.
  deep memory, MAC          exact pipeline: the state after shard s - 1 is shard s's start,
                            handed on by `ppermute`. The local batch is cut into M microbatches
                            (default: one sequence each) in a GPipe schedule of M + P - 1 rounds;
                            shard s works on microbatch r - s in round r, so a fraction
                            (P - 1) / (M + P - 1) of each device's rounds is bubble. Only states
                            travel; each shard holds only its span's activations (what makes a
                            2M-token sequence fit), then recomputes its outputs from its start.
  TNT's local memory        no chain at all (titans_jax.tnt): a shard holding whole periods
                            gets its start from its left neighbour's last unfinished period,
                            which a first pass computes without knowing its own start.

Shards must be long enough for their halo (window, conv width - 1) and, for MAC, hold whole
segments; the memory itself accepts any shard length (a shard may start inside a chunk: the
state carries the chunk-start weights). Errors say which constraint failed.

Dimension letters: B batch, T tokens (global), L tokens per shard, H heads, E head dim, F
features, I / O memory layer widths, P shards on the `sequence` axis, M microbatches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from titans_jax import attention as attn_lib
from titans_jax import memory as memory_lib
from titans_jax import sharding, tnt

SEQUENCE = "sequence"
Array = jax.Array


def shards() -> int:
    """Number of sequence shards in the current mesh (1 without a mesh, or inside a manual region)."""
    return sharding.axis_size(SEQUENCE)


def local_length(length: int, what: str, minimum: int = 1, multiple_of: int = 1) -> int:
    """Tokens per shard, with a clear error when the sequence does not split as needed."""
    count = shards()
    if length % count:
        raise ValueError(f"{what}: a sequence of {length} tokens does not split into {count} equal shards (mesh axis "
                         f"'sequence' = {count}); use a length divisible by {count}")
    local = length // count
    if local < minimum:
        raise ValueError(f"{what}: a sequence shard of {local} tokens ({length} / {count}) is shorter than {minimum} "
                         f"tokens, which it needs from its neighbour; use fewer sequence shards or longer sequences")
    if local % multiple_of:
        raise ValueError(f"{what}: a sequence shard of {local} tokens ({length} / {count}) must hold whole "
                         f"segments of {multiple_of} tokens (segments stay inside a shard)")
    return local


def _spec(logical, shape) -> P:
    return sharding.logical_to_spec(logical, shape)


def _per_shard(fn, args: tuple, in_logical: tuple, out_spec) -> Any:
    """jax.shard_map of fn over the current mesh, manual over every axis; in_logical gives the
    logical axes of each argument (a tuple of names for an array, None for replicated leaves;
    pytrees take one entry per leaf via a matching tree)."""
    in_specs = tuple(jax.tree.map(lambda axes, leaf: _spec(axes, leaf.shape) if axes is not None else P(),
                                  logical, arg, is_leaf=lambda x: x is None or sharding._is_axes(x))
                     for logical, arg in zip(in_logical, args, strict=True))
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


def halo_from_left(x: Array, size: int, axis: int) -> Array:
    """Inside a shard: the last `size` entries along `axis` of the left neighbour's block
    (zeros on the first shard, which has no left neighbour)."""
    count = jax.lax.axis_size(SEQUENCE)
    tail = jax.lax.slice_in_dim(x, x.shape[axis] - size, x.shape[axis], axis=axis)
    return jax.lax.ppermute(tail, SEQUENCE, [(index, index + 1) for index in range(count - 1)])


# ----------------------------------------------------------------------------------------------
# Halo mixers


def attention(q: Array, k: Array, v: Array, prefix_k: Array, prefix_v: Array, position: Array, *,
              window: int | None, block_size: int) -> Array:
    """Causal / sliding-window attention of T tokens at absolute positions position ..
    position + T - 1 (after a persistent prefix of prefix_k.shape[1] positions that every query
    sees), with T split over the sequence axis. q, k, v: [B, T, H, E]; prefix_k / prefix_v:
    [B, N_p, H, E]. Equal to attention_lib.blocked_attention over [prefix || tokens]."""
    length = q.shape[1]
    local_length(length, "sliding-window attention" if window else "attention",
                 minimum=window if window is not None else 1)
    tokens_spec = ("batch", "sequence", "heads", None)
    prefix_spec = ("batch", None, "heads", None)

    def local(q, k, v, prefix_k, prefix_v, position):
        shard = jax.lax.axis_index(SEQUENCE)
        size = q.shape[1]
        start = position + shard * size
        if window is not None:  # the halo: the left neighbour's last `window` keys
            halo_k, halo_v = halo_from_left(k, window, 1), halo_from_left(v, window, 1)
            halo_pos = jnp.where(shard > 0, start - window + jnp.arange(window, dtype=jnp.int32), -1)
        else:  # full attention: every earlier key
            halo_k = jax.lax.all_gather(k, SEQUENCE, axis=1, tiled=True)
            halo_v = jax.lax.all_gather(v, SEQUENCE, axis=1, tiled=True)
            every = position + jnp.arange(halo_k.shape[1], dtype=jnp.int32)
            halo_pos = jnp.where(every < start, every, -1)
        cache = attn_lib.KVCache(prefix_k, prefix_v, halo_k, halo_v, halo_pos.astype(jnp.int32))
        out, _ = attn_lib.cached_attention(q, k, v, start, cache, window=window, block_size=block_size)
        return out

    args = (q, k, v, prefix_k.astype(k.dtype), prefix_v.astype(v.dtype), jnp.asarray(position, jnp.int32))
    return _per_shard(local, args, (tokens_spec,) * 3 + (prefix_spec,) * 2 + (None,),
                      _spec(tokens_spec, q.shape))


def causal_conv(x: Array, kernel: Array, bias: Array, previous: Array) -> Array:
    """lmm.causal_depthwise_conv of x [B, T, F] with T split over the sequence axis; `previous`
    [B, W - 1, F] holds the inputs before token 0 (the first shard's halo)."""
    width = kernel.shape[0]
    local_length(x.shape[1], "causal conv", minimum=width - 1)
    from titans_jax.lmm import causal_depthwise_conv

    def local(x, kernel, bias, previous):
        shard = jax.lax.axis_index(SEQUENCE)
        halo = jnp.where(shard > 0, halo_from_left(x, width - 1, 1), previous.astype(x.dtype))
        return causal_depthwise_conv(x, kernel, bias, halo)[0]

    return _per_shard(local, (x, kernel, bias, previous),
                      (("batch", "sequence", "qkv"), (None, "qkv"), ("qkv",), ("batch", None, "qkv")),
                      _spec(("batch", "sequence", "qkv"), x.shape))


# ----------------------------------------------------------------------------------------------
# Pipelines: exact for any recurrence with a fixed-shape state


def _split_batch(tree, microbatches: int):
    """Leaves with a leading batch axis -> [M, B / M, ...]; scalars (shared counters) stay."""
    return jax.tree.map(lambda x: x if x.ndim == 0 else x.reshape((microbatches, -1) + x.shape[1:]), tree)


def _merge_batch(tree):
    return jax.tree.map(lambda x: x if x.ndim == 0 else x.reshape((-1,) + x.shape[2:]), tree)


def _pick(tree, index):
    return jax.tree.map(lambda x: x if x.ndim == 0 else x[index], tree)


def pipeline_starts(step: Callable[[Any, Any], Any], inputs, start, microbatches: int | None = None):
    """Inside a shard: the true starting state of this shard, for a recurrence
    `step(inputs, state) -> state after inputs` whose first shard starts from `start`.

    inputs / start: pytrees whose leaves have the local batch axis first (rank-0 leaves, such
    as a count of pending tokens, are shared by the batch). The batch is cut into
    `microbatches` (default: the local batch size) and run in a GPipe schedule over the
    sequence shards: M + P - 1 rounds, shard s busy with microbatch r - s in round r, states
    handed right by ppermute. Each round is rematerialised, so the backward pass stores only
    the states. Returns the start states with the batch axis merged back.
    """
    count = jax.lax.axis_size(SEQUENCE)
    shard = jax.lax.axis_index(SEQUENCE)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    microbatches = batch if microbatches is None else microbatches
    if batch % microbatches:
        raise ValueError(f"the local batch of {batch} sequences does not split into {microbatches} microbatches")
    inputs, start = _split_batch(inputs, microbatches), _split_batch(start, microbatches)
    step = jax.checkpoint(step, prevent_cse=False)

    def one_round(carry, round_index):
        incoming, starts = carry
        micro = round_index - shard
        active = (micro >= 0) & (micro < microbatches)
        micro = jnp.clip(micro, 0, microbatches - 1)
        state = jax.tree.map(lambda own, received: jnp.where(shard == 0, own, received), _pick(start, micro), incoming)
        starts = jax.tree.map(
            lambda buffer, new: jnp.where(active, new, buffer) if buffer.ndim == 0
            else buffer.at[micro].set(jnp.where(active, new, buffer[micro])), starts, state)
        end = step(_pick(inputs, micro), state)
        incoming = jax.lax.ppermute(end, SEQUENCE, [(index, index + 1) for index in range(count - 1)])
        return (incoming, starts), None

    first = _pick(start, 0)
    (_, starts), _ = jax.lax.scan(one_round, (first, start), jnp.arange(microbatches + count - 1))
    return _merge_batch(starts)


def pipeline(stream: Callable[[Any, Array, Any, Array], tuple[Array, Any]], params, x: Array, start,
             position: Array, microbatches: int | None = None) -> Array:
    """Outputs of a streaming mixer `stream(params, x, cache, position) -> (y, cache)` over x
    [B, T, D] with T split over the sequence axis, from the cache `start` at `position`
    (replicated). The parameters enter every shard whole (gathered once per call)."""

    def local(params, x, start, position):
        position = position + jax.lax.axis_index(SEQUENCE) * x.shape[1]
        starts = pipeline_starts(lambda xs, cache: stream(params, xs, cache, position)[1], x, start, microbatches)
        return stream(params, x, starts, position)[0]

    spec = _spec(("batch", "sequence", None), x.shape)
    start_logical = jax.tree.map(lambda leaf: None if leaf.ndim == 0 else ("batch",) + (None,) * (leaf.ndim - 1), start)
    return _per_shard(local, (params, x, start, jnp.asarray(position, jnp.int32)),
                      (jax.tree.map(lambda _: None, params), ("batch", "sequence", None), start_logical, None), spec)


# ----------------------------------------------------------------------------------------------
# The memory


def is_affine(config: memory_lib.MemoryConfig) -> bool:
    """The memory's state update is affine in its state (the exact length-parallel path): one
    linear layer, no residual LayerNorm, no bias, no surprise clip (its scale depends on the
    state), and the exact gradient (a first-order surprise differentiates the composed map
    differently; the pipeline handles both)."""
    return (config.depth == 1 and not config.residual_norm and not config.use_bias
            and config.surprise_gradient == "full" and config.surprise_clip is None)


def _stack(state: memory_lib.MemoryState) -> Array:
    """[W_chunk; W; S] along the input axis: [B, H, 3I, O]."""
    return jnp.concatenate([state.chunk_weights[0]["w"], state.weights[0]["w"], state.momentum[0]["w"]], axis=-2)


def _unstack(stacked: Array, num_pending: Array) -> memory_lib.MemoryState:
    chunk_w, w, s = jnp.split(stacked, 3, axis=-2)
    return memory_lib.MemoryState(({"w": w},), ({"w": s},), ({"w": chunk_w},), num_pending)


def _affine_starts(params, keys, values, queries, theta, log_eta, log_keep, config, start):
    """Inside a shard: the true start state by composing the shards' affine maps."""
    shard = jax.lax.axis_index(SEQUENCE)
    length = keys.shape[2]
    width_in, width_out = config.key_dim, config.value_dim
    pending = (start.num_pending + shard * length) % config.chunk_size
    # One run on [identity | 0] states with [0 | values]: columns evolve independently, so the
    # end state is [T | c] of the map X -> T X + c over this shard.
    augmented = dataclasses.replace(config, value_dim=3 * width_in + width_out)
    batch, heads = keys.shape[:2]
    state_dtype = start.weights[0]["w"].dtype  # the memory computes in its state's dtype
    identity = jnp.broadcast_to(jnp.eye(3 * width_in, 3 * width_in + width_out, dtype=state_dtype),
                                (batch, heads, 3 * width_in, 3 * width_in + width_out))
    zeros = jnp.zeros(values.shape[:-1] + (3 * width_in,), values.dtype)
    # M_0 is not read when a state is given (and this memory has no LayerNorm or bias): the
    # parameters passed only carry the augmented shapes that memory_apply checks.
    _, end = memory_lib.memory_apply({"layers": ({"w": identity[0, :, :width_in]},)}, keys,
                                     jnp.concatenate([zeros, values], axis=-1), queries, theta, log_eta, log_keep,
                                     augmented, _unstack(identity, pending))
    stacked = _stack(end)
    transform, offset = stacked[..., :3 * width_in], stacked[..., 3 * width_in:]
    transforms = jax.lax.all_gather(transform, SEQUENCE)  # [P, B, H, 3I, 3I]
    offsets = jax.lax.all_gather(offset, SEQUENCE)  # [P, B, H, 3I, O]

    def compose(state, item):
        index, transform, offset = item
        return jnp.where(index < shard, transform @ state + offset, state), None

    count = transforms.shape[0]
    state, _ = jax.lax.scan(compose, _stack(start), (jnp.arange(count), transforms, offsets))
    return _unstack(state, pending)


def memory(params: dict, keys: Array, values: Array, queries: Array, theta: Array, log_eta: Array | None,
           log_keep: Array | None, config: memory_lib.MemoryConfig, start: memory_lib.MemoryState,
           microbatches: int | None = None) -> Array:
    """memory_lib.memory_apply's outputs [B, H, T, V] with T split over the sequence axis,
    starting from `start` (the state before token 0, replicated): the affine path for a linear
    memory (is_affine), the pipeline otherwise. Same arguments as memory_apply."""
    local_length(keys.shape[2], "memory")
    log_eta, log_keep = _fill_gates(theta, log_eta, log_keep, start)
    tokens, gates, state_logical, param_logical = _memory_logical(params, start)
    affine = is_affine(config)

    def local(params, keys, values, queries, theta, log_eta, log_keep, start):
        inputs = (keys, values, queries, theta, log_eta, log_keep)
        if affine:
            starts = _affine_starts(params, *inputs, config, start)
        else:
            def step(inputs, state):
                return memory_lib.memory_apply(params, *inputs, config, state)[1]

            starts = pipeline_starts(step, inputs, start, microbatches)
        return memory_lib.memory_apply(params, *inputs, config, starts)[0]

    args = (params, keys, values, queries, theta, log_eta, log_keep, start)
    return _per_shard(local, args, (param_logical, tokens, tokens, tokens, gates, gates, gates, state_logical),
                      _spec(tokens, values.shape))


def _fill_gates(theta, log_eta, log_keep, start):
    """memory_apply's defaults for absent gates (no momentum: eta = 0; no forgetting), as
    arrays, so that every shard_map argument is an array."""
    dtype = start.weights[0]["w"].dtype
    if log_eta is None:
        log_eta = jnp.full(theta.shape, -jnp.inf, dtype)
    if log_keep is None:
        log_keep = jnp.zeros(theta.shape, dtype)
    return log_eta, log_keep


def _memory_logical(params, start):
    """Logical axes of the memory's token inputs, gates, state and parameters."""
    tokens, gates = ("batch", "heads", "sequence", None), ("batch", "heads", "sequence")
    state_logical = jax.tree.map(lambda leaf: None if leaf.ndim == 0 else ("batch", "heads") + (None,) * (leaf.ndim - 2),
                                 start)
    param_logical = jax.tree.map(lambda leaf: ("heads",) + (None,) * (leaf.ndim - 1), params)
    return tokens, gates, state_logical, param_logical


def local_memory(params: dict, inputs: tuple, config: memory_lib.MemoryConfig, period: int,
                 start: memory_lib.MemoryState, position: Array) -> Array:
    """TNT's local memory (titans_jax.tnt) with the tokens split over the sequence axis:
    outputs [B, H, T, V]. `start` / `position`: the local state before token 0 and its place in
    its period. Each shard holds at least one whole period, so its last period ends inside it
    and its end state does not depend on its start: a first pass from any start gives it, one
    ppermute hands it right, a second pass from the true start gives the outputs (2x the local
    memory's work, no dependency across more than one shard)."""
    keys, values, queries, theta, log_eta, log_keep = inputs
    local_length(keys.shape[2], "TNT local memory", minimum=period)
    log_eta, log_keep = _fill_gates(theta, log_eta, log_keep, start)
    tokens, gates, state_logical, param_logical = _memory_logical(params, start)

    def local(params, keys, values, queries, theta, log_eta, log_keep, start, position):
        count = jax.lax.axis_size(SEQUENCE)
        shard = jax.lax.axis_index(SEQUENCE)
        inputs = (keys, values, queries, theta, log_eta, log_keep)
        position = (position + shard * keys.shape[2]) % period
        any_start = memory_lib.init_memory_state(params, keys.shape[0], config, start.weights[0]["w"].dtype)
        _, end, _ = tnt.stream_local_memory(params, inputs, config, period, any_start, position)
        received = jax.lax.ppermute(end, SEQUENCE, [(index, index + 1) for index in range(count - 1)])
        true_start = jax.tree.map(lambda own, left: jnp.where(shard == 0, own, left), start, received)
        return tnt.stream_local_memory(params, inputs, config, period, true_start, position)[0]

    args = (params, keys, values, queries, theta, log_eta, log_keep, start, jnp.asarray(position, jnp.int32))
    return _per_shard(local, args, (param_logical, tokens, tokens, tokens, gates, gates, gates, state_logical, None),
                      _spec(tokens, values.shape))
