"""The recall probe's form of Titans' Table 2: recall of a pair seen once, at row lengths far beyond
the training rows, per model, with seeds and spread (from experiments.recall_probe's JSON).

    python -m experiments.recall_table                                  # experiments/results/recall_probe/*.json
    python -m experiments.recall_table runs/recall_probe_lengths --plot /tmp/recall_curves.png

Inputs are recall.json files (or directories searched for *.json) written by
`experiments.recall_probe --eval-lengths ...`. Files of one trained run (the same variant, seed,
settings and parameters: the `params_digest` recall_probe records, or for older files an identical
evaluation at the training length, which is deterministic for given parameters) are merged, so a
run evaluated at 1K-16K and later again at 64K is one row. Runs without --eval-lengths results are
left out. A cell is the recall of the queries whose pair lies at least one training row back
(distance >= the training row length: a distance no training row had), except the training-length
column, which counts every query of the training-length evaluation. Several seeds give
mean +- sd with the per-seed values; one seed gives its Wilson 95% interval.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections import defaultdict

import numpy as np

from experiments.long_context_table import binomial_interval
from experiments.recall_probe import BATCH, SEQ_LEN, row_changes

DEFAULT_INPUT = pathlib.Path(__file__).parent / "results" / "recall_probe"
CHANCE = 1 / 26  # a value is one of 26 uppercase letters


def load_records(paths: list[pathlib.Path]) -> list[dict]:
    """Every recall_probe record under `paths` (files, or directories searched recursively)."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob("*.json"))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    records = []
    for file in files:
        record = json.loads(file.read_text())
        if not isinstance(record, dict) or "accuracy_by_distance" not in record:
            continue  # not a recall_probe record (a training summary or another experiment's JSON)
        records.append({**record, "_file": str(file)})
    return records


def setting_of(record: dict) -> tuple:
    """What makes runs comparable across seeds: the variant and every setting but the seed."""
    return (record["variant"], record.get("gap", 0), tuple(record.get("set", [])), record.get("loss_on", "answers"),
            record["seq_len"], record["pairs"], record["step"], record.get("filler", "digits"),
            record.get("eval_filler", "digits"), record.get("batch", BATCH), _start_of(record))


def _start_of(record: dict) -> tuple | None:
    """Where a run's training started (--init-from: the earlier runs' rows and steps, first stage
    first; seeds continue their own seed's run, so the run itself is not part of the setting)."""
    start, stages = record.get("init_from"), ()
    while start:
        stages = ((start.get("seq_len", SEQ_LEN), start["step"]),) + stages
        start = start.get("init_from")
    return stages or None


NAMES = {"transformer": "Transformer++", "swa": "SWA", "ttt": "TTT", "lmm_linear": "LMM, linear memory",
         "lmm_no_momentum": "LMM w/o momentum", "lmm_no_forgetting": "LMM w/o forgetting",
         "mag_no_persistent": "MAG w/o persistent memory"}


def label_of(setting: tuple) -> str:
    variant, gap, overrides, loss_on, seq_len, pairs, _, filler, eval_filler, batch, start = setting
    chain = None
    for stage_seq_len, stage_steps in start or ():
        chain = {"seq_len": stage_seq_len, "step": stage_steps, **({"init_from": chain} if chain else {})}
    extras = row_changes({"seq_len": seq_len, "batch": batch, "pairs": pairs,
                          **({"init_from": chain} if chain else {})})
    extras += [f"gap {gap}"] if gap else []
    extras += [f"filler {filler}, eval {eval_filler}"] if filler != "digits" else []
    extras += [f"eval filler {eval_filler}"] if filler == "digits" and eval_filler != "digits" else []
    extras += [override.removeprefix("model.") for override in overrides]
    extras += [f"loss on {loss_on}"] if loss_on != "answers" else []
    return NAMES.get(variant, variant.upper()) + (f" ({', '.join(extras)})" if extras else "")


def same_run(a: dict, b: dict) -> bool:
    """Records of one trained run: the same params_digest where both have one, else (files written
    before it) the same training-length evaluation, which is deterministic for given parameters."""
    if "params_digest" in a and "params_digest" in b:
        return a["params_digest"] == b["params_digest"]
    return a["accuracy_by_distance"] == b["accuracy_by_distance"]


def merge_runs(records: list[dict]) -> dict[tuple, dict[int, dict]]:
    """{setting: {seed: merged record}} over the records with accuracy_by_length. Two files of one
    run merge their lengths; two different trainings of one setting and seed are refused (which of
    them would the table show?)."""
    runs: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for record in (r for r in records if r.get("accuracy_by_length")):
        setting, seed = setting_of(record), record["seed"]
        known = runs[setting].get(seed)
        if known is None:
            runs[setting][seed] = {**record, "accuracy_by_length": dict(record.get("accuracy_by_length", {}))}
            continue
        if not same_run(known, record):
            raise ValueError(f"{known['_file']} and {record['_file']}: two different trained runs of "
                             f"{label_of(setting)} seed {seed}; pass the files of one of them")
        for length, cells in record.get("accuracy_by_length", {}).items():
            if length in known["accuracy_by_length"] and known["accuracy_by_length"][length] != cells:
                raise ValueError(f"{known['_file']} and {record['_file']}: the same run evaluated twice at "
                                 f"{length} tokens with different results")
            known["accuracy_by_length"][length] = cells
    return dict(runs)


def beyond(cells: dict, min_distance: int) -> tuple[int, int]:
    """(correct, count) over the distance bins "lo-hi" with lo >= min_distance."""
    picked = [cell for key, cell in cells.items() if int(key.split("-")[0]) >= min_distance]
    return sum(cell["correct"] for cell in picked), sum(cell["count"] for cell in picked)


def run_curve(record: dict) -> dict[int, tuple[int, int]]:
    """{row length: (correct, count)}: every query at the training length, the queries at least
    one training row back at the longer lengths."""
    cells = record["accuracy_by_distance"]
    curve = {record["seq_len"]: (sum(c["correct"] for c in cells.values()), sum(c["count"] for c in cells.values()))}
    for length, cells in record["accuracy_by_length"].items():
        curve[int(length)] = beyond(cells, record["seq_len"])
    return curve


def distance_curve(record: dict) -> dict[int, tuple[int, int]]:
    """{bin start: (correct, count)} over every evaluation of the run (the training length and the
    longer rows), pooled by distance bin (the bins double from the window on, so rows of every
    length share their starts), for the distances no training row had (>= the training length)."""
    pooled: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for cells in [record["accuracy_by_distance"], *record["accuracy_by_length"].values()]:
        for key, cell in cells.items():
            lo = int(key.split("-")[0])
            if lo >= record["seq_len"]:
                pooled[lo][0] += cell["correct"]
                pooled[lo][1] += cell["count"]
    return {lo: (c, n) for lo, (c, n) in sorted(pooled.items()) if n}


def _size(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 else str(tokens)


def distance_table(runs: dict[tuple, dict[int, dict]]) -> str:
    """Per run (setting and seed): recall by how far back the pair is, pooled over its evaluations:
    the row-length table mixes distances (a query's distance is drawn anywhere in its row)."""
    curves = {(setting, seed): distance_curve(record) for setting, seeds in runs.items()
              for seed, record in seeds.items()}
    starts = sorted({lo for curve in curves.values() for lo in curve})
    head = ["model", "seed"] + [f"{_size(lo)}-{_size(2 * lo)}" for lo in starts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (setting, seed), curve in sorted(curves.items(), key=lambda kv: (kv[0][0][0] not in ("lmm", "mag", "mac",
                                                                                           "mal"), kv[0])):
        row = [label_of(setting), str(seed)]
        row += [f"{curve[lo][0]}/{curve[lo][1]} ({curve[lo][0] / curve[lo][1]:.2f})" if lo in curve else "-"
                for lo in starts]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_cell(counts_by_seed: dict[int, tuple[int, int]]) -> str:
    """One seed: 'p [Wilson 95%] (n=...)'; several: 'mean ± sd (per-seed values)'. A cell that not
    every seed of its row has names its seeds."""
    counts = {seed: (c, n) for seed, (c, n) in counts_by_seed.items() if n}
    if not counts:
        return "-"
    only = f", seed {', '.join(map(str, counts))} only" if len(counts) < len(counts_by_seed) else ""
    if len(counts) == 1:
        (c, n), = counts.values()
        lo, hi = binomial_interval(c, n)
        return f"{c / n:.2f} [{lo:.2f}, {hi:.2f}] (n={n}{only})"
    rates = [c / n for c, n in counts.values()]
    return f"{np.mean(rates):.2f} ± {np.std(rates, ddof=1):.2f} ({', '.join(f'{r:.2f}' for r in rates)}{only})"


def table(runs: dict[tuple, dict[int, dict]]) -> str:
    curves = {setting: {seed: run_curve(record) for seed, record in sorted(seeds.items())}
              for setting, seeds in runs.items()}
    lengths = sorted({length for seeds in curves.values() for curve in seeds.values() for length in curve})
    head = ["model", "seeds", "loss (last 100 steps)"] + [f"{length:,}" + (" (training rows)" if i == 0 else "")
                                                          for i, length in enumerate(lengths)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in sorted(curves, key=lambda s: (s[0] not in ("lmm", "mag", "mac", "mal"), s)):
        seeds = curves[setting]
        losses = [runs[setting][seed].get("loss_last_100_steps") for seed in seeds]
        loss = ", ".join("-" if x is None else f"{x:.2f}" for x in losses)
        row = [label_of(setting), ", ".join(map(str, seeds)), loss]
        row += [format_cell({seed: curve.get(length, (0, 0)) for seed, curve in seeds.items()}) for length in lengths]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(runs: dict[tuple, dict[int, dict]], path: pathlib.Path) -> None:
    """Two panels: recall by row length (each seed faint, the mean over seeds bold where every seed
    has the length) and recall by distance per run (Wilson 95% bars, pooled over its lengths); one
    colour per setting in both, dashed where the filler was text, one legend beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_length_axes, by_distance_axes) = plt.subplots(1, 2, figsize=(15, 5))
    palette = plt.get_cmap("tab20")
    for index, (setting, seeds) in enumerate(sorted(runs.items())):
        colour = palette(index % 20)
        style = "--" if setting[7] != "digits" else "-"
        by_length = defaultdict(list)
        for seed, record in sorted(seeds.items()):
            curve = run_curve(record)
            xs = sorted(curve)
            by_length_axes.plot(xs, [curve[x][0] / curve[x][1] for x in xs], color=colour, alpha=0.35, lw=0.8,
                                marker=".", ls=style)
            for x in xs:
                by_length[x].append(curve[x][0] / curve[x][1])
            near = distance_curve(record)
            centres = [lo * 1.5 * (1.03 ** seed) for lo in near]  # the bin's middle, seeds side by side
            rates = [c / n for c, n in near.values()]
            bounds = [binomial_interval(c, n) for c, n in near.values()]
            errors = [[max(r - lo, 0.0) for r, (lo, _) in zip(rates, bounds)],  # 0, not -1e-16, at 0 or n of n
                      [max(hi - r, 0.0) for r, (_, hi) in zip(rates, bounds)]]
            by_distance_axes.errorbar(centres, rates, yerr=errors, color=colour, marker="o", ms=3, lw=1, capsize=2,
                                      alpha=0.8, ls=style)
        xs = sorted(x for x in by_length if len(by_length[x]) == len(seeds))  # the mean only where every seed is
        by_length_axes.plot(xs, [np.mean(by_length[x]) for x in xs], color=colour, lw=2, marker="o", ls=style,
                            label=f"{label_of(setting)} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    for axes in (by_length_axes, by_distance_axes):
        axes.axhline(CHANCE, color="grey", ls=":", lw=1, label="chance (1/26)" if axes is by_length_axes else None)
        axes.set_xscale("log", base=2)
        axes.set_ylim(0, 1.02)
    figure.legend(*by_length_axes.get_legend_handles_labels(), loc="center right", fontsize=7, frameon=False)
    by_length_axes.set_xlabel("row length (tokens); the first point is the training length")
    by_length_axes.set_ylabel("recall of pairs >= 1 training row back")
    by_length_axes.set_title("by row length (mean over seeds)", fontsize=10)
    by_distance_axes.set_xlabel("distance from the pair to its query (tokens), doubling bins")
    by_distance_axes.set_title("by distance, per run (Wilson 95%)", fontsize=10)
    figure.suptitle("Recall probe: a pair seen once, far beyond the training rows")
    figure.tight_layout(rect=(0, 0, 0.7, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", type=pathlib.Path, default=[DEFAULT_INPUT],
                        help="recall.json files or directories (default: the committed results)")
    parser.add_argument("--plot", type=pathlib.Path, help="also write the accuracy-vs-length curves (PNG)")
    args = parser.parse_args(argv)
    runs = merge_runs(load_records(args.inputs))
    if not runs:
        sys.exit(f"no recall_probe results with --eval-lengths under {[str(p) for p in args.inputs]}: run "
                 "`python -m experiments.recall_probe --eval-lengths 1024,4096 --out runs/recall_probe_lengths`")
    text = (table(runs) + "\n\nRecall by distance (tokens from the pair's value to the query's, pooled over every "
            "evaluated row length; counts):\n\n" + distance_table(runs))
    print(text)
    if args.plot:
        plot(runs, args.plot)
        print(f"\ncurves: {args.plot}")
    return text


if __name__ == "__main__":
    main()
