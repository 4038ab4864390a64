"""The small-scale Titans Table 2 ([C2]): needle recall and BABILong-style QA far beyond the
training length, for every architecture trained alike.

    python -m experiments.long_context_table --out runs/lc_table            # the whole grid
    python -m experiments.long_context_table --quick --out /tmp/lc_quick    # smoke (a minute or two)
    python -m experiments.long_context_table --report-only --out runs/lc_table

Three phases, each skipping what is done, so an interrupted grid continues where it stopped:
1. train: every (variant, seed) is one `experiments.train` run of the `lc_<variant>` config
   (experiments.configs: the books mixed with task examples at <= 4K tokens, the loss on their
   answers; identical for every variant apart from the architecture) in <out>/<variant>/seed<k>;
   finished runs are skipped, interrupted ones resume from their checkpoints.
2. evaluate: each run streams the evaluation examples (titans_jax.long_context.harness; fresh
   seeds below the training seeds, the tasks' own haystacks: noise, essays, the books' test split)
   and writes <run>/long_context/<spec digest>.json; a result file that exists is reused. The long
   phase then evaluates --long-variants (default: the two memory variants with the best mean
   accuracy at the longest main length, and SWA) at --long-lengths on --long-tasks.
3. report: <out>/table.md (accuracy % per variant x task x length, mean ± sd over seeds; a single
   seed shows its binomial 95% interval instead), <out>/results.json (every row), NIAH heatmaps
   per variant, accuracy-vs-length curves, and the commands that made them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import shlex
import sys
import time

import numpy as np

from experiments import train as train_cli
from experiments.configs import CONFIGS, LONG_CONTEXT_TASKS

MAIN_VARIANTS = ("mac", "mag", "mal", "lmm", "ttt", "lmm_linear", "swa", "transformer")
ABLATIONS = ("lmm_no_momentum", "lmm_no_forgetting", "mag_no_persistent")  # lmm_linear is in the main grid
MEMORY_VARIANTS = ("mac", "mag", "mal", "lmm", "ttt", "lmm_linear")
MAIN_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
LONG_LENGTHS = (262144, 1048576, 2097152)
DEPTHS = (0.1, 0.5, 0.9)
# --quick: every phase on the smallest settings that still exercise it (the smoke test runs it).
QUICK = {"variants": ("mac", "swa"), "ablations": (), "seeds": (0,), "tasks": ("niah_single_1", "qa1"),
         "lengths": (1024,), "depths": (0.5,), "per_cell": 1, "long_lengths": (2048,), "long_tasks": ("niah_single_1",),
         "train_overrides": ("preset=tiny", "run.steps=2", "run.seq_len=1024", "run.batch_size=2", "run.save_every=2",
                             "run.log_every=1", "run.eval_batches=1", "run.sample_tokens=4", "optim.warmup_steps=1",
                             "data.tasks=niah_single_1,qa1")}


def run_dir(out: pathlib.Path, variant: str, seed: int) -> pathlib.Path:
    return out / variant / f"seed{seed}"


def init_run(init_from: str, variant: str, seed: int) -> str:
    """The run --init-from names for (variant, seed): the directory itself when it is a run, else its
    <variant>/seed<k> (another grid's --out, or a recall probe's: each seed starts from its own run)."""
    path = pathlib.Path(init_from)
    return str(path if (path / "config.json").exists() else path / variant / f"seed{seed}")


def train_run(out: pathlib.Path, variant: str, seed: int, overrides: list[str],
              init_from: str | None = None) -> pathlib.Path:
    directory = run_dir(out, variant, seed)
    summary = directory / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("completed"):
        print(f"[lc] train {variant} seed {seed}: done, skipping", flush=True)
        return directory
    print(f"[lc] train {variant} seed {seed}", flush=True)
    result = train_cli.main(["--config", f"lc_{variant}", "--out", str(directory), "--no-progress",
                             "--set", f"run.seed={seed}", "--set", f"data.seed={seed}",
                             *sum((["--set", item] for item in overrides), []),
                             *(["--init-from", init_run(init_from, variant, seed)] if init_from else [])])
    if result.get("stopped_by_signal"):
        raise SystemExit(f"stopped while training {variant} seed {seed}; run the same command again to resume")
    return directory


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    per_cell: int
    window: int
    seed: int = 0  # evaluation seeds seed .. seed + per_cell - 1 (far below the training seeds)

    @property
    def digest(self) -> str:
        from titans_jax.long_context.tasks import GENERATOR_VERSION

        text = json.dumps([dataclasses.asdict(self), GENERATOR_VERSION], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def evaluate_run(directory: pathlib.Path, spec: EvalSpec, progress: bool = False) -> list[dict]:
    """The rows of one run on one spec, computed once and kept in <run>/long_context/."""
    path = directory / "long_context" / f"{spec.digest}.json"
    if path.exists():
        return json.loads(path.read_text())["results"]
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.long_context import harness, make_examples
    from titans_jax.long_context.training_mix import check_eval_seeds
    from titans_jax.models import TitansLM
    from titans_jax.training import load_trained

    check_eval_seeds(range(spec.seed, spec.seed + spec.per_cell))
    config, params, meta = load_trained(directory)
    tokenizer = ByteTokenizer()
    runner = harness.StreamingRunner(TitansLM(config), params, spec.window)
    started = time.perf_counter()
    rows = [harness.example_row(example) for example in make_examples(
        spec.tasks, spec.lengths, spec.depths, spec.per_cell, spec.seed, tokenizer)]
    results = harness.evaluate_rows(runner, rows, tokenizer, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"spec": dataclasses.asdict(spec), "run": str(directory), "step": int(meta["step"]),
              "seconds": time.perf_counter() - started, "results": results}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    print(f"[lc] evaluated {directory} on {len(results)} examples in {record['seconds']:.0f} s: "
          f"mean accuracy {np.mean([r['score'] for r in results]):.3f}", flush=True)
    return results


def binomial_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval for a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def cell(scores_by_seed: dict[int, list[float]], binary: bool = True) -> str:
    """'mean ± sd (seeds)' over per-seed accuracies, or 'p [lo, hi]' for one seed; a measure that is
    not a 0/1 score per example (binary=False: characters in place) has no binomial interval, so one
    seed shows 'p (n=examples)'."""
    per_seed = [float(np.mean(scores)) for scores in scores_by_seed.values() if scores]
    if not per_seed:
        return ""
    if len(per_seed) == 1:
        scores = next(iter(scores_by_seed.values()))
        if not binary:
            return f"{100 * per_seed[0]:.0f} (n={len(scores)})"
        lo, hi = binomial_interval(sum(scores), len(scores))
        return f"{100 * per_seed[0]:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"
    return f"{100 * np.mean(per_seed):.0f} ± {100 * np.std(per_seed, ddof=1):.0f}"


def said_answer(output: str) -> str:
    """The answer as the model gave it: the output's first word, its sentence's full stop dropped."""
    words = output.split()
    return words[0].rstrip(".") if words else ""


def answer_in_place(answer: str, output: str) -> list[bool]:
    """For each character of a needle's answer, whether the model's answer (said_answer) has it at
    the same place: how far a partly right answer got (RULER's score, the exact match, counts only
    the whole needle). Case-insensitive, as RULER's match (a UUID's hex digits)."""
    said = said_answer(output).lower()
    return [i < len(said) and said[i] == char for i, char in enumerate(answer.lower())]


def characters_in_place(row: dict) -> float:
    return float(np.mean(answer_in_place(row["answer"], row["output"])))


def collect(rows_by_run: dict[tuple[str, int], list[dict]], measure=lambda row: row["score"]) -> dict:
    """variant -> task -> length -> seed -> scores (or another per-row measure)."""
    table: dict = {}
    for (variant, seed), rows in rows_by_run.items():
        for row in rows:
            table.setdefault(variant, {}).setdefault(row["task"], {}).setdefault(row["length"], {}).setdefault(
                seed, []).append(measure(row))
    return table


def format_table(table: dict, variants, tasks, lengths,
                 what: str = "accuracy %, mean ± sd over seeds; one seed: [binomial 95% interval]",
                 binary: bool = True) -> str:
    """Table 2's layout: one block per task, variants as rows, lengths as columns."""
    lines = []
    for task in tasks:
        lines += [f"\n**{task}** ({what})\n",
                  "| model | " + " | ".join(f"{length:,}" for length in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for variant in variants:
            by_length = table.get(variant, {}).get(task, {})
            cells = (cell(by_length.get(length, {}), binary) for length in lengths)
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_accuracy(table: dict, variant: str, length: int) -> float:
    scores = [s for by_length in table.get(variant, {}).values() for s in
              sum(by_length.get(length, {}).values(), [])]
    return float(np.mean(scores)) if scores else -1.0


def plot_curves(table: dict, variants, tasks, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for variant in variants:
            by_length = table.get(variant, {}).get(task, {})
            lengths = sorted(by_length)
            if lengths:
                ax.plot(lengths, [100 * np.mean(sum(by_length[n].values(), [])) for n in lengths], marker="o",
                        label=variant)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-5, 105)
        ax.set_title(task)
        ax.set_xlabel("context (bytes)")
    axes[0][0].set_ylabel("accuracy %")
    if axes[0][-1].get_lines():
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lc_table")
    parser.add_argument("--quick", action="store_true", help="a minute-scale smoke run of every phase")
    parser.add_argument("--variants", help=f"comma-separated (default {','.join(MAIN_VARIANTS)})")
    parser.add_argument("--ablations", help=f"comma-separated, evaluated at 16K (default {','.join(ABLATIONS)})")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=",".join(LONG_CONTEXT_TASKS))
    parser.add_argument("--lengths", default=",".join(map(str, MAIN_LENGTHS)))
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    parser.add_argument("--per-cell", type=int, default=1)
    parser.add_argument("--window", type=int, default=4096, help="streaming window (tokens per call)")
    parser.add_argument("--long-variants", help="default: the best two memory variants at the longest main length, and swa")
    parser.add_argument("--long-lengths", default=",".join(map(str, LONG_LENGTHS)))
    parser.add_argument("--long-tasks", default="niah_single_1,niah_single_2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training override for every run")
    parser.add_argument("--init-from", metavar="DIR",
                        help="train every run from another run's final parameters: DIR itself when it is a run, "
                             "else DIR/<variant>/seed<k> (e.g. a recall probe's --out; the model --set must match)")
    parser.add_argument("--report-only", action="store_true", help="only report what is finished")
    args = parser.parse_args(argv)
    args.command = "python -m experiments.long_context_table " + shlex.join(sys.argv[1:] if argv is None else argv)

    quick = QUICK if args.quick else {}
    variants = tuple(quick.get("variants", (args.variants or ",".join(MAIN_VARIANTS)).split(",")))
    ablations = tuple(quick.get("ablations", tuple(filter(None, (args.ablations if args.ablations is not None
                                                                 else ",".join(ABLATIONS)).split(",")))))
    for variant in variants + ablations:
        if f"lc_{variant}" not in CONFIGS:
            parser.error(f"unknown variant {variant!r}; choose from {sorted(k[3:] for k in CONFIGS if k.startswith('lc_'))}")
    seeds = tuple(quick.get("seeds", tuple(int(s) for s in args.seeds.split(","))))
    tasks = tuple(quick.get("tasks", tuple(args.tasks.split(","))))
    lengths = tuple(quick.get("lengths", tuple(int(n) for n in args.lengths.split(","))))
    depths = tuple(quick.get("depths", tuple(float(d) for d in args.depths.split(","))))
    per_cell = quick.get("per_cell", args.per_cell)
    long_lengths = tuple(quick.get("long_lengths", tuple(int(n) for n in args.long_lengths.split(",") if n)))
    long_tasks = tuple(quick.get("long_tasks", tuple(args.long_tasks.split(","))))
    overrides = list(quick.get("train_overrides", ())) + args.set
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = EvalSpec(tasks, lengths, depths, per_cell, args.window)
    ablation_spec = EvalSpec(tuple(t for t in ("niah_single_1", "niah_single_2") if t in tasks) or tasks[:1],
                             (16384,) if not args.quick else lengths[-1:], depths, per_cell, args.window)

    rows: dict[tuple[str, int], list[dict]] = {}
    for seed in seeds:
        for variant in variants + ablations:
            directory = run_dir(out, variant, seed)
            variant_spec = spec if variant in variants else ablation_spec
            if args.report_only:  # read what exists, compute nothing
                if (directory / "long_context" / f"{variant_spec.digest}.json").exists():
                    rows[(variant, seed)] = evaluate_run(directory, variant_spec)
                continue
            train_run(out, variant, seed, overrides, args.init_from)
            rows[(variant, seed)] = evaluate_run(directory, variant_spec)
    table = collect({key: value for key, value in rows.items() if key[0] in variants})
    long_variants = tuple(args.long_variants.split(",")) if args.long_variants else tuple(sorted(
        (v for v in variants if v in MEMORY_VARIANTS), key=lambda v: -mean_accuracy(table, v, lengths[-1]))[:2]) + \
        (("swa",) if "swa" in variants else ())
    long_spec = EvalSpec(long_tasks, long_lengths, (0.5,), per_cell, args.window) if long_lengths else None
    long_rows: dict[tuple[str, int], list[dict]] = {}
    if long_spec is not None:
        for variant in long_variants:
            for seed in seeds[:1]:  # one seed: a 2M-token example streams for minutes
                path = run_dir(out, variant, seed) / "long_context" / f"{long_spec.digest}.json"
                if args.report_only and not path.exists():
                    continue
                long_rows[(variant, seed)] = evaluate_run(run_dir(out, variant, seed), long_spec)
    return report(out, args, table, variants, tasks, lengths, rows, ablations, ablation_spec, long_rows, long_spec)


def report(out, args, table, variants, tasks, lengths, rows, ablations, ablation_spec, long_rows, long_spec) -> dict:
    from titans_jax.long_context import NIAH_TASKS, harness

    text = [f"# Small-scale Table 2\n\n`{args.command}`\n", format_table(table, variants, tasks, lengths)]
    niah = tuple(task for task in tasks if task in NIAH_TASKS)
    main_rows = {key: value for key, value in rows.items() if key[0] in variants}
    if niah and main_rows:
        text += ["\n## How much of the needle: its characters in place (a diagnostic, not RULER's score)",
                 format_table(collect(main_rows, characters_in_place), variants, niah, lengths,
                              "% of the needle's characters the answer has at their place, mean over examples "
                              "(± sd over seeds)", binary=False),
                 "\nBy position in the needle (all lengths; % of examples with that character in place):\n"]
        for variant in variants:
            for task in niah:
                marks = [answer_in_place(r["answer"], r["output"]) for (v, _), results in main_rows.items()
                         if v == variant for r in results if r["task"] == task]
                if marks:
                    width = min(map(len, marks))
                    text.append(f"- {variant} {task} (n={len(marks)}): " + " ".join(
                        f"{100 * np.mean([m[i] for m in marks]):.0f}" for i in range(width)))
    if ablations:
        abl = collect({key: value for key, value in rows.items() if key[0] in ablations + ("lmm", "mag", "lmm_linear")})
        text += ["\n## Ablations (paper Table 5) at " + ", ".join(f"{n:,}" for n in ablation_spec.lengths),
                 format_table(abl, ("lmm", "mag", "lmm_linear") + ablations, ablation_spec.tasks, ablation_spec.lengths)]
    if long_rows:
        long_table = collect(long_rows)
        text += ["\n## Long contexts (one seed; time and peak memory per example below)",
                 format_table(long_table, tuple(dict.fromkeys(v for v, _ in long_rows)), long_spec.tasks, long_spec.lengths),
                 "\n| model | task | tokens | stream s | peak RSS MiB | correct |", "|---|---|---|---|---|---|"]
        for (variant, _), results in long_rows.items():
            text += [f"| {variant} | {r['task']} | {r['length']:,} | {r['stream_seconds']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**20:,.0f} | {int(r['score'])} |" for r in results]
    table_md = "\n".join(text) + "\n"
    (out / "table.md").write_text(table_md)
    flat = [dict(row, variant=variant, run_seed=seed, phase=phase)
            for phase, by_run in (("main", rows), ("long", long_rows))
            for (variant, seed), results in by_run.items() for row in results]
    results_json = json.dumps(flat, indent=1)
    (out / "results.json").write_text(results_json)
    for variant in variants:
        mine = [row for (v, _), results in rows.items() if v == variant for row in results]
        for task in sorted({r["task"] for r in mine} & set(NIAH_TASKS)):
            harness.plot_heatmap(mine, task, out / f"heatmap_{variant}_{task}.png")
    if table:
        both = {key: results + long_rows.get(key, []) for key, results in rows.items() if key[0] in variants}
        plot_curves(collect(both), variants, tasks, out / "accuracy_vs_length.png")
    print("\n".join(text), flush=True)
    return {"table": table, "rows": rows, "long_rows": long_rows, "files": {"table.md": table_md,
                                                                        "results.json": results_json}}


if __name__ == "__main__":
    main()
