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
norms are printed.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp

from experiments.configs import apply_overrides, get_config
from experiments.train import build_data
from titans_jax import sharding
from titans_jax.training import Checkpointer, _programs, next_token_nll


def restore_run(run: str, config_name: str, overrides: list[str], from_step: int):
    """(config, programs, train_batch, state, step) of a run restored from its newest checkpoint at
    or before `from_step` (copied to a scratch directory, restored exactly as a resume would);
    from_step 0 is the run's initial state, made again from its seed."""
    config = apply_overrides(get_config(config_name), overrides)
    tokenizer, train_batch, *_ = build_data(config)
    model_config = config.model_config(vocab_size=tokenizer.vocab_size)
    programs = _programs(model_config, config.optim, config.run.steps, config.run.seed, sharding.MeshConfig(),
                         tuple(jax.devices()))
    if from_step == 0:  # the initial state is a pure function of the config's seed
        return config, programs, train_batch, programs.init(), 0
    source = pathlib.Path(run) / "checkpoints"
    if not source.is_dir():
        raise SystemExit(f"no checkpoints directory in {run}")
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
    args = parser.parse_args(argv)

    config, programs, train_batch, state, start = restore_run(args.run, args.config, args.set, args.from_step)
    print(f"replaying from step {start}")

    def loss(params, tokens, mask):
        total, count = next_token_nll(programs.model, params, tokens, mask)
        return total / count

    grad = jax.jit(jax.grad(loss))
    positions = by_position(grad, state["params"], device_batch(train_batch(start)), start) if args.by_position else None
    for step in range(start, args.to_step):
        batch = device_batch(train_batch(step))
        new_state, metrics = programs.step(state, batch)
        norm = float(metrics["grad_norm"])
        if norm > args.threshold:
            tokens, mask = batch if isinstance(batch, tuple) else (batch, jnp.ones(batch[:, 1:].shape, bool))
            leaves = jax.tree_util.tree_flatten_with_path(grad(state["params"], tokens, mask))[0]
            top = sorted(((float(jnp.linalg.norm(leaf)), jax.tree_util.keystr(path)) for path, leaf in leaves),
                         reverse=True)[:4]
            print(f"step {step + 1}: loss {float(metrics['loss']):.3f}, grad norm {norm:.3g}; largest: "
                  + ", ".join(f"{name} {value:.3g}" for value, name in top), flush=True)
        state = new_state
    return positions


if __name__ == "__main__":
    main()
