"""The small-scale Table 1 / Table 5: every architecture and ablation, same data, same token
budget, matched parameter count, several seeds; held-out bits per byte with spread.

    python -m experiments.table --seeds 0,1 --out runs/table          # all variants (hours on 2 CPU cores)
    python -m experiments.table --variants lmm,mac --seeds 0 --set run.steps=50 --out runs/t
    python -m experiments.table --report runs/table                    # table + plot from finished runs

Each (variant, seed) is one `experiments.train` run of the `table_<variant>` config (seed =
parameter initialisation and window shuffling) in <out>/<variant>/seed<k>; finished runs are
skipped, interrupted ones resume. The report writes <out>/table.md (mean and half the range
over seeds, per held-out set) and <out>/loss.png (training loss, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

from experiments import train as train_cli
from experiments.configs import TABLE_VARIANTS, get_config

PAPER_NOTES = {  # Table 1 (760M) / Table 5 (ablations) of the paper, for the side-by-side column
    "transformer": "Wiki ppl 25.21 (760M)", "ttt": "24.17 (760M)", "lmm": "20.04 (760M); 27.01 in Table 5",
    "mac": "19.93 (760M)", "mag": "18.61 (760M)", "mal": "19.07 (760M)", "lmm_linear": "28.49 (Table 5)",
    "lmm_no_conv": "28.73 (Table 5)", "lmm_no_momentum": "28.98 (Table 5)", "lmm_no_forgetting": "29.04 (Table 5)",
    "mag_no_persistent": "27.63 (Table 5, on LMM)", "swa": "-",
}


def run_dir(out: pathlib.Path, variant: str, seed: int) -> pathlib.Path:
    return out / variant / f"seed{seed}"


def run_all(variants: list[str], seeds: list[int], out: pathlib.Path, overrides: list[str]) -> None:
    for seed in seeds:
        for variant in variants:
            directory = run_dir(out, variant, seed)
            summary_path = directory / "summary.json"
            if summary_path.exists() and "eval" in json.loads(summary_path.read_text()):
                print(f"[table] {variant} seed {seed}: done, skipping", flush=True)
                continue
            print(f"[table] {variant} seed {seed}", flush=True)
            train_cli.main(["--config", f"table_{variant}", "--out", str(directory), "--no-progress",
                            "--set", f"run.seed={seed}", "--set", f"data.seed={seed}", *sum((["--set", o] for o in overrides), [])])


def report(out: pathlib.Path, variants: list[str]) -> str:
    from titans_jax.training import read_metrics

    rows, curves = [], {}
    sets = None
    for variant in variants:
        summaries = []
        for directory in sorted((out / variant).glob("seed*")):
            path = directory / "summary.json"
            if path.exists() and "eval" in (summary := json.loads(path.read_text())):
                config = json.loads((directory / "config.json").read_text())
                summaries.append((summary, config, read_metrics(directory / "metrics.jsonl")))
        if not summaries:
            continue
        sets = sets or list(summaries[0][0]["eval"])
        cells = []
        for name in sets:
            values = [s["eval"][name]["bits_per_byte"] for s, _, _ in summaries]
            spread = (max(values) - min(values)) / 2
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        _, config, metrics = summaries[0]
        model = config["model_config"]
        run = config["config"]["run"]
        from titans_jax.config_tree import from_dict
        from titans_jax.models import ModelConfig, abstract_params, param_count

        params = param_count(abstract_params(from_dict(ModelConfig, model)))
        tokens = run["steps"] * run["batch_size"] * run["seq_len"]
        rows.append(f"| {variant} | {params / 1e6:.2f}M ({model['num_layers']} x {model['mlp_hidden']}) | "
                    f"{tokens / 1e6:.2f}M | {len(summaries)} | " + " | ".join(cells) + f" | {PAPER_NOTES.get(variant, '-')} |")
        losses: dict[int, list[float]] = {}
        for _, _, rows_ in summaries:
            for r in rows_:
                if "loss" in r:
                    losses.setdefault(r["step"], []).append(r["loss"])
        curves[variant] = {step: statistics.mean(v) for step, v in sorted(losses.items())}
    if sets:
        rows.append(_unigram_row(sets))
    header = ("| variant | params (layers x MLP) | train tokens | seeds | "
              + " | ".join(f"held-out {name} bits/byte" for name in (sets or [])) + " | paper (ppl; lower is better) |")
    text = "\n".join([header, "|" + "---|" * (5 + len(sets or []))] + rows)
    (out / "table.md").write_text(text + "\n")
    _plot(curves, out / "loss.png")
    return text


def _unigram_row(sets: list[str]) -> str:
    """Reference: an order-0 byte model (add-1/2 counts of the books' train split), scored on the
    whole test split of each held-out set."""
    import numpy as np

    from titans_jax.data import ByteTokenizer, load_tokens

    tokenizer = ByteTokenizer()
    counts = np.bincount(np.asarray(load_tokens("books", "train", tokenizer)), minlength=256) + 0.5
    log_p = np.log2(counts / counts.sum())
    cells = []
    for name in sets:
        held_out = np.asarray(load_tokens(name, "test", tokenizer))[1:]
        cells.append(f"{-log_p[held_out].mean():.4f}")
    return "| byte unigram of the books' train split (whole test split) | 256 | 10.7M | - | " + " | ".join(cells) + " | - |"


def _plot(curves: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (variant, curve) in enumerate(curves.items()):
        steps = list(curve)
        window = 10  # moving average over logged steps, for readability
        values = list(curve.values())
        smooth = [statistics.mean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
        ax.plot(steps, smooth, label=variant, linewidth=1, linestyle="-" if index < 10 else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte, mean over seeds, moving average of 10)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(TABLE_VARIANTS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="runs/table")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--report", metavar="OUT", help="only build the table from finished runs in OUT")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        get_config(f"table_{variant}")  # unknown variants fail before any run starts
    if args.report:
        print(report(pathlib.Path(args.report), variants))
        return
    out = pathlib.Path(args.out)
    run_all(variants, [int(s) for s in args.seeds.split(",")], out, args.set)
    print(report(out, variants))


if __name__ == "__main__":
    main()
