"""The training loss over a run's last steps and its last held-out books figure. ([C2])

    python -m experiments.run_losses runs/lc_niah_lmm_scratch_stage2/lmm/seed1 [more run directories]

Reads each run's metrics.jsonl (experiments.train writes it; a step logged twice, before and
after a resume, counts once with its last value, experiments.recall_probe.recent_loss) and prints
the mean loss over the last --steps steps and the last eval/books/bits_per_byte logged: the
"loss, last 100 steps" and "books, bits per byte" columns of the long-context results.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from experiments.recall_probe import recent_loss


def run_losses(directory: pathlib.Path, steps: int = 100) -> dict:
    """{"loss": mean over the last `steps` steps, "books_bits_per_byte": the last one logged or None}."""
    path = directory / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not a training run's directory (<out>/<variant>/seed<k>)")
    books = [row["eval/books/bits_per_byte"] for row in map(json.loads, path.read_text().splitlines())
             if "eval/books/bits_per_byte" in row]
    loss = recent_loss(directory, steps)
    if loss is None:
        raise ValueError(f"{path} logs no training loss yet")
    return {"loss": loss, "books_bits_per_byte": books[-1] if books else None}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training run directories")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        figures = run_losses(pathlib.Path(run), args.steps)
        books = "-" if figures["books_bits_per_byte"] is None else f"{figures['books_bits_per_byte']:.2f}"
        print(f"{run}: loss over the last {args.steps} steps {figures['loss']:.2f}, books {books} bits per byte")
        rows.append(figures)
    return rows


if __name__ == "__main__":
    main()
