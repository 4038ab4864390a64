"""TNT's local memory (Li, Behrouz, et al., arXiv 2511.07343), an opt-in part of the LMM layer.

TNT trades the exact long recurrence for parallelism with a hierarchy: the layer's main
("global") memory runs over large chunks, and a local memory -- same projections and gates, its
own initial weights M_0^L, small chunks -- restarts from M_0^L every `period` tokens. A period
needs nothing from earlier periods, so periods run side by side (one device folds them into the
batch) and a sequence shard that holds whole periods needs only its left neighbour's last,
unfinished period (titans_jax.sequence_parallel.local_memory). The layer adds the two
retrievals. Periods are counted from the layer's first input token (the persistent prefix, when
the model prepends one, included), so every way of running a sequence -- one parallel call,
streaming in pieces, sequence shards -- computes the same function.

Not implemented here: TNT's second stage (fine-tuning only the local memory at a smaller chunk
size) is a training recipe over these parameters, not a different layer.

Dimension letters: B batch, H heads, T tokens, S period, N whole periods in T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from titans_jax import memory as memory_lib

Array = jax.Array


def _select(predicate, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), on_true, on_false)


def fresh_local_memory(params: dict, inputs: tuple, config: memory_lib.MemoryConfig, period: int
                       ) -> tuple[Array, memory_lib.MemoryState, Array]:
    """The local memory over a sequence that starts at a period boundary: outputs [B, H, T, V],
    the state and the position in its period after the last token. The N whole periods run as
    N x B independent sequences from M_0 (one batched call), the rest as one more. inputs =
    (keys, values, queries, theta, log_eta, log_keep) as memory_apply takes them ([B, H, T,
    ...]; the log gates may be None)."""
    length, batch = inputs[0].shape[2], inputs[0].shape[0]
    whole, rest = divmod(length, period)
    # after whole periods only, the next token starts a period: M_0 (what streaming resets to)
    state = memory_lib.init_memory_state(params, batch, config)
    outputs = []
    if whole:
        def fold(x):  # [B, H, N S, ...] -> [N B, H, S, ...]
            if x is None:
                return None
            x = x[:, :, :whole * period]
            x = x.reshape(x.shape[:2] + (whole, period) + x.shape[3:])
            x = jnp.moveaxis(x, 2, 0)
            return x.reshape((-1,) + x.shape[2:])

        out, _ = memory_lib.memory_apply(params, *(fold(x) for x in inputs), config)
        out = out.reshape((whole, batch) + out.shape[1:])  # [N, B, H, S, V]
        out = jnp.moveaxis(out, 0, 2)
        outputs.append(out.reshape(out.shape[:2] + (whole * period,) + out.shape[4:]))
    if rest:
        tail = tuple(None if x is None else x[:, :, whole * period:] for x in inputs)
        out, state = memory_lib.memory_apply(params, *tail, config)
        outputs.append(out)
    return jnp.concatenate(outputs, axis=2), state, jnp.asarray(rest, jnp.int32)


def stream_local_memory(params: dict, inputs: tuple, config: memory_lib.MemoryConfig, period: int,
                        state: memory_lib.MemoryState, position: Array, num_valid: Array | None = None
                        ) -> tuple[Array, memory_lib.MemoryState, Array]:
    """The local memory over T tokens that continue `state`, the first at `position` (int32, in
    [0, period)) of its period; num_valid (traced, optional): only the first num_valid tokens
    are real. Returns outputs [B, H, T, V], the state and the position after the real tokens.
    A scan over frames of F = min(T, S) tokens that never cross a period boundary (the first
    ends the current period or takes all T): 1 + ceil((T - 1) / F) frames always suffice; a
    frame that starts a period starts from M_0."""
    keys = inputs[0]
    batch, length = keys.shape[0], keys.shape[2]
    real = length if num_valid is None else num_valid
    frame = min(length, period)
    num_frames = 1 + -(-(length - 1) // frame)
    padded = tuple(None if x is None else jnp.pad(x, [(0, 0), (0, 0), (0, frame)] + [(0, 0)] * (x.ndim - 3))
                   for x in inputs)
    fresh = memory_lib.init_memory_state(params, batch, config, state.weights[0]["w"].dtype)
    out_buffer = jnp.zeros(keys.shape[:2] + (length + frame, config.value_dim), state.weights[0]["w"].dtype)

    def body(carry, _):
        state, start, position, out_buffer = carry
        state = _select(position == 0, fresh, state)
        count = jnp.clip(jnp.minimum(real - start, period - position), 0, frame).astype(jnp.int32)
        pieces = tuple(None if x is None else jax.lax.dynamic_slice_in_dim(x, start, frame, axis=2) for x in padded)
        out, new_state = memory_lib.memory_apply(params, *pieces, config, state, num_valid=count)
        state = _select(count > 0, new_state, state)
        out_buffer = jax.lax.dynamic_update_slice_in_dim(out_buffer, out.astype(out_buffer.dtype), start, axis=2)
        return (state, start + count, (position + count) % period, out_buffer), None

    carry = (state, jnp.zeros((), jnp.int32), jnp.asarray(position, jnp.int32), out_buffer)
    (state, _, position, out_buffer), _ = jax.lax.scan(body, carry, None, length=num_frames)
    return out_buffer[:, :, :length], state, position
