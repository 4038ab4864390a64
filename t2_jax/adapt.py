"""Answer a task's test questions with self-adaptation: two passes over trained SVF experts.

    python -m t2_jax.adapt --task arc_challenge --strategy prompt \\
        --expert arc_easy=runs/t2_table1/arc_easy/svf-s0/expert.safetensors \\
        --expert basic_skills_coding=runs/t2_table1/basic_skills_coding/svf-s0/expert.safetensors
    python -m t2_jax.adapt --task arc_challenge --strategy few_shot --shots 10 --generations 5 --population 8 ...
    python -m t2_jax.adapt --task arc_challenge --strategy classifier --classifier runs/t2/cls/expert.safetensors ...

Prints (and with --out writes as JSON) the accuracy on the task's test pool with its Wilson 95%
interval, what the first pass decided (labels or the mix) and the time of each pass. The shots
of the few-shot strategy come from the task's validation pool, never its test pool. Every expert
file must record the base model's fingerprint (SmolLM2-135M-Instruct unless --gguf).
"""

from __future__ import annotations

import argparse
import json
import pathlib


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--strategy", required=True, help="base, expert, prompt, classifier or few_shot")
    parser.add_argument("--expert", action="append", default=[], metavar="NAME=PATH", help="an expert file (repeat)")
    parser.add_argument("--use", help="the expert's name for --strategy expert")
    parser.add_argument("--classifier", help="the classification expert's file (--strategy classifier)")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--generations", type=int, default=50)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--validation-size", type=int, default=64)
    parser.add_argument("--pool-seed", type=int, default=0)
    parser.add_argument("--gguf")
    parser.add_argument("--out", help="write the result here as JSON")
    args = parser.parse_args(argv)

    import t2_jax
    from t2_jax.train import load_base

    if args.strategy not in t2_jax.STRATEGIES:
        raise SystemExit(f"unknown strategy {args.strategy!r}; choose one of {t2_jax.STRATEGIES}")
    paths = {}
    for item in args.expert:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--expert takes NAME=PATH, got {item!r}")
        paths[name] = path
    if not paths:
        raise SystemExit("name at least one expert with --expert NAME=PATH")
    params, model_config, tokenizer, _ = load_base(args.gguf)
    model = t2_jax.SelfAdaptiveModel.from_files(params, model_config, tokenizer, paths,
                                                classifier_path=args.classifier)
    examples = t2_jax.load_task(args.task, seed=args.pool_seed)
    pools = t2_jax.split_pools(examples, args.pool_seed, {"validation": args.validation_size, "test": args.test_size,
                                                          "train": 0})
    options = {}
    if args.strategy == "expert":
        options["expert"] = args.use
    if args.strategy == "few_shot":
        options.update(shots=pools["validation"][:args.shots],
                       cem_config=t2_jax.CEMConfig(population=args.population, generations=args.generations))
    test = pools["test"]
    out = model.adapt_and_generate(test, args.strategy, **options)
    if test[0].kind == "choice":
        hits = [int(a == e.gold) for a, e in zip(out["answers"], test)]
    else:
        from t2_jax._experts import reward_of

        hits = [int(reward_of(e, a) > 0) for a, e in zip(out["answers"], test)]
    low, high = t2_jax.wilson_interval(sum(hits), len(hits))
    decision = {k: v for k, v in out["decision"].items() if k != "history"}
    if "labels" in decision:
        labels = decision.pop("labels")
        decision["label_counts"] = {label: labels.count(label) for label in sorted(set(labels))}
    result = {"task": args.task, "strategy": args.strategy, "experts": paths, "accuracy": sum(hits) / len(hits),
              "ci": [low, high], "count": len(hits), "decision": decision, "first_pass_s": out["first_pass_s"],
              "second_pass_s": out["second_pass_s"], "per_question": hits,
              "cem_history": out["decision"].get("history")}
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_question", "cem_history")}, indent=1))
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
