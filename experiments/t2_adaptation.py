"""A small-scale Transformer² Table 2 / Table 3 on this CPU: self-adaptation on held-out task
families with the experts of experiments/t2_table1.py, SmolLM2-135M-Instruct.

    python -m experiments.t2_adaptation --table1 runs/t2_table1 --out runs/t2_adaptation
    python -m experiments.t2_adaptation --table1 runs/t2_table1 --out runs/t2_adaptation --report-only \\
        --results experiments/results
    python -m experiments.t2_adaptation --quick --out /tmp/t2a        # tiny model, synthetic tasks

For each expert seed s: the experts are the Table 1 SVF experts of seed s (one per family); the
classification expert is trained with the same REINFORCE loop on t2_jax.classifier_examples of
the families' train and validation pools (never their test pools); the LoRA reference (the
paper's LoRA row) is one adapter trained by next-token prediction on those pools together and
applied to every held-out task as it is. Each held-out task's test
pool (pool seed 0) is answered with every strategy; few-shot CEM draws its shots from the task's
validation pool. Results per (task, strategy, seed) in <out>/<task>/<strategy>-s<seed>.json (a
finished one is skipped); the report gives accuracy over seeds with a 95% t-interval, the paired
difference from the base on the same questions, and Table 3: the first pass's time relative to
the second's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

DEFAULT_FAMILIES = ("arc_easy", "basic_skills_arithmetic", "basic_skills_coding")
DEFAULT_TASKS = ("arc_challenge",)
DEFAULT_STRATEGIES = ("base", "prompt", "classifier", "few_shot", "lora")


def _classifier(out: pathlib.Path, seed: int, pools_by_family, params, model_config, tokenizer, overrides, progress):
    import t2_jax

    examples = (t2_jax.classifier_examples(pools_by_family, "train")
                + t2_jax.classifier_examples(pools_by_family, "validation"))
    n = len(examples)
    config = t2_jax.ExpertConfig(**{"task": "classifier", "seed": seed, "train_size": n - 2 * (n // 8),
                                    "validation_size": n // 8, "test_size": n // 8, "steps": 16, "batch_size": 8,
                                    "validate_every": 8, **overrides})
    run_dir = out / "classifier" / f"svf-s{seed}"
    summary = t2_jax.train_expert(config, params, model_config, tokenizer, run_dir, examples=examples,
                                  base_name="classifier", progress=progress)
    return t2_jax.load_expert(run_dir / "expert.safetensors", params=params)[0], summary


def _lora_reference(out: pathlib.Path, seed: int, pools_by_family, params, model_config, tokenizer, overrides,
                    progress):
    """The paper's LoRA row: one LoRA adapter trained by next-token prediction on all the
    families' train and validation pools together (one pass), applied to every held-out task
    as it is (no first pass)."""
    import t2_jax

    examples = [e for pools in pools_by_family.values() for name in ("train", "validation") for e in pools[name]]
    n = len(examples)
    train = n - 2 * (n // 8)
    steps = max(1, train // 8)
    config = t2_jax.ExpertConfig(**{"task": "+".join(pools_by_family), "method": "lora", "seed": seed,
                                    "train_size": train, "validation_size": n // 8, "test_size": n // 8,
                                    "steps": steps, "batch_size": 8, "validate_every": max(1, steps // 4),
                                    **overrides})
    run_dir = out / "lora" / f"lora-s{seed}"
    summary = t2_jax.train_expert(config, params, model_config, tokenizer, run_dir, examples=examples,
                                  base_name="lora_reference", progress=progress)
    return t2_jax.apply_lora(params, run_dir / "expert.safetensors"), run_dir, summary


def run(out: pathlib.Path, families, tasks, strategies, seeds, base, load_examples, expert_paths, cem, sizes,
        classifier_overrides, progress: bool, family_sizes: dict | None = None) -> None:
    """family_sizes: the pools the experts were trained with (Table 1's), from whose train and
    validation pools the classifier learns; sizes: the held-out tasks' pools."""
    import t2_jax

    params, model_config, tokenizer, _ = base
    family_pools = {f: t2_jax.pools_for(t2_jax.ExpertConfig(task=f, **(family_sizes or sizes)), load_examples(f))
                    for f in families}
    for seed in seeds:
        paths = {f: expert_paths(f, seed) for f in families}
        classifier = None
        if "classifier" in strategies:
            classifier, summary = _classifier(out, seed, family_pools, params, model_config, tokenizer,
                                              classifier_overrides, progress)
            print(f"classifier seed {seed}: test accuracy {summary['eval']['test']['accuracy']:.3f}", flush=True)
        model = t2_jax.SelfAdaptiveModel.from_files(params, model_config, tokenizer, paths, svd_cache=None) \
            if all(isinstance(p, (str, pathlib.Path)) for p in paths.values()) else None
        if model is None:  # --quick: experts given as pytrees
            model = t2_jax.SelfAdaptiveModel(params, model_config, tokenizer, paths, svd=t2_jax.compute_svd(params))
        model.classifier = classifier
        lora = None
        if "lora" in strategies:
            lora_params, lora_dir, summary = _lora_reference(out, seed, family_pools, params, model_config, tokenizer,
                                                             classifier_overrides, progress)
            lora = (lora_params, lora_dir)
            print(f"lora reference seed {seed}: families' held-out accuracy {summary['eval']['test']['accuracy']:.3f}",
                  flush=True)
        for task in tasks:
            pools = t2_jax.pools_for(t2_jax.ExpertConfig(task=task, **sizes), load_examples(task))
            test = pools["test"]
            for strategy in strategies:
                path = out / task / f"{strategy}-s{seed}.json"
                if strategy == "base" and seed != seeds[0]:
                    continue  # the base does not depend on the expert seed
                if path.exists():
                    continue
                options = {}
                if strategy == "few_shot":
                    options = {"shots": pools["validation"][:cem["shots"]],
                               "cem_config": t2_jax.CEMConfig(population=cem["population"],
                                                              generations=cem["generations"], seed=seed)}
                clock = time.perf_counter()
                if strategy == "lora":  # one adapter for every task: no first pass
                    scored = t2_jax.Evaluator(model_config, tokenizer, test, 16)(lora[0])
                    answers = [e.gold if hit else -1 for hit, e in zip(scored["per_question"], test)]
                    result = {"answers": answers, "decision": {"adapter": str(lora[1] / "expert.safetensors")},
                              "first_pass_s": 0.0, "second_pass_s": scored["seconds"]}
                else:
                    result = model.adapt_and_generate(test, strategy, **options)
                hits = [int(a == e.gold) for a, e in zip(result["answers"], test)]
                decision = {k: v for k, v in result["decision"].items() if k != "labels"}
                if "labels" in result["decision"]:
                    labels = result["decision"]["labels"]
                    decision["label_counts"] = {x: labels.count(x) for x in sorted(set(labels))}
                record = {"task": task, "strategy": strategy, "seed": seed, "accuracy": float(np.mean(hits)),
                          "count": len(hits), "per_question": hits, "decision": decision,
                          "first_pass_s": result["first_pass_s"], "second_pass_s": result["second_pass_s"],
                          "experts": {f: str(p) for f, p in paths.items()} if strategy != "base" else {},
                          "cem": cem if strategy == "few_shot" else None}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record, default=float))
                print(f"{task} {strategy} seed {seed}: {record['accuracy']:.3f} "
                      f"(first pass {record['first_pass_s']:.0f} s, second {record['second_pass_s']:.0f} s, "
                      f"{time.perf_counter() - clock:.0f} s)", flush=True)


def describe_decisions(decisions: list[dict]) -> str:
    """One short cell per strategy: questions routed per label, or the CEM alphas found per seed."""
    if decisions and all("label_counts" in d for d in decisions):
        counts: dict = {}
        for d in decisions:
            for label, n in d["label_counts"].items():
                counts[label] = counts.get(label, 0) + n
        return ", ".join(f"{label} {n}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if decisions and all("alpha" in d for d in decisions):
        return "alpha " + "; ".join("[" + ", ".join(f"{a:.2f}" for a in d["alpha"]) + "]" for d in decisions)
    return "—"


def plot_cem(table: dict, path: pathlib.Path) -> bool:
    """The few-shot search curves: best-so-far, elite and population mean fitness per generation,
    one line per seed, one panel per task. False when no run used CEM."""
    curves = {task: [d["history"] for d in entry["few_shot"]["decisions"] if d.get("history")]
              for task, entry in table.items() if "few_shot" in entry}
    curves = {task: runs for task, runs in curves.items() if runs}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (task, runs) in zip(axes[0], curves.items()):
        for seed, history in enumerate(runs):
            generations = [h["generation"] for h in history]
            for key, style in (("best", "-"), ("elite_mean", "--"), ("population_mean", ":")):
                ax.plot(generations, [h[key] for h in history], style, color=f"C{seed}", marker=".",
                        label=f"{key.replace('_', ' ')}" if seed == 0 else None)
        ax.set_title(f"{task}: few-shot CEM ({len(runs)} seeds)")
        ax.set_xlabel("generation")
        ax.set_ylabel("accuracy on the shots")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(out: pathlib.Path, results: pathlib.Path | None = None) -> dict:
    from experiments.t2_table1 import mean_interval, paired_difference
    import t2_jax

    table: dict = {}
    for task_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in ("classifier", "lora")):
        records = [json.loads(p.read_text()) for p in sorted(task_dir.glob("*.json"))]
        base = [r for r in records if r["strategy"] == "base"]
        if not base:
            continue
        entry = {}
        for strategy in DEFAULT_STRATEGIES + ("expert",):
            runs = [r for r in records if r["strategy"] == strategy]
            if not runs:
                continue
            accuracy, half = mean_interval([r["accuracy"] for r in runs])
            diff, diff_half = paired_difference([r["per_question"] for r in runs], base[0]["per_question"])
            correct = sum(sum(r["per_question"]) for r in runs)
            total = sum(r["count"] for r in runs)
            entry[strategy] = {"seeds": [r["seed"] for r in runs], "accuracy": accuracy, "seed_half_width": half,
                               "wilson_pooled": t2_jax.wilson_interval(correct, total),
                               "difference_from_base": diff, "difference_half_width": diff_half,
                               "first_pass_s": float(np.mean([r["first_pass_s"] for r in runs])),
                               "second_pass_s": float(np.mean([r["second_pass_s"] for r in runs])),
                               "decisions": [r["decision"] for r in runs]}
        table[task_dir.name] = entry
    lines = ["| task | strategy | seeds | accuracy | - base (paired, 95%) | first pass / second pass | decided |",
             "|---|---|---|---|---|---|---|"]
    for task, entry in table.items():
        for strategy, e in entry.items():
            if len(e["seeds"]) > 1:
                accuracy = f"{e['accuracy']:.3f} ± {e['seed_half_width']:.3f}"
            else:  # one run: the Wilson interval over its questions
                accuracy = f"{e['accuracy']:.3f} [{e['wilson_pooled'][0]:.3f}, {e['wilson_pooled'][1]:.3f}]"
            difference = ("—" if strategy == "base" else
                          f"{e['difference_from_base']:+.3f} ± {e['difference_half_width']:.3f}")
            lines.append(f"| {task} | {strategy} | {len(e['seeds'])} | {accuracy} | {difference} | "
                         f"{e['first_pass_s'] / e['second_pass_s']:.0%} ({e['first_pass_s']:.0f} s / "
                         f"{e['second_pass_s']:.0f} s) | {describe_decisions(e['decisions'])} |")
    markdown = "\n".join(lines) + "\n"
    (out / "table2.json").write_text(json.dumps(table, indent=1, default=float))
    (out / "table2.md").write_text(markdown)
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        (results / "t2_adaptation.json").write_text(json.dumps(table, indent=1, default=float))
        (results / "t2_adaptation.md").write_text(markdown)
        plot_cem(table, results / "t2_adaptation_cem.png")
    plot_cem(table, out / "cem.png")
    print(markdown)
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--table1", help="the Table 1 run folder whose SVF experts are used")
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES))
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--generations", type=int, default=50)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    split = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    if not args.report_only:
        cem = {"shots": args.shots, "population": args.population, "generations": args.generations}
        if args.quick:
            import jax

            import t2_jax
            from t2_jax import testing

            params = testing.tiny_params()
            svd = t2_jax.compute_svd(params)
            tasks = {f"fam{i}": testing.synthetic_task("choice", n=40, seed=i) for i in range(3)}
            experts = {f"fam{i}": t2_jax.init_expert(svd, "released", jax.random.key(i), noise_std=1.0)
                       for i in range(2)}
            run(out, ["fam0", "fam1"], ["fam2"], split(args.strategies), [0], (params, testing.TINY,
                testing.ByteTokenizer(), "tiny"), tasks.__getitem__, lambda f, s: experts[f],
                {"shots": 4, "population": 4, "generations": 2},
                {"train_size": 16, "validation_size": 8, "test_size": 8, "batch_size": 4},
                {"steps": 2, "validate_every": 2, "eval_batch": 8}, progress=False)
        else:
            import t2_jax
            from t2_jax.train import load_base

            table1 = pathlib.Path(args.table1 or "runs/t2_table1")

            def expert_path(family, seed):
                path = table1 / family / f"svf-s{seed}" / "expert.safetensors"
                if not path.exists():
                    raise SystemExit(f"{path} not found: run experiments.t2_table1 for {family} seed {seed} first")
                return path

            run(out, split(args.families), split(args.tasks), split(args.strategies), [int(s) for s in split(args.seeds)],
                load_base(None), t2_jax.load_task, expert_path, cem,
                {"train_size": 256, "validation_size": 64, "test_size": args.test_size}, {},
                progress=not args.no_progress,
                family_sizes={"train_size": 256, "validation_size": 64, "test_size": 400})  # Table 1's pools
    return report(out, pathlib.Path(args.results) if args.results else None)


if __name__ == "__main__":
    main()
