"""Long-context evaluation: stream RULER S-NIAH / BABILong-style examples through a Titans model.

    # accuracy on a fixed evaluation set (tfds, keyed by task/length/depth/seed) of a trained run
    python -m experiments.long_context --run runs/quick --tasks niah_single_1,niah_single_2,qa1 \
        --lengths 1024,4096,16384 --depths 0,0.5,1 --per-cell 2 --out runs/quick/long_context
    # the same grid for an untrained model of a preset (a floor: it should score ~0)
    python -m experiments.long_context --untrained --preset tiny --arch mac --tasks niah_single_1 ...
    # time and peak memory against context length, one process, one example per length
    python -m experiments.long_context --profile --preset tiny --arch mac \
        --lengths 1024,16384,131072,1048576,2097152 --out runs/profile

Every example goes through the model in windows of --window tokens (the cache carries the
state; titans_jax.long_context.harness), then the answer is decoded greedily and scored as RULER
(string match) or BABILong (first sentence contains the target) do. Lengths are in model tokens
(bytes for our byte-level models). Writes results.json, table.md (accuracy per task and length)
and one NIAH heatmap (depth x length) per needle task; --profile writes profile.json and
profile.md. Data: `python -m titans_jax.data.fetch all` (books + RULER's essays).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

from titans_jax.long_context import NIAH_TASKS, TASKS, harness, make_example


def _floats(text: str) -> tuple:
    return tuple(None if part in ("none", "any") else float(part) for part in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def load_model(args):
    """(model, params, tokenizer, description) from --run or --untrained."""
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.models import TitansLM, init_params
    from titans_jax.presets import preset

    if args.run:
        from titans_jax.training import load_trained

        config, params, meta = load_trained(args.run)
        record = json.loads((pathlib.Path(args.run) / "config.json").read_text())
        if record["config"]["data"]["tokenizer"] != "byte":
            raise SystemExit(f"{args.run} uses a {record['config']['data']['tokenizer']} tokenizer; this harness "
                             "evaluates byte-level runs (their lengths are bytes)")
        return TitansLM(config), params, ByteTokenizer(), f"{args.run} (step {meta['step']}, {config.arch})"
    config = preset(args.preset, args.arch, {"vocab_size": 256})
    params = init_params(config, jax.random.PRNGKey(args.model_seed))
    return TitansLM(config), params, ByteTokenizer(), f"untrained {args.preset}/{args.arch} (seed {args.model_seed})"


def run_grid(args, runner, tokenizer, out: pathlib.Path) -> dict:
    from titans_jax.long_context.eval_sets import EvalSetSpec, load_eval_set

    spec = EvalSetSpec(tasks=args.tasks, lengths=args.lengths, depths=args.depths, num_per_cell=args.per_cell,
                       seed=args.seed, name="harness")
    source = load_eval_set(spec, tokenizer)
    rows = [source[i] for i in range(len(source))]
    results = harness.evaluate_rows(runner, rows, tokenizer, progress=not args.no_progress)
    table = harness.format_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table + "\n")
    for task in sorted({r["task"] for r in results} & set(NIAH_TASKS)):
        if any(r["depth"] is not None for r in results if r["task"] == task):
            harness.plot_heatmap(results, task, out / f"heatmap_{task}.png")
    print(table)
    return {"results": results, "table": table}


def run_profile(args, runner, tokenizer, out: pathlib.Path) -> dict:
    """One niah_single_1 example (noise haystack, depth 0.5) per length, shortest first."""
    rows = []
    print(f"compiled the call shapes in {runner.warm_up(args.lengths, 64):.1f} s (not in the times below)", flush=True)
    print("| context tokens | stream s | tokens/s | decode s | peak RSS MiB | RSS before MiB | cache KiB | prompt ids MiB | correct |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length in sorted(args.lengths):
        example = make_example("niah_single_1", length, depth=0.5, seed=args.seed, tokenizer=tokenizer)
        row = harness.example_row(example)
        rss_before = harness.rss_bytes()  # with this example's prompt text built
        result = harness.evaluate_rows(runner, [row], tokenizer, progress=False)[0]
        result["rss_before_bytes"] = rss_before
        rows.append(result)
        print(f"| {length:,} | {result['stream_seconds']:.2f} | {result['tokens_per_second']:,.0f} | "
              f"{result['decode_seconds']:.2f} | {result['peak_rss_bytes'] / 2**20:,.0f} | "
              f"{result['rss_before_bytes'] / 2**20:,.0f} | {result['cache_bytes'] / 2**10:,.1f} | "
              f"{length * 4 / 2**20:.1f} | {int(result['score'])} |", flush=True)
    (out / "profile.json").write_text(json.dumps(rows, indent=1))
    return {"profile": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a training run directory (its newest good checkpoint)")
    source.add_argument("--untrained", action="store_true", help="a freshly initialised model of --preset/--arch")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--arch", default="mac")
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--tasks", type=lambda t: tuple(t.split(",")), default=("niah_single_1",))
    parser.add_argument("--lengths", type=_ints, default=(1024, 4096))
    parser.add_argument("--depths", type=_floats, default=(0.0, 0.5, 1.0),
                        help="needle depths in [0, 1] (niah) / story positions (qa); 'any' draws one")
    parser.add_argument("--per-cell", type=int, default=1, help="examples (seeds) per task x length x depth")
    parser.add_argument("--seed", type=int, default=0, help="first example seed")
    parser.add_argument("--window", type=int, default=4096, help="tokens per streaming call")
    parser.add_argument("--profile", action="store_true", help="time and peak memory per length instead of accuracy")
    parser.add_argument("--out", default="runs/long_context")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if any(length < 1 for length in args.lengths) or args.window < 1 or args.per_cell < 1:
        parser.error("--lengths, --window and --per-cell must be positive")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, params, tokenizer, description = load_model(args)
    runner = harness.StreamingRunner(model, params, window=args.window)
    print(f"{description}; window {args.window}; {jax.devices()[0].platform}", flush=True)
    start = time.perf_counter()
    result = run_profile(args, runner, tokenizer, out) if args.profile else run_grid(args, runner, tokenizer, out)
    print(f"done in {time.perf_counter() - start:.1f} s; wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
