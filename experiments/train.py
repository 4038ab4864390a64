"""Train a Titans (or baseline) language model on real books or code, on CPU or an accelerator.

    python -m experiments.train --config quick --out runs/quick
    python -m experiments.train --config table_mac --set run.steps=600 --set run.seed=1 --out runs/mac-s1
    python -m experiments.train --list

Several processes (one per host, or several on one machine): start the same command once per
process with --coordinator (process 0's host:port), --num-processes and each its own
--process-id; every process trains on the same global batches, only process 0 writes to --out
(which all processes must share). On one CPU machine, e.g. 2 processes x 4 fake devices (the
run's mesh, RunConfig.mesh, spans all 8):

    export XLA_FLAGS=--xla_force_host_platform_device_count=4
    python -m experiments.train --config quick --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0 &
    python -m experiments.train --config quick --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 1

The run fetches nothing: the corpora come from the local cache (`python -m titans_jax.data.fetch
all` fills it). It resumes from the newest good checkpoint in --out, trains to run.steps,
evaluates bits per byte on the held-out (test-split) books and code, prints a sample and writes
metrics.jsonl, TensorBoard events, summary.json and loss.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import CONFIGS, ExperimentConfig, apply_overrides, get_config
from titans_jax import generate
from titans_jax.training import CheckpointSaveError, plot_curves, train


def spread(batches: list, count: int) -> list:
    """`count` batches spread evenly over a held-out split (all of them if it has fewer)."""
    if len(batches) <= count:
        return batches
    return [batches[round(i * (len(batches) - 1) / (count - 1))] for i in range(count)] if count > 1 else batches[:1]


def build_data(config: ExperimentConfig):
    """(tokenizer, train_batch(step), eval_sets, meta, prompt) for an experiment, from the local
    cache (a missing corpus raises an error that names the fetch command)."""
    from titans_jax import data as data_lib
    from titans_jax.data.corpora import cache_root

    data, run = config.data, config.run
    if data.tokenizer == "byte":
        tokenizer = data_lib.ByteTokenizer()
    else:
        path = cache_root() / "tokenizers" / f"bpe-{data.corpus}-{data.bpe_vocab_size}.json"
        if path.exists():
            tokenizer = data_lib.load_bpe(path)
        else:
            texts = [text for _, text in data_lib.load_documents(data.corpus, "train")]
            tokenizer = data_lib.train_bpe(texts, data.bpe_vocab_size, path)
    dataset = data_lib.WindowDataset(data_lib.load_tokens(data.corpus, "train", tokenizer), run.seq_len,
                                     run.batch_size, data.seed)
    eval_sets = {}
    for corpus in data.eval_corpora:
        held_out = spread(list(data_lib.eval_batches(data_lib.load_tokens(corpus, "test", tokenizer), run.seq_len,
                                                     run.batch_size)), run.eval_batches)
        eval_sets[corpus] = (lambda held_out=held_out: iter(held_out))
    validation = data_lib.load_documents(data.corpus, "validation")
    prompt = validation[0][1][:400] if validation else ""
    meta = {"tokenizer": tokenizer.fingerprint, "data_seed": data.seed, "corpus": data.corpus,
            "train_tokens": dataset.fingerprint}
    train_batch = dataset.batch
    if data.task_fraction > 0:  # task examples trained on their answers, mixed into the windows
        from titans_jax.long_context.training_mix import TaskMixture

        train_batch = TaskMixture(dataset.batch, run.batch_size, run.seq_len, data.tasks, data.task_fraction,
                                  data.seed, tokenizer, data.task_answer_weight,
                                  data.task_prompt_length, data.task_full_steps, data.task_qa_span)
        meta["task_mixture"] = train_batch.fingerprint
    return tokenizer, train_batch, eval_sets, meta, prompt


def make_sampler(tokenizer, prompt: str, num_tokens: int, seed: int):
    def sample(model, params) -> str:
        ids = jnp.asarray(tokenizer.encode(prompt), jnp.int32)[None, -128:]
        new, _ = generate(model, params, ids, num_tokens, rng=jax.random.PRNGKey(seed), temperature=0.8, top_k=40)
        return tokenizer.decode(np.asarray(new[0]))

    return sample


def init_distributed(coordinator: str, num_processes: int, process_id: int, timeout_s: int = 300) -> None:
    """Join a run of `num_processes` processes (jax.distributed.initialize); call it before anything
    touches the devices. When not every process has joined within timeout_s, this process prints
    one line naming the coordinator and exits with status 1 (XLA would abort the process with a
    stack trace a little later)."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")

    def give_up():
        print(f"error: process {process_id}: not all {num_processes} processes joined the coordinator at "
              f"{coordinator} within {timeout_s} s; start every process with the same --coordinator and "
              "--num-processes and its own --process-id", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:  # XLA's own deadline comes later: the message above, not an abort, is what a user sees
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s + 30)
    finally:
        timer.cancel()


def initial_parameters(run_dir: str, model_config) -> tuple[dict, dict]:
    """The parameters of a run's newest good checkpoint to start another run from (--init-from),
    with what identifies them (the run, its step, the parameters' digest, and what that run itself
    started from). The run's model must be `model_config`: a clear error names the fields that differ."""
    from titans_jax.training import load_trained, model_identity, params_digest

    try:
        their_config, params, their_meta = load_trained(run_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"--init-from {run_dir}: {error}") from None
    mine, theirs = model_identity(model_config), model_identity(their_config)
    if mine != theirs:
        differ = sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))
        raise SystemExit(f"--init-from {run_dir}: its model differs from this run's in {differ}; give the same "
                         f"config and model --set as the run it starts from")
    earlier = their_meta.get("init_from") or their_meta.get("recall_probe", {}).get("init_from")
    start = {"run": str(run_dir), "step": int(their_meta["step"]), "params_digest": params_digest(params),
             **({"init_from": earlier} if earlier else {})}
    return params, start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quick", help="a named experiment config (see --list)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field: arch=mag, model.num_layers=2, optim.learning_rate=1e-3, run.steps=50, ...")
    parser.add_argument("--out", help="run directory (checkpoints, metrics); resumes if it holds a run")
    parser.add_argument("--list", action="store_true", help="list the named configs and exit")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--allow-changes", action="store_true",
                        help="resume a run whose checkpoint has other optimiser settings, total steps or batch "
                             "size; each change is recorded with its step in config.json and summary.json")
    parser.add_argument("--init-from", metavar="RUN",
                        help="start from the final parameters of another run (the same model: variant and model "
                             "settings), with a fresh optimiser at step 0; recorded in config.json and in the "
                             "checkpoints' identity, so a resume must name the same run")
    group = parser.add_argument_group("several processes (jax.distributed; all three or none)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, where the processes meet")
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes the run has")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    group.add_argument("--init-timeout", type=int, default=300, metavar="SECONDS",
                       help="how long to wait for every process to join before exiting with an error (default 300)")
    args = parser.parse_args(argv)
    distributed = [args.coordinator, args.num_processes, args.process_id]
    if any(value is not None for value in distributed):
        if any(value is None for value in distributed):
            parser.error("--coordinator, --num-processes and --process-id go together")
        init_distributed(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    if args.list:
        for name in sorted(CONFIGS):
            config = CONFIGS[name]
            print(f"{name:24s} preset={config.preset} arch={config.arch} model={dict(config.model)} "
                  f"steps={config.run.steps} batch={config.run.batch_size}x{config.run.seq_len}")
        return {}
    config = apply_overrides(get_config(args.config), args.set)
    if args.no_progress:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, progress=False))
    out = pathlib.Path(args.out or f"runs/{args.config}")
    tokenizer, train_batch, eval_sets, meta, prompt = build_data(config)
    model_config = config.model_config(vocab_size=tokenizer.vocab_size)
    record = {"experiment": args.config, "overrides": args.set, "config": dataclasses.asdict(config),
              "model_config": dataclasses.asdict(model_config)}  # config.json, written once resume is checked
    initial = None
    if args.init_from:
        initial, start = initial_parameters(args.init_from, model_config)
        meta = {**meta, "init_from": start}
        record["init_from"] = start
    from titans_jax.models import abstract_params, param_count

    primary = jax.process_index() == 0  # several processes: one of them reports and plots
    say = print if primary else (lambda *a, **k: None)
    say(f"{args.config}: {model_config.arch}, {param_count(abstract_params(model_config)) / 1e6:.2f}M parameters, "
        f"{model_config.num_layers} layers x d {model_config.d_model}; {config.run.steps} steps of "
        f"{config.run.batch_size} x {config.run.seq_len} tokens; out {out}", flush=True)
    try:
        summary = train(model_config, config.optim, config.run, out, train_batch, eval_sets, meta=meta,
                        sample_fn=make_sampler(tokenizer, prompt, config.run.sample_tokens, config.run.seed),
                        byte_lengths=np.asarray(tokenizer.token_byte_lengths()), run_record=record,
                        allow_changes=args.allow_changes, initial_params=initial)
    except CheckpointSaveError as error:  # one clear line, not orbax's asyncio traceback
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if primary:
        plot_curves({config.arch: out / "metrics.jsonl"}, out / "loss.png")
    for change in summary.get("changes", []):
        say(f"setting changed at step {change['step']}: {change['field']} {change['from']!r} -> {change['to']!r}")
    if summary.get("stopped_by_signal"):
        say(f"stopped by signal {summary['stopped_by_signal']} at step {summary['step']}; "
            f"run the same command again to {'evaluate' if summary['step'] == config.run.steps else 'resume'}",
            flush=True)
        return summary
    if summary.get("already_finished"):
        say(f"{out} already holds the finished run (step {summary['step']}); its recorded results:")
    for name, result in summary.get("eval", {}).items():
        say(f"held-out {name} (test split, {result['bytes']} bytes): {result['bits_per_byte']:.4f} bits per byte")
    if "sample" in summary:
        say("sample:", json.dumps(prompt[-80:]), "->", json.dumps(summary["sample"]))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
