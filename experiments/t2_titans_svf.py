"""SVF experts on a Titans model, adapted per window: the Transformer² machinery on titans_jax.

    python -m experiments.train --config quick --out runs/quick              # the README's small MAC (books)
    python -m experiments.t2_titans_svf --run runs/quick --out runs/t2_titans_svf --seeds 0,1,2

Two SVF experts of the trained MAC (its MLP kernels, released form) are trained by next-token
prediction: "books" on the books' train split, "code" on the code corpus's train split (CPython's
standard library; the MAC never saw code). On the held-out test windows of each corpus the report
gives bits per byte after a 64-byte prefix for the base, each expert, the two-pass choice (the
candidate with the lowest loss on the prefix predicts the rest: t2_jax.titans.per_window_choice)
and the per-window oracle, with how often each candidate was chosen; the mean and spread over
expert seeds. Results: <out>/result.json, <out>/table.md (with --results also copied there).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/quick", help="a titans_jax training run (experiments.train)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rule", default="mlp")
    parser.add_argument("--prefix", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--results")
    args = parser.parse_args(argv)

    import t2_jax
    from t2_jax import titans as T
    from titans_jax import data as data_lib
    from titans_jax.models import TitansLM
    from titans_jax.training import load_trained
    from experiments.train import spread

    out = pathlib.Path(args.out)
    model_config, params, meta = load_trained(args.run)
    record = json.loads((pathlib.Path(args.run) / "config.json").read_text())
    seq_len, batch_size = record["config"]["run"]["seq_len"], record["config"]["run"]["batch_size"]
    tokenizer = data_lib.ByteTokenizer()
    if meta.get("tokenizer") not in (None, tokenizer.fingerprint):
        raise SystemExit("this experiment expects a byte-tokenizer run (experiments.train --config quick)")
    byte_lengths = np.asarray(tokenizer.token_byte_lengths())
    model = TitansLM(model_config)
    svd = t2_jax.compute_svd(params, T.RULES[args.rule])
    test_sets = {corpus: spread(list(data_lib.eval_batches(data_lib.load_tokens(corpus, "test", tokenizer), seq_len,
                                                           batch_size)), args.eval_batches)
                 for corpus in ("books", "code")}
    runs = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        experts = {}
        for corpus in ("books", "code"):
            dataset = data_lib.WindowDataset(data_lib.load_tokens(corpus, "train", tokenizer), seq_len, batch_size,
                                             seed=1000 + seed)
            config = T.TitansExpertConfig(name=corpus, rule=args.rule, steps=args.steps,
                                          learning_rate=args.learning_rate, seed=seed)
            run_dir = out / f"{corpus}-s{seed}"
            T.train_titans_expert(config, model_config, params, svd, dataset.batch, run_dir)
            experts[corpus] = t2_jax.load_expert(run_dir / "expert.safetensors", params=params)[0]
        candidates = {"base": params, **{name: t2_jax.compose(params, svd, e, "released") for name, e in experts.items()}}
        result = {corpus: T.per_window_choice(model, candidates, batches, args.prefix, byte_lengths)
                  for corpus, batches in test_sets.items()}
        runs.append({"seed": seed, "result": result})
        print(f"seed {seed}: " + "; ".join(f"{c}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["bits"].items())
                                          for c, r in result.items()), flush=True)
    summary = {"run": args.run, "rule": args.rule, "steps": args.steps, "learning_rate": args.learning_rate,
               "prefix": args.prefix, "eval_windows": {c: len(b) * batch_size for c, b in test_sets.items()},
               "runs": runs}
    names = list(runs[0]["result"]["books"]["bits"])
    lines = ["| test corpus | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for corpus in ("books", "code"):
        cells = []
        for name in names:
            values = [r["result"][corpus]["bits"][name] for r in runs]
            cells.append(f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""))
        lines.append(f"| {corpus} | " + " | ".join(cells) + " |")
    chosen = {corpus: {k: sum(r["result"][corpus]["chosen"][k] for r in runs) for k in runs[0]["result"][corpus]["chosen"]}
              for corpus in ("books", "code")}
    lines += ["", "windows chosen (all seeds): " + "; ".join(f"{c}: {v}" for c, v in chosen.items())]
    markdown = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(markdown)
    if args.results:
        pathlib.Path(args.results).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.results) / "t2_titans_svf.json").write_text(json.dumps(summary, indent=1))
        (pathlib.Path(args.results) / "t2_titans_svf.md").write_text(markdown)
    print(markdown)
    return summary


if __name__ == "__main__":
    main()
