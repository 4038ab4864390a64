"""The training loss over a run's last steps and its last held-out books figure. ([C2])

    python -m experiments.run_losses runs/lc_niah_lmm_scratch_stage2/lmm/seed1 [more run directories]

Reads each run's metrics.jsonl (experiments.train writes it; a step logged twice, before and
after a resume, counts once with its last value, experiments.recall_probe.recent_loss) and prints
the mean loss over the last --steps steps and the last eval/books/bits_per_byte logged: the
"loss, last 100 steps" and "books, bits per byte" columns of the long-context results.

    python -m experiments.run_losses --windows 50 runs/a runs/b

prints instead a markdown table of each run's mean loss over consecutive windows of 50 steps
(1-50, 51-100, ...; a last, shorter window is marked by its range) and its books figure: runs of
one data seed see the same rows at each step, so their windows compare like with like.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from experiments.recall_probe import recent_loss


def run_losses(directory: pathlib.Path, steps: int = 100) -> dict:
    """{"loss": mean over the last `steps` steps, "books_bits_per_byte": the last one logged or None}."""
    _losses_by_step(directory)  # a clear error for a missing log or one with no loss yet
    rows = map(json.loads, (directory / "metrics.jsonl").read_text().splitlines())
    books = [row["eval/books/bits_per_byte"] for row in rows if "eval/books/bits_per_byte" in row]
    return {"loss": recent_loss(directory, steps), "books_bits_per_byte": books[-1] if books else None}


def _losses_by_step(directory: pathlib.Path) -> dict[int, float]:
    path = directory / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not a training run's directory (<out>/<variant>/seed<k>)")
    by_step = {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row}
    if not by_step:
        raise ValueError(f"{path} logs no training loss yet")
    return by_step


def loss_windows(directory: pathlib.Path, width: int) -> list[tuple[int, int, float]]:
    """(first step, last step, mean loss) over steps 1-width, width+1-2*width, ... (a step logged
    twice, before and after a resume, counts once with its last value); windows with no logged
    step are left out."""
    if width < 1:
        raise ValueError(f"--windows must be >= 1, got {width}")
    by_step = _losses_by_step(directory)
    windows = {}
    for step, loss in sorted(by_step.items()):
        windows.setdefault((step - 1) // width, []).append((step, loss))
    return [(k * width + 1, max(step for step, _ in rows), float(np.mean([loss for _, loss in rows])))
            for k, rows in sorted(windows.items())]


def windows_table(runs: list[str], width: int) -> str:
    """Markdown: one row per run, its mean loss per window of `width` steps and its books figure."""
    figures = {run: loss_windows(pathlib.Path(run), width) for run in runs}
    spans = sorted({(first, last) for rows in figures.values() for first, last, _ in rows})
    labels = [f"{first}-{last}" for first, last in spans]
    lines = ["| run | " + " | ".join(f"loss {label}" for label in labels) + " | books, bits per byte |",
             "|---|" + "---|" * (len(labels) + 1)]
    for run, rows in figures.items():
        by_span = {(first, last): loss for first, last, loss in rows}
        books = run_losses(pathlib.Path(run))["books_bits_per_byte"]
        cells = [f"{by_span[span]:.3f}" if span in by_span else "-" for span in spans]
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {'-' if books is None else f'{books:.3f}'} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training run directories")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--windows", type=int, metavar="N", help="mean loss per window of N steps, as a table")
    args = parser.parse_args(argv)
    if args.windows is not None:
        print(windows_table(args.runs, args.windows))
        return [{"run": run, "windows": loss_windows(pathlib.Path(run), args.windows)} for run in args.runs]
    rows = []
    for run in args.runs:
        figures = run_losses(pathlib.Path(run), args.steps)
        books = "-" if figures["books_bits_per_byte"] is None else f"{figures['books_bits_per_byte']:.2f}"
        print(f"{run}: loss over the last {args.steps} steps {figures['loss']:.2f}, books {books} bits per byte")
        rows.append(figures)
    return rows


if __name__ == "__main__":
    main()
