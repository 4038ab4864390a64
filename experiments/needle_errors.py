"""Where a copied needle goes wrong: the answer's digits against the needle's ([C2]).

    python -m experiments.needle_errors runs/lc_niah_needles_curr/lmm/seed0 [more runs or JSON files]

The S-NIAH models here copy a 7-digit passkey as a chain: each digit is recalled under a key
made of the few tokens before it (the recall probe, `recall_probe_cpu.md`). If the key were, in
effect, the previous digit alone, a needle whose previous digit occurs twice (6976681: "6" is
followed by "9", "6" and "8") would hold two values under one key, and the recall after the
second occurrence would be ambiguous. This reads evaluation rows (a run's `long_context/*.json`
caches, or a results JSON of `experiments.long_context_table`), keeps those whose needle is all
digits, and prints, one block per input and length:

- exact match by the needle's shape -- all digits distinct, a digit repeated apart, a doubled
  digit ("66") -- with Wilson 95% intervals;
- the hazard at each position: of the answers right up to position i, the share right at i,
  split by whether the needle's digit before i occurred earlier in the needle (the ambiguous key);
- the first wrong digit of each answer (its prefix right, so the model's context is the
  needle's): how often it is the digit that followed an earlier occurrence of the previous digit
  (what a collision of such keys predicts), the previous digit again, the next one (a digit
  skipped), or a digit of the needle,
  beside what a wrong digit drawn uniformly from the other nine would give; and what the answers
  wrong from their first digit begin with.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections import Counter, defaultdict

from experiments.long_context_table import binomial_interval, said_answer

SHAPES = ("distinct", "repeated apart", "doubled")
PREDICTORS = {"collision": "a digit that followed an earlier occurrence of the previous digit",
              "previous": "the previous digit again", "next": "the needle's next digit (one skipped)",
              "in_needle": "a digit of the needle"}


def load_rows(path: pathlib.Path) -> list[dict]:
    """Evaluation rows from a run directory (its long_context/*.json), a cache file, a results list
    or an experiments.needle_cue file (its rows with no digit given)."""
    if path.is_dir():
        files = sorted((path / "long_context").glob("*.json"))
        if not files:
            raise SystemExit(f"{path} has no long_context/*.json: evaluate it first (experiments.long_context_table)")
        # the caches of several evaluation specs share examples (task, length, depth, seed): count each once
        unique = {}
        for row in (row for file in files for row in load_rows(file)):
            unique.setdefault(row.get("key", len(unique)), row)
        return list(unique.values())
    if not path.exists():
        raise SystemExit(f"{path}: no such file or run directory")
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "rows" in data:  # experiments.needle_cue: the answers given no digit
        rows = [row for row in data["rows"] if isinstance(row, dict) and not row.get("cue")]
    else:
        rows = data.get("results") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(row, dict) and {"answer", "output"} <= set(row)
                                             for row in rows):
        raise SystemExit(f"{path}: not a list of evaluation rows (each with 'answer' and 'output')")
    return rows


def shape(needle: str) -> str:
    if any(a == b for a, b in zip(needle, needle[1:])):
        return "doubled"
    return "repeated apart" if len(set(needle)) < len(needle) else "distinct"


def ambiguous(needle: str, i: int) -> bool:
    """Whether the digit before position i also occurs earlier in the needle (followed by another digit)."""
    return i > 0 and needle[i - 1] in needle[:i - 1]


def collision_digits(needle: str, i: int) -> set[str]:
    """The digits that followed earlier occurrences of needle[i - 1]: a last-digit key's other values."""
    return {needle[j + 1] for j in range(i - 1) if needle[j] == needle[i - 1]} if i > 0 else set()


def first_error(needle: str, answer: str) -> tuple[int, str] | None:
    """(position, digit given) of the first wrong character; a short answer's missing one is ''."""
    for i, char in enumerate(needle):
        given = answer[i] if i < len(answer) else ""
        if given != char:
            return i, given
    return None


def analyse(rows: list[dict]) -> dict:
    exact = defaultdict(lambda: [0, 0])                       # shape -> [right, n]
    hazard = defaultdict(lambda: [0, 0])                      # (position, ambiguous) -> [right, n]
    errors = {"n": 0, "by_position": defaultdict(int), "first_digit_given": Counter()}
    errors.update({key: 0 for key in PREDICTORS})
    errors.update({f"chance_{key}": 0.0 for key in PREDICTORS})
    for row in rows:
        needle, answer = row["answer"], said_answer(row["output"])
        exact[shape(needle)][0] += answer == needle
        exact[shape(needle)][1] += 1
        wrong = first_error(needle, answer)
        last = wrong[0] if wrong else len(needle)
        for i in range(min(last + 1, len(needle))):
            hazard[(i, ambiguous(needle, i))][0] += i != last
            hazard[(i, ambiguous(needle, i))][1] += 1
        if wrong is None:
            continue
        i, given = wrong
        errors["n"] += 1
        errors["by_position"][i] += 1
        if i == 0:
            errors["first_digit_given"][given] += 1
        predicted = {"collision": collision_digits(needle, i), "previous": {needle[i - 1]} if i else set(),
                     "next": {needle[i + 1]} if i + 1 < len(needle) else set(), "in_needle": set(needle)}
        for name, digits in predicted.items():
            errors[name] += given in digits
            errors[f"chance_{name}"] += len(digits - {needle[i]}) / 9
    return {"exact": dict(exact), "hazard": dict(hazard), "errors": errors}


def percent(right: int, n: int) -> str:
    if n == 0:
        return "-"
    lo, hi = binomial_interval(right, n)
    return f"{100 * right / n:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] (n={n})"


def report(name: str, length: int, result: dict, width: int) -> str:
    lines = [f"## {name}, {length:,} tokens", "", "| needle | exact match % [95%] |", "|---|---|"]
    lines += [f"| {s} | {percent(*result['exact'][s])} |" for s in SHAPES if s in result["exact"]]
    lines += ["", "Right at position i, given right before it, % [95%]: the digit before i seen earlier in the "
              "needle (ambiguous key) or not", "", "| position | not ambiguous | ambiguous |", "|---|---|---|"]
    for i in range(width):
        lines.append(f"| {i + 1} | {percent(*result['hazard'].get((i, False), (0, 0)))} | "
                     f"{percent(*result['hazard'].get((i, True), (0, 0)))} |")
    errors = result["errors"]
    lines += ["", f"First wrong digit of {errors['n']} answers (positions "
              + ", ".join(f"{i + 1}: {n}" for i, n in sorted(errors["by_position"].items())) + "):", "",
              "| the wrong digit is | observed | expected if uniform over the other nine |", "|---|---|---|"]
    for key, what in PREDICTORS.items():
        lines.append(f"| {what} | {errors[key]} | {errors[f'chance_{key}']:.1f} |")
    if errors["first_digit_given"]:
        given = ", ".join(f"{char or 'nothing'!r}: {n}" for char, n in errors["first_digit_given"].most_common(3))
        lines += ["", f"Answers wrong from the first digit begin with {given} (of {errors['by_position'][0]})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="run directories or evaluation JSON files")
    parser.add_argument("--task", default="niah_single_1", help="the task whose rows to read (default: the passkey)")
    args = parser.parse_args(argv)
    text = []
    for name in args.inputs:
        rows = [row for row in load_rows(pathlib.Path(name))
                if row.get("task", args.task) == args.task and row["answer"].isdigit()]
        if not rows:
            raise SystemExit(f"{name}: no {args.task} rows with an all-digit needle")
        by_length = defaultdict(list)
        for row in rows:
            by_length[row.get("length", 0)].append(row)
        width = max(len(row["answer"]) for row in rows)
        for length, group in sorted(by_length.items()):
            text.append(report(name, length, analyse(group), width))
    print("\n".join(text))
    return "\n".join(text)


if __name__ == "__main__":
    main()
