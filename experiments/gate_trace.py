"""What a trained model's long-term memory does over its context: gate values, the inner step
size of each chunk, the memory's weight norm and how far back its gradient reaches.

    python -m experiments.gate_trace --run runs/lc_probe/mac/seed0 --config lc_mac \
        --set run.steps=200 --set data.tasks=niah_single_1,qa1 \
        --set model.lmm.memory.surprise_gradient=full --set data.task_answer_weight=token \
        --set data.task_prompt_length=full --step 159

The run is restored from its newest checkpoint at or before --step and replayed to --step with
its own batches (experiments.grad_spikes.restore_run), then the batch it trains on next is run
once with the memory layers' inputs kept (the "diagnostics" collection, titans_jax.lmm). For
every memory layer, per window of --window tokens (mean over rows and heads unless "max"):

- theta, eta, alpha: the gates (step size, momentum decay, forgetting);
- chunk step: the largest eigenvalue of 2 * loss_scale * sum_i theta_i k_i k_i^T over the
  window's chunks (max), the inner step of one chunk on the linear part of the memory. All of a
  chunk's gradients are taken at the same weights, so past 2 a chunk overshoots on the keys'
  common direction and, chunk after chunk, the memory oscillates with growing amplitude;
- |W|: Frobenius norm of the memory's weights (all its layers) after the window;
- |u|: the median and largest norm of a token's inner gradient (its surprise before theta, all
  layers) at its chunk-start weights: what MemoryConfig.surprise_clip caps;
- d/dk: norm of the gradient of the last window's retrieval (a fixed random projection of it)
  with respect to each earlier key, relative to the last window's own: how much a token far back
  moves what the memory returns now. Growth with distance is the long-sequence gradient blow-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import apply_overrides, get_config
from experiments.grad_spikes import device_batch, restore_run
from titans_jax import memory as memory_lib
from titans_jax.training import next_token_nll


def chunk_steps(keys, theta, chunk: int, loss_scale: float) -> np.ndarray:
    """[B, H, T, K], [B, H, T] -> [B, H, T // chunk]: the largest eigenvalue of
    2 * loss_scale * sum_{i in chunk} theta_i k_i k_i^T."""
    batch, heads, length, dim = keys.shape
    k = keys[..., : length // chunk * chunk, :].reshape(batch, heads, length // chunk, chunk, dim)
    t = theta[..., : length // chunk * chunk].reshape(batch, heads, length // chunk, chunk)
    gram = jnp.einsum("bhcik,bhci,bhcil->bhckl", k, t, k) * (2 * loss_scale)
    return np.asarray(jnp.linalg.eigvalsh(gram)[..., -1])


def weight_norms(params, inputs, config, window: int) -> np.ndarray:
    """Memory weight norm (mean over rows and heads) after each window, streaming window by
    window (exactly one call over the whole row, titans_jax.memory's streaming contract)."""
    apply = jax.jit(lambda state, *pieces: memory_lib.memory_apply(params, *pieces, config, state)[1])
    state = memory_lib.init_memory_state(params, inputs[0].shape[0], config, inputs[0].dtype)
    out = []
    for start in range(0, inputs[0].shape[2] - window + 1, window):
        state = apply(state, *(None if x is None else x[:, :, start:start + window] for x in inputs))
        squares = sum(jnp.sum(layer["w"].astype(jnp.float32) ** 2, axis=(-2, -1)) for layer in state.weights)
        out.append(float(jnp.mean(jnp.sqrt(squares))))
    return np.array(out)


def wide(x):
    """x in at least float32 (bfloat16 parameters), float64 where the memory runs in it."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@functools.partial(jax.jit, static_argnames="config")
def _chunk_figures(params, weights, keys, values, config):
    """Per token at `weights` (per layer [B, H, I, O]): ([B, H, C, L] the norm of its inner
    gradient in each layer of the memory's MLP, [B, H, C] the standard deviation over features of
    the MLP's output f(k) before the residual LayerNorm, the scale that norm divides by)."""
    plain = dataclasses.replace(config, residual_norm=False, last_layer_floor=False,
                                every_layer_floor=False)  # memory_mlp then returns f(k)

    def one_slice(slice_weights, slice_norm, k, v):  # per-layer [I, O] weights; k, v [C, dim]
        grads = jax.vmap(jax.grad(memory_lib.inner_loss), in_axes=(None, None, 0, 0, None))(
            slice_weights, slice_norm, k, v, config)
        per_layer = jnp.stack([jnp.sqrt(sum(jnp.sum(wide(g) ** 2, axis=tuple(range(1, g.ndim)))
                                            for g in jax.tree.leaves(layer))) for layer in grads], axis=-1)
        output = wide(memory_lib.memory_mlp(slice_weights, None, k, plain))
        return per_layer, jnp.std(output, axis=-1)

    norm = params.get("norm")
    over_heads = jax.vmap(one_slice, in_axes=(0, None if norm is None else 0, 0, 0))
    return jax.vmap(over_heads, in_axes=(0, None, 0, 0))(weights, norm, keys, values)


@functools.partial(jax.jit, static_argnames="config")
def _advance(params, state, inputs, config):
    return memory_lib.memory_apply(params, *inputs, config, state)[1]


def inner_figures(params, inputs, config, state=None) -> dict:
    """Per token, at the weights of its chunk's start (what its inner gradient is taken at),
    by layer of the memory's MLP: {"surprise": [B, H, T, L] the norm of its inner gradient in
    each layer, before any surprise_clip; "weights": [B, H, T, L] each layer's Frobenius norm;
    "norm_input": [B, H, T] the standard deviation of f(k), the MLP's output before the residual
    LayerNorm (M(x) = x + LN(f(x)))}. Streams chunk by chunk from `state` (None: M_0), whose
    unfinished chunk (num_pending tokens) is finished first at its chunk_weights; at a chunk
    boundary the state's weights are the gradient point."""
    keys, values = inputs[0], inputs[1]
    if state is None:
        state = memory_lib.init_memory_state(params, keys.shape[0], config, keys.dtype)
    first = -int(state.num_pending) % config.chunk_size  # the tokens that finish the unfinished chunk
    bounds = sorted({0, keys.shape[2], *range(first, keys.shape[2], config.chunk_size)})
    out = {"surprise": [], "weights": [], "norm_input": []}
    for start, stop in zip(bounds[:-1], bounds[1:]):
        span = slice(start, stop)
        surprise, norm_input = _chunk_figures(params, state.chunk_weights, keys[:, :, span], values[:, :, span], config)
        out["surprise"].append(surprise)
        out["norm_input"].append(norm_input)
        layers = jnp.stack([jnp.sqrt(sum(jnp.sum(wide(leaf) ** 2, axis=tuple(range(2, leaf.ndim)))
                                         for leaf in jax.tree.leaves(layer))) for layer in state.chunk_weights], -1)
        out["weights"].append(jnp.broadcast_to(layers[:, :, None], (*layers.shape[:2], stop - start, layers.shape[-1])))
        state = _advance(params, state, tuple(None if x is None else x[:, :, span] for x in inputs), config)
    return {name: np.asarray(jnp.concatenate(parts, axis=2)) for name, parts in out.items()}


def surprise_norms(params, inputs, config, state=None, weight_norms: bool = False):
    """[B, H, T]: ||u_t||, the norm of each token's inner gradient (all memory layers) at the
    weights of its chunk's start, before any surprise_clip: what MemoryConfig.surprise_clip caps
    (inner_figures, over the MLP's layers). weight_norms: also [B, H, T], each token's gradient
    point's Frobenius norm (all layers), the scale a residual LayerNorm's gradient is inversely
    proportional to."""
    figures = inner_figures(params, inputs, config, state)
    norms, scales = (np.sqrt(np.sum(np.square(figures[name], dtype=np.float64), axis=-1)).astype(figures[name].dtype)
                     for name in ("surprise", "weights"))
    return (norms, scales) if weight_norms else norms


def key_gradients(params, inputs, config, window: int, seed: int = 0) -> np.ndarray:
    """Per-token norm of d<r, y_last> / dk_t, mean over rows and heads: [T]."""
    keys, values, queries, theta, log_eta, log_keep = inputs
    length = keys.shape[2]
    cotangent = jax.random.normal(jax.random.key(seed), (*keys.shape[:2], window, values.shape[-1]))

    def readout(k):
        retrieved, _ = memory_lib.memory_apply(params, k, values, queries, theta, log_eta, log_keep, config)
        return jnp.sum(retrieved[:, :, length - window:].astype(jnp.float32) * cotangent)

    grad = jax.jit(jax.grad(readout))(keys)
    return np.asarray(jnp.mean(jnp.linalg.norm(grad, axis=-1), axis=(0, 1)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--config", required=True, help="the named config the run was trained with")
    parser.add_argument("--set", action="append", default=[], help="the run's overrides, as given to experiments.train")
    parser.add_argument("--step", required=True, help="analyse the parameters after these many steps (comma-separated)")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--reach-gradient", choices=("run",) + memory_lib.SURPRISE_GRADIENTS, default="run",
                        help="the memory gradient d/dk is taken with (default: the run's surprise_gradient)")
    parser.add_argument("--from-dump", help="the parameters and batch saved by experiments.grad_spikes --dump, "
                                            "in the config's dtype (e.g. float64 with JAX_ENABLE_X64=1), instead of "
                                            "replaying to --step")
    args = parser.parse_args(argv)

    wanted = sorted(int(step) for step in args.step.split(","))
    if apply_overrides(get_config(args.config), args.set).model_config(vocab_size=256).scan_layers:
        raise SystemExit("gate_trace reads models whose blocks are unrolled (scan_layers=False); this run scans "
                         "its layers, and nn.scan does not carry the memory layers' diagnostics out")
    config, programs, train_batch, state, step = restore_run(args.run, args.config, args.set,
                                                             0 if args.from_dump else wanted[0])
    if args.from_dump:
        saved = np.load(args.from_dump)
        params = jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.asarray(saved[jax.tree_util.keystr(path)], leaf.dtype), state["params"])
        batch = (jnp.asarray(saved["tokens"]), jnp.asarray(saved["mask"]))
        return {wanted[0]: analyse(args, programs, params, batch, wanted[0])}
    reports = {}
    for target in wanted:
        while step < target:
            state, _ = programs.step(state, device_batch(train_batch(step)))
            step += 1
        reports[step] = analyse(args, programs, state["params"], device_batch(train_batch(step)), step)
    return reports


def memory_layers(diagnostics) -> list[tuple[list[str], tuple]]:
    """(the layer's path in the params tree, its (keys, values, queries, theta, log_eta, log_keep)
    [B, H, T, ...]) for every memory layer in a model's sown "diagnostics" collection."""
    found = jax.tree_util.tree_flatten_with_path(diagnostics, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 1)[0]
    layers = []
    for path, inputs in found:
        names = [getattr(entry, "key", str(entry)) for entry in path]
        layers.append((names[: names.index("memory_inputs")], _stream(inputs)))
    return layers


def _stream(inputs):
    """The memory inputs of one layer as sown (a tuple of its calls; MAC's one call per segment
    stacked on a leading axis) -> (keys, values, queries, theta, log_eta, log_keep) [B, H, T, ...]."""
    (inputs,) = inputs
    if inputs[0].ndim == 4:
        return inputs

    def merge(x):  # [S, B, H, seg, ...] -> [B, H, S * seg, ...]
        x = jnp.moveaxis(x, 0, 2)
        return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], *x.shape[4:])

    return tuple(None if x is None else merge(x) for x in inputs)


def analyse(args, programs, params, batch, step) -> dict:
    """Print and return {layer path: [one dict per window]} for the parameters after `step`."""
    tokens, mask = batch if isinstance(batch, tuple) else (batch, None)

    def loss(p):
        total, count = next_token_nll(programs.model, p, tokens, mask)
        return total / count

    value, grads = jax.jit(jax.value_and_grad(loss))(params)  # jitted: op-by-op dispatch was most of the tool's time
    grad_norm = float(jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads))))
    collected = jax.jit(lambda p, ids: programs.model.apply({"params": p}, ids, mutable=["diagnostics"])[1])(
        params, tokens[:, :-1])
    print(f"\n== {args.run}: parameters after step {step}, batch of step {step + 1}: "
          f"loss {float(value):.3f}, gradient norm {grad_norm:.3g}")
    if "diagnostics" not in collected:
        raise SystemExit("this model has no memory layer to trace")

    report = {}
    for layer_path, inputs in memory_layers(collected["diagnostics"]):
        node = functools.reduce(operator.getitem, layer_path, params)
        mem_config = _memory_config(programs.model.config)
        if args.reach_gradient != "run":
            mem_config = dataclasses.replace(mem_config, surprise_gradient=args.reach_gradient)
        keys, values, queries, theta, log_eta, log_keep = inputs
        length = keys.shape[2]
        window = min(args.window, length)
        if length % window:
            raise SystemExit(f"--window {window} must divide the rows' length {length}")
        steps = chunk_steps(keys, theta, mem_config.chunk_size, mem_config.loss_scale)
        norms = weight_norms(node["memory"], inputs, mem_config, window)
        reach = key_gradients(node["memory"], inputs, mem_config, window)
        surprise = surprise_norms(node["memory"], inputs, mem_config)
        reach = reach / reach[length - window:].mean()
        eta = None if log_eta is None else np.asarray(jnp.exp(log_eta))
        alpha = None if log_keep is None else np.asarray(-jnp.expm1(log_keep))
        per_chunk = max(window // mem_config.chunk_size, 1)
        rows = []
        for index, end in enumerate(range(window, length + 1, window)):
            span = slice(end - window, end)
            rows.append({"start": end - window, "end": end, "theta": float(np.mean(theta[..., span])),
                         "theta_max": float(np.max(theta[..., span])),
                         "eta": None if eta is None else float(eta[..., span].mean()),
                         "alpha": None if alpha is None else float(alpha[..., span].mean()),
                         "chunk_step": float(steps[..., index * per_chunk:(index + 1) * per_chunk].max()),
                         "weight_norm": float(norms[index]), "reach": float(reach[span].mean()),
                         "surprise_median": float(np.median(surprise[..., span])),
                         "surprise_max": float(np.max(surprise[..., span]))})
        name = "/".join(layer_path)
        report[name] = rows
        print(f"\n{name} (chunk {mem_config.chunk_size}; d/dk with the {mem_config.surprise_gradient} gradient)")
        print(f"{'tokens':>11} {'theta':>7} {'max':>7} {'eta':>6} {'alpha':>9} {'chunk step':>10} {'|W|':>9} "
              f"{'d/dk rel':>9} {'|u| median':>10} {'|u| max':>9}")
        for row in rows:
            print(f"{row['start']:>5}-{row['end']:<5} {row['theta']:7.4f} {row['theta_max']:7.4f} "
                  f"{'-' if row['eta'] is None else format(row['eta'], '.3f'):>6} "
                  f"{'-' if row['alpha'] is None else format(row['alpha'], '.2e'):>9} "
                  f"{row['chunk_step']:10.3f} {row['weight_norm']:9.3g} {row['reach']:9.3g} "
                  f"{row['surprise_median']:10.3g} {row['surprise_max']:9.3g}")
    return report


def _memory_config(model_config) -> memory_lib.MemoryConfig:
    """The resolved MemoryConfig of the model's memory layers (all share one LMMConfig)."""
    cfg = model_config
    return cfg.lmm.resolve(d_model=cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.head_dim, norm_eps=cfg.norm_eps,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype).memory_config


if __name__ == "__main__":
    main()
