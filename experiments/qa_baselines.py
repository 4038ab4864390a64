"""What a reader that does not do the task's reasoning scores on the BABILong-style QA1-QA5 ([C2]).

    python -m experiments.qa_baselines [--examples 2000]

A small model trained on qa1..qa5 rows can score well above zero without following a person or
an object through the story: the answer is one of six places (or a handful of people / objects),
and it is always a word the story mentions. The accuracy of a trained model means something only
beside these readers, computed on the same stories (a story is a function of (task, seed) only,
titans_jax.long_context.tasks.example_answer, so the haystack and the length do not change them):

- prior: always the answer most frequent among training stories (seeds from TRAIN_SEED_OFFSET):
  a model that ignores the context;
- mentioned: a word of the answer's kind (place / person / object) that the story mentions and
  the question does not, drawn uniformly (its expected accuracy, 1/k when the answer is among
  the k candidates): a model that finds the story's entities but not which one is asked for;
- last: the last such word in the story: a model that copies the most recent fact.

Evaluation seeds 0 .. --examples - 1, as the harness draws them (its cells use seeds from 0).
"""

from __future__ import annotations

import argparse
import collections
import re

from titans_jax.long_context import babilong
from titans_jax.long_context.tasks import _rng
from titans_jax.long_context.training_mix import TRAIN_SEED_OFFSET

KINDS = {"place": babilong.PLACES, "person": babilong.PEOPLE, "object": babilong.OBJECTS}


def story(task: str, seed: int) -> babilong.Story:
    """The story of every example of (task, seed), as tasks.make_example draws it."""
    return babilong.generate_story(task, _rng(task, seed, "story"))


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


def baselines(task: str, examples: int, prior_examples: int = 5000) -> dict:
    """Accuracy (fractions) of the three readers on evaluation seeds 0 .. examples - 1."""
    counts = collections.Counter(story(task, TRAIN_SEED_OFFSET + s).answer for s in range(prior_examples))
    prior = counts.most_common(1)[0][0]
    stories = [story(task, seed) for seed in range(examples)]
    found = [candidates(item) for item in stories]
    return {
        "prior": sum(item.answer == prior for item in stories) / examples,
        "prior_answer": prior,
        "mentioned": sum((item.answer in c) / len(c) for item, c in zip(stories, found) if c) / examples,
        "last": sum(bool(c) and c[-1] == item.answer for item, c in zip(stories, found)) / examples,
        "answer_mentioned": sum(item.answer in c for item, c in zip(stories, found)) / examples,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="evaluation stories per task")
    parser.add_argument("--tasks", default=",".join(babilong.QA_TASKS))
    args = parser.parse_args(argv)
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
        row = rows[task] = baselines(task, args.examples)
        print(f"| {task} | {100 * row['prior']:.1f} ({row['prior_answer']}) | {100 * row['mentioned']:.1f} | "
              f"{100 * row['last']:.1f} | {100 * row['answer_mentioned']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
