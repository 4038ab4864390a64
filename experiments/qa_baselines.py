"""What a reader that does not do the task's reasoning scores on the BABILong-style QA1-QA5 ([C2]).

    python -m experiments.qa_baselines [--examples 2000]

A small model trained on qa1..qa5 rows can score well above zero without following a person or
an object through the story: the answer is one of six places (or a handful of people / objects),
and it is always a word the story mentions. The accuracy of a trained model means something only
beside these readers, computed on the same stories (a story is a function of (task, seed) only,
titans_jax.long_context.tasks.example_story, so the haystack and the length do not change them):

- prior: always the answer most frequent among training stories (seeds from TRAIN_SEED_OFFSET):
  a model that ignores the context;
- mentioned: a word of the answer's kind (place / person / object) that the story mentions and
  the question does not, drawn uniformly (its expected accuracy, 1/k when the answer is among
  the k candidates): a model that finds the story's entities but not which one is asked for;
- last: the last such word in the story: a model that copies the most recent fact.

Evaluation seeds 0 .. --examples - 1, as the harness draws them (its cells use seeds from 0).

    python -m experiments.qa_baselines --results lmm=runs/qa_lmm/results.json swa=runs/qa_swa/results.json

puts models beside the readers on the stories the models were asked (the seeds of each
experiments.long_context results.json): per task, each model's accuracy by length with its
binomial 95% interval and how often its answer is the last mentioned word (copying the most
recent fact scores that reader's accuracy, not more), then the readers on the same stories.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re

from experiments.long_context_table import binomial_interval, said_answer
from titans_jax.long_context import babilong
from titans_jax.long_context.tasks import example_story
from titans_jax.long_context.training_mix import TRAIN_SEED_OFFSET

ROW_KEYS = {"task", "length", "seed", "output", "score"}  # of an experiments.long_context results.json row
KINDS = {"place": babilong.PLACES, "person": babilong.PEOPLE, "object": babilong.OBJECTS}


def answer_kind(answer: str) -> str:
    return next(kind for kind, words in KINDS.items() if answer in words)


def candidates(item: babilong.Story) -> list[str]:
    """The words of the answer's kind in the story, in order of last mention, minus the question's."""
    words = KINDS[answer_kind(item.answer)]
    asked = set(re.findall(r"\w+", item.question))
    last = {}
    for position, word in enumerate(re.findall(r"\w+", " ".join(item.facts))):
        if word in words and word not in asked:
            last[word] = position
    return sorted(last, key=last.get)


def answer_counts(task: str, examples: int = 5000) -> collections.Counter:
    """How often each word is the answer among `examples` training stories of the task."""
    return collections.Counter(example_story(task, TRAIN_SEED_OFFSET + s).answer for s in range(examples))


def prior_answer(task: str, examples: int = 5000) -> str:
    """The answer most frequent among `examples` training stories of the task."""
    return answer_counts(task, examples).most_common(1)[0][0]


def baselines(task: str, seeds, prior_examples: int = 5000) -> dict:
    """Accuracy (fractions) of the three readers on the stories of these evaluation seeds."""
    prior = prior_answer(task, prior_examples)
    stories = [example_story(task, seed) for seed in seeds]
    found = [candidates(item) for item in stories]
    n = len(stories)
    return {
        "prior": sum(item.answer == prior for item in stories) / n,
        "prior_answer": prior,
        "mentioned": sum((item.answer in c) / len(c) for item, c in zip(stories, found) if c) / n,
        "last": sum(bool(c) and c[-1] == item.answer for item, c in zip(stories, found)) / n,
        "answer_mentioned": sum(item.answer in c for item, c in zip(stories, found)) / n,
        "stories": n,
    }


def percent_interval(successes: float, n: int) -> str:
    lo, hi = binomial_interval(successes, n)
    return f"{100 * successes / n:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def says_last(row: dict) -> bool:
    """Whether a model's answer (its first word) is the last mentioned word of the row's story."""
    found = candidates(example_story(row["task"], row["seed"]))
    return bool(found) and said_answer(row["output"]).lower() == found[-1].lower()


def report(results: dict[str, list[dict]]) -> tuple[str, dict]:
    """The models' accuracy and agreement with the last-mentioned reader, and the readers, per task."""
    rows = [row for model_rows in results.values() for row in model_rows]
    tasks = [task for task in babilong.QA_TASKS if any(row["task"] == task for row in rows)]
    lengths = sorted({row["length"] for row in rows})
    lines, summary = [], {}
    for task in tasks:
        seeds = sorted({row["seed"] for row in rows if row["task"] == task})
        readers = baselines(task, seeds)
        lines += [f"**{task}** ({len(seeds)} stories; accuracy % [binomial 95% interval], and how often the "
                  "answer is the last mentioned word)", "",
                  "| model | " + " | ".join(f"{length:,}" for length in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for model, model_rows in results.items():
            cells = []
            for length in lengths:
                picked = [row for row in model_rows if row["task"] == task and row["length"] == length]
                if not picked:
                    cells.append("")
                    continue
                last = sum(says_last(row) for row in picked)
                correct = sum(row["score"] for row in picked)
                summary[(model, task, length)] = {"accuracy": correct / len(picked), "n": len(picked),
                                                  "answers_last": last / len(picked)}
                cells.append(f"{percent_interval(correct, len(picked))}, last {100 * last / len(picked):.0f}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        for name, label in (("last", "reader: last mentioned"), ("mentioned", "reader: a mentioned word"),
                            ("prior", f"reader: prior ({readers['prior_answer']})")):
            lines.append(f"| {label} | " + " | ".join(f"{100 * readers[name]:.0f}" for _ in lengths) + " |")
        lines.append("")
    return "\n".join(lines), summary


def named_paths(parser: argparse.ArgumentParser, option: str, items) -> dict[str, pathlib.Path]:
    """The NAME=PATH items of a command-line option, as {name: path}; a malformed item or a missing
    file is the parser's error, naming it."""
    paths = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"{option} takes NAME=JSON, got {item!r}")
        if not pathlib.Path(path).is_file():
            parser.error(f"{option} {name}: {path} does not exist")
        paths[name] = pathlib.Path(path)
    return paths


def main(argv=None) -> dict:
    """The readers on seeds 0 .. --examples - 1 ({task: figures}), or with --results the report's
    figures ({(model, task, length): {"accuracy", "n", "answers_last"}})."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="evaluation stories per task")
    parser.add_argument("--tasks", default=",".join(babilong.QA_TASKS), help="the readers' tasks (without --results)")
    parser.add_argument("--results", nargs="+", metavar="NAME=JSON",
                        help="experiments.long_context results.json files to put beside the readers")
    args = parser.parse_args(argv)
    if args.results:
        results = {}
        for name, path in named_paths(parser, "--results", args.results).items():
            rows = json.loads(path.read_text())
            if not isinstance(rows, list) or not all(isinstance(row, dict) and ROW_KEYS <= set(row) for row in rows):
                parser.error(f"{path} is not an experiments.long_context results.json (a list of scored rows)")
            results[name] = [row for row in rows if row["task"] in babilong.QA_TASKS]
            if not results[name]:
                parser.error(f"{path} has no qa1-qa5 rows")
        text, summary = report(results)
        print(text)
        return summary
    if args.examples < 1:
        parser.error(f"--examples must be >= 1, got {args.examples}")
    tasks = args.tasks.split(",")
    unknown = [task for task in tasks if task not in babilong.QA_TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {list(babilong.QA_TASKS)}")
    print(f"# readers that skip the reasoning, % of {args.examples} evaluation stories (seeds 0-{args.examples - 1})")
    print("| task | prior (answer) | mentioned, uniform | last mentioned | answer among the mentioned |")
    print("|---|---|---|---|---|")
    rows = {}
    for task in tasks:
        row = rows[task] = baselines(task, range(args.examples))
        print(f"| {task} | {100 * row['prior']:.1f} ({row['prior_answer']}) | {100 * row['mentioned']:.1f} | "
              f"{100 * row['last']:.1f} | {100 * row['answer_mentioned']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
