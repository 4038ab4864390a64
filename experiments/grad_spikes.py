"""Where a training run's gradient spikes come from: replay steps from a checkpoint and name the
parameters that carry the gradient norm.

    python -m experiments.grad_spikes --run runs/lc_probe/mac/seed0 --config lc_mac \
        --set run.steps=200 --set data.tasks=niah_single_1,qa1 \
        --set model.lmm.memory.surprise_gradient=full --set data.task_answer_weight=token \
        --set data.task_prompt_length=full --from-step 150 --to-step 172

The run's checkpoints up to --from-step are copied to a temporary directory (the newest of them
is restored, exactly as a resume would), then each step is taken again with the run's own
batches (`experiments.train.build_data` of the same config: a pure function of the step) and,
whenever the gradient norm exceeds --threshold, the four parameters with the largest gradient
norms are printed. At the first non-finite loss or gradient it says whether the parameters the
step started from were finite and which parameters' gradients are not, re-runs the loss and
gradient of each row alone (with the row's longest run of one repeated token), with
jax_debug_nans and with checkify's NaN checks to name the first operation (source line) giving a
NaN, saves the parameters and batch with --dump, and stops. --from-dump repeats the analysis on a
saved step without replaying (per non-finite row), and for the first non-finite row says at which
token its forward first leaves the finite range and how each memory layer's weight norm grows
along the row up to there (a memory whose own inner gradient descent diverges); with
JAX_ENABLE_X64=1 and `--set model.dtype=float64 --set model.param_dtype=float64` it runs the
saved float32 step in float64 (a row that is non-finite there too is not a float32 overflow).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import apply_overrides, get_config
from experiments.train import build_data
from titans_jax import sharding
from titans_jax.models import TitansLM
from titans_jax.training import Checkpointer, compiled_programs, next_token_nll


def restore_run(run: str, config_name: str, overrides: list[str], from_step: int):
    """(config, programs, train_batch, state, step) of a run restored from its newest checkpoint at
    or before `from_step` (copied to a scratch directory, restored exactly as a resume would), or
    from its initial state (step 0, made again from the config's seed) when it has none."""
    config = apply_overrides(get_config(config_name), overrides)
    tokenizer, train_batch, *_ = build_data(config)
    model_config = config.model_config(vocab_size=tokenizer.vocab_size)
    programs = compiled_programs(model_config, config.optim, config.run.steps, config.run.seed, sharding.MeshConfig(),
                         tuple(jax.devices()))
    if from_step == 0:  # the initial state is a pure function of the config's seed
        return config, programs, train_batch, programs.init(), 0
    source = pathlib.Path(run) / "checkpoints"
    if not source.is_dir():
        raise SystemExit(f"no checkpoints directory in {run}")
    if not any(d.name.isdigit() and 0 < int(d.name) <= from_step for d in source.iterdir()):
        return config, programs, train_batch, programs.init(), 0
    with tempfile.TemporaryDirectory() as scratch:
        for step_dir in source.iterdir():
            if step_dir.name.isdigit() and int(step_dir.name) <= from_step:
                shutil.copytree(step_dir, pathlib.Path(scratch) / step_dir.name)
        checkpointer = Checkpointer(scratch)
        restored = checkpointer.restore_latest(programs.abstract_state, {})
        checkpointer.close()
    if restored is None:
        raise SystemExit(f"no checkpoint at or before step {from_step} in {source}")
    state, meta, _ = restored
    return config, programs, train_batch, state, int(meta["step"])


def checkified_nan(loss, params, tokens, mask) -> str | None:
    """The loss and gradient under jax.experimental.checkify's NaN checks (which see inside
    scans): the first operation that makes a NaN, with its source line, or None; printed. The
    checks change the compiled program, so a NaN that depends on how XLA fused the operations
    can vanish here: that itself says the NaN is at the edge of float32, not structural."""
    from jax.experimental import checkify

    error, _ = jax.jit(checkify.checkify(jax.value_and_grad(loss), errors=checkify.nan_checks))(params, tokens, mask)
    message = error.get()
    print(f"checkify (NaN checks inside scans): {message or 'no NaN in the instrumented program'}", flush=True)
    return message


def first_nonfinite(loss, params, tokens, mask) -> str | None:
    """Run the loss and its gradient once more with jax_debug_nans, which re-runs a failing
    program op by op and raises at the first operation whose output is NaN; print (and return)
    the source lines of that operation (the frames outside installed packages). (Not jax_debug_infs:
    attention masks with -inf on purpose.) A NaN inside a scan is reported at the scan
    (checkified_nan looks inside)."""
    import traceback

    jax.config.update("jax_debug_nans", True)
    try:
        jax.block_until_ready(jax.jit(jax.value_and_grad(loss))(params, tokens, mask))
        print("first non-finite operation: none found (the loss and gradient are finite when run alone)")
        return None
    except FloatingPointError as error:  # the de-optimised re-run's error names the operation
        frames = [f"  {frame.filename.split('/work/main/')[-1]}:{frame.lineno} {frame.name}: {frame.line}"
                  for frame in traceback.extract_tb(error.__traceback__)
                  if "site-packages" not in frame.filename and "grad_spikes" not in frame.filename
                  and not frame.filename.startswith("<")]
        where = "\n".join(frames[-12:])
        print(f"first non-finite operation: {str(error).splitlines()[0]}\n{where}", flush=True)
        return where
    finally:
        jax.config.update("jax_debug_nans", False)


def nonfinite_rows(loss, params, tokens, mask) -> list[tuple[int, float, bool, int]]:
    """(row, loss, gradient finite?, longest run of one repeated token) of each row of a batch,
    run alone; printed."""
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    rows = []
    for row in range(tokens.shape[0]):
        value, grads = value_and_grad(params, tokens[row:row + 1], mask[row:row + 1])
        finite = all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(grads))
        ids = np.asarray(tokens[row])
        breaks = np.flatnonzero(np.diff(ids) != 0)
        run = int(np.diff(np.concatenate([[-1], breaks, [len(ids) - 1]])).max())
        rows.append((row, float(value), finite, run))
        print(f"  row {row}: loss {float(value):.4g}, gradient {'finite' if finite else 'NOT finite'}, "
              f"longest run of one token {run}", flush=True)
    return rows


def precision_by_module(model, model64, params, tokens, top: int = 12) -> list[tuple[str, float]]:
    """Every submodule's output for `tokens` in the model's dtype against the same parameters in
    float64 (capture_intermediates; needs JAX_ENABLE_X64=1): (module path, max |a - a64| / max
    |a64|, inf where not finite); printed: the non-finite ones, then the `top` largest errors. Under
    jit, so that a non-finite output reaches the next module instead of stopping at its eager input
    check (the memory's)."""
    params64 = jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.float64), params)

    def outputs(module, weights):
        apply = jax.jit(lambda weights, ids: module.apply({"params": weights}, ids, capture_intermediates=True,
                                                          mutable=["intermediates"]))
        _, state = apply(weights, tokens[:, :-1])
        return {jax.tree_util.keystr(path): leaf for path, leaf
                in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]}

    low, high = outputs(model, params), outputs(model64, params64)
    errors = []
    for name, value in low.items():
        reference = np.asarray(high[name], np.float64)
        value = np.asarray(value, np.float64)
        scale = max(float(np.abs(reference).max()), 1e-30)
        error = float(np.abs(value - reference).max()) / scale if np.isfinite(value).all() else math.inf
        errors.append((name, error))
    bad = sorted((name for name, error in errors if not math.isfinite(error)), key=lambda name: (name.count("["), name))
    print(f"float32 against float64, {len(errors)} module outputs, {len(bad)} not finite"
          + (f" (outermost first: {', '.join(bad[:6])})" if bad else ""))
    finite = sorted(((name, error) for name, error in errors if math.isfinite(error)), key=lambda item: -item[1])
    for name, error in finite[:top]:
        print(f"  {error:9.3g}  {name}")
    return errors


def blowup_position(model, params, tokens, stretch: int = 64) -> list[tuple[str, int, list[float]]]:
    """Where in a row the forward first leaves the finite range: for every submodule output with a
    token axis ([1, P + T, ...] after P persistent tokens; capture_intermediates, under jit so that
    no input check stops it), the first position whose output is not finite (T when none is),
    earliest first, with the largest |output| of each `stretch`-token stretch before it. A causal
    model's outputs at a position depend only on earlier tokens, so the earliest position is where
    it starts; which module starts it is not decided by position (every module after it in the
    same token is non-finite too): printed are the top-level modules non-finite at that token, in
    the model's order, and the growth of the first one's output (memory_growth names the layer
    whose own recurrence diverges)."""
    @jax.jit
    def outputs(weights, ids):
        _, state = model.apply({"params": weights}, ids, capture_intermediates=True, mutable=["intermediates"])
        return {jax.tree_util.keystr(path): leaf for path, leaf
                in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]}

    found = []
    length = tokens.shape[1] - 1
    for name, value in outputs(params, tokens[:, :-1]).items():
        value = np.asarray(value, np.float64)
        if value.ndim < 3 or value.shape[0] != 1 or value.shape[1] < length:
            continue  # not a per-token output (e.g. a memory state)
        per_token = value[0, value.shape[1] - length:].reshape(length, -1)  # after any persistent tokens
        finite = np.isfinite(per_token).all(axis=1)
        first = int(np.argmin(finite)) if not finite.all() else length
        peaks = [float(np.abs(per_token[lo:min(lo + stretch, first)]).max()) for lo in range(0, first, stretch)]
        found.append((name, first, peaks))
    found.sort(key=lambda item: item[1])
    blown = [item for item in found if item[1] < length]
    print(f"{len(blown)} of {len(found)} module outputs leave the finite range in this row")
    if blown:
        first = blown[0][1]
        order = {name: index for index, name in enumerate(params)}
        top = [item for item in blown if item[1] == first and item[0].count("['") == 2]  # ['<module>']['__call__']
        top.sort(key=lambda item: order.get(item[0][2:].split("'")[0], len(order)))
        print(f"  the earliest at token {first}, in {', '.join(item[0].split(chr(39))[1] for item in top)}; the "
              f"largest |output| of {top[0][0]} per {stretch} tokens before it: " + " ".join(
                  f"{peak:.3g}" for peak in top[0][2]) if top else f"  the earliest at token {first}")
    return found


def memory_growth(model, params, tokens, every: int = 64) -> dict[str, np.ndarray]:
    """Each memory layer's weight norm (experiments.gate_trace.weight_norms: the mean over heads of
    sqrt(sum over its MLP's layers of |W|^2)) after every `every` positions of its input stream
    (the row's tokens after the model's persistent ones), from its sown inputs; printed up to the
    first stretch where it is not finite. Says whether a
    non-finite forward is the memory's own recurrence diverging (its inner gradient descent) and
    in which layer: that layer's norm grows, the others' stay until its output reaches them."""
    import functools
    import operator

    from experiments.gate_trace import _memory_config, memory_layers, weight_norms

    collected = jax.jit(lambda p, ids: model.apply({"params": p}, ids, mutable=["diagnostics"])[1])(params, tokens)
    if "diagnostics" not in collected:
        print("no memory layer in this model")
        return {}
    config = _memory_config(model.config)
    found = {}
    for layer_path, inputs in memory_layers(collected["diagnostics"]):
        node = functools.reduce(operator.getitem, layer_path, params)
        length = inputs[0].shape[2] // every * every  # whole stretches (the persistent tokens come first)
        norms = weight_norms(node["memory"], tuple(None if x is None else x[:, :, :length] for x in inputs),
                             config, every)
        name = "/".join(layer_path)
        found[name] = norms
        bad = np.flatnonzero(~np.isfinite(norms))
        end = bad[0] + 1 if bad.size else len(norms)
        print(f"  {name}: |W| every {every} tokens: " + " ".join(f"{n:.3g}" for n in norms[:end])
              + (f" (not finite from position {bad[0] * every} to {(bad[0] + 1) * every} on)" if bad.size
                 else " (finite throughout)"))
    return found


def device_batch(batch):
    """A host batch (tokens, or (tokens, mask)) as device arrays."""
    return tuple(jnp.asarray(part) for part in batch) if isinstance(batch, tuple) else jnp.asarray(batch)


def by_position(grad, params, batch, step: int) -> list[tuple[int, int, float]]:
    """(start, end, gradient norm) of the mean loss over the batch's targets in [start, end), for
    ranges 0-64, 64-128, then doubling to the row's end; printed."""
    tokens, mask = batch if isinstance(batch, tuple) else (batch, jnp.ones(batch[:, 1:].shape, bool))
    mask = mask.astype(jnp.float32)
    length, edges = mask.shape[1], [0, 64]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        part = mask.at[:, :lo].set(0.0).at[:, hi:].set(0.0)
        if float(part.sum()) == 0:
            continue
        leaves = jax.tree.leaves(grad(params, tokens, part))
        rows.append((lo, hi, float(jnp.sqrt(sum(jnp.sum(leaf.astype(jnp.float32) ** 2) for leaf in leaves)))))
    print(f"step {step + 1}, gradient norm of the loss on target positions: "
          + ", ".join(f"{lo}-{hi}: {norm:.3g}" for lo, hi, norm in rows), flush=True)
    return rows


def main(argv=None) -> list | None:
    """Replays the steps; returns by_position's rows with --by-position (else None)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--config", required=True, help="the named config the run was trained with")
    parser.add_argument("--set", action="append", default=[], help="the run's overrides, as given to experiments.train")
    parser.add_argument("--from-step", type=int, required=True, help="replay from the newest checkpoint at or before this")
    parser.add_argument("--to-step", type=int, required=True)
    parser.add_argument("--threshold", type=float, default=20.0)
    parser.add_argument("--by-position", action="store_true",
                        help="also print, at --from-step, the gradient norm of the loss on each range of target "
                             "positions (0-64, 64-128, 128-256, ...): where in the rows the gradient comes from")
    parser.add_argument("--dump", help="at a non-finite step, save its parameters and batch here (.npz)")
    parser.add_argument("--from-dump", help="instead of replaying, load a --dump file and analyse its rows alone")
    parser.add_argument("--compare-float64", action="store_true",
                        help="with --from-dump (and JAX_ENABLE_X64=1): every module's output on the first non-finite "
                             "row against float64, largest relative errors first")
    args = parser.parse_args(argv)

    config, programs, train_batch, state, start = restore_run(args.run, args.config, args.set,
                                                              0 if args.from_dump else args.from_step)

    def loss(params, tokens, mask):
        total, count = next_token_nll(programs.model, params, tokens, mask)
        return total / count

    if args.from_dump:
        saved = np.load(args.from_dump)
        params = jax.tree_util.tree_map_with_path(  # in the config's dtype (e.g. float64 with JAX_ENABLE_X64=1)
            lambda path, leaf: jnp.asarray(saved[jax.tree_util.keystr(path)], leaf.dtype), state["params"])
        tokens, mask = jnp.asarray(saved["tokens"]), jnp.asarray(saved["mask"])
        print(f"{args.from_dump}: each row alone")
        rows = nonfinite_rows(loss, params, tokens, mask)
        bad = [row for row, value, finite, _ in rows if not (finite and math.isfinite(value))]
        for row in bad[:2]:
            print(f"row {row} alone:")
            first_nonfinite(loss, params, tokens[row:row + 1], mask[row:row + 1])
            checkified_nan(loss, params, tokens[row:row + 1], mask[row:row + 1])
        for row in bad[:1]:
            print(f"row {row}, where the forward leaves the finite range:")
            blowup_position(programs.model, params, tokens[row:row + 1])
            print(f"row {row}, the memory layers' weights along it:")
            memory_growth(programs.model, params, tokens[row:row + 1, :-1])
        if args.compare_float64:
            model_config = config.model_config(vocab_size=256)
            model64 = TitansLM(dataclasses.replace(model_config, dtype="float64", param_dtype="float64"))
            for row in (bad or [0])[:1]:
                print(f"row {row}:")
                precision_by_module(programs.model, model64, params, tokens[row:row + 1])
        return rows
    print(f"replaying from step {start}")

    grad = jax.jit(jax.grad(loss))
    positions = by_position(grad, state["params"], device_batch(train_batch(start)), start) if args.by_position else None
    for step in range(start, args.to_step):
        batch = device_batch(train_batch(step))
        new_state, metrics = programs.step(state, batch)
        norm, value = float(metrics["grad_norm"]), float(metrics["loss"])
        finite = math.isfinite(norm) and math.isfinite(value)
        if not finite or norm > args.threshold:
            tokens, mask = batch if isinstance(batch, tuple) else (batch, jnp.ones(batch[:, 1:].shape, bool))
            leaves = jax.tree_util.tree_flatten_with_path(grad(state["params"], tokens, mask))[0]
            top = sorted(((float(jnp.linalg.norm(leaf)), jax.tree_util.keystr(path)) for path, leaf in leaves),
                         key=lambda item: (not math.isfinite(item[0]), item[0] if math.isfinite(item[0]) else 0.0),
                         reverse=True)[:4]  # non-finite first, then the largest
            print(f"step {step + 1}: loss {value:.3f}, grad norm {norm:.3g}; largest: "
                  + ", ".join(f"{name} {size:.3g}" for size, name in top), flush=True)
        if not finite:  # say where it is non-finite, then stop: every later step is NaN too
            bad = [jax.tree_util.keystr(path) for path, leaf in leaves if not bool(jnp.isfinite(leaf).all())]
            params_ok = all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(state["params"]))
            print(f"step {step + 1} is non-finite: the parameters it starts from are "
                  f"{'finite' if params_ok else 'NOT finite'}; non-finite gradients in {len(bad)} of {len(leaves)} "
                  f"parameters: {bad[:6]}", flush=True)
            if args.dump:
                np.savez(args.dump, tokens=np.asarray(tokens), mask=np.asarray(mask),
                         **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf
                            in jax.tree_util.tree_flatten_with_path(state["params"])[0]})
                print(f"parameters and batch of step {step + 1} saved to {args.dump}")
            if params_ok:
                nonfinite_rows(loss, state["params"], tokens, mask)
                first_nonfinite(loss, state["params"], tokens, mask)
                checkified_nan(loss, state["params"], tokens, mask)
            return positions
        state = new_state
    return positions


if __name__ == "__main__":
    main()
