"""Is the needle still in the memory where the answer fails? Give its first digits, read the rest ([C2]).

    python -m experiments.needle_cue --run runs/lc_niah_lmm_init16k_stage2/lmm/seed2 \
        --lengths 1024,4096,16384 --per-cell 96 --cues 0,1 --out runs/needle_cue_seed2.json

At 16K the S-NIAH models here answer most passkeys wrong from the first digit, with one default
digit a seed (`experiments.needle_errors`). The first digit is the one recalled under the
question's context (" ... text is") rather than the needle's ("... is: "), so it may be the
only broken link. This streams each example's prompt followed by the needle's first k digits
(the cue, after the space the model answers with) and reads the greedy continuation: the cue k = 0
is the plain evaluation; the rest of the needle right after a cue of one digit means the later
digits are still retrievable from the memory at that length, and only the entry failed.

Prints, per cue and length, the share of examples whose cued answer is the needle (RULER's match
on the cue and the continuation, Wilson 95%) and the share of the digits after the cue in place;
writes every row to --out (JSON).
Examples and streaming as the table driver's (titans_jax.long_context: RULER's templates and
haystacks, evaluation seeds from --seed, 4,096-token windows).

Runs of several training seeds evaluated alike, in one table with the mean and spread over them:

    python -m experiments.needle_cue --combine runs/needle_cue_seed0.json runs/needle_cue_seed1.json ...

Exact match against context length, one curve per evaluated model (the files' --run), from files
of one model at different lengths (e.g. 1K-16K, 64K, 1M, 2M), as a table and a plot:

    python -m experiments.needle_cue --curves curves.png runs/needle_cue_seed2*.json runs/needle_cue_mag*.json

Exact match by needle depth and context length for one model and task (the NIAH heatmap), from its
files at several depths:

    python -m experiments.needle_cue --heatmap heatmap.png runs/needle_cue_mag_seed1*.json

UUIDs in the essays (`--task niah_single_3`; the models here were trained on 7-digit needles): how
much of each answer is the UUID's digits in place, its letters and dashes dropped, against another
example's UUID (chance), per file and length:

    python -m experiments.needle_cue --uuid-digits runs/needle_cue_*_uuid.json

Where the copy of a UUID breaks (a model trained on UUID needles): per file and length, the answers
shaped like a UUID, the characters in place (against another example's UUID as chance) and by the
UUID's five groups, and the answer's later groups that begin as another of its groups (a copy that
jumps from one group to another):

    python -m experiments.needle_cue --uuid-groups runs/needle_cue_*_uuid.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time

import numpy as np

from experiments.long_context_table import (answer_in_place, binomial_interval, cell, characters_in_place,
                                             said_answer)
from titans_jax.long_context.tasks import NIAH_VALUE_TYPE


def cued_prompt(prompt: str, answer: str, cue: int) -> str:
    """The prompt followed by the answer's first `cue` characters as the model would write them
    (after one space: the models answer " 6976681.")."""
    if not 0 <= cue < len(answer):
        raise ValueError(f"cue must be in [0, {len(answer)}) for the answer {answer!r}, got {cue}")
    return prompt + (" " + answer[:cue] if cue else "")


def continuation_row(task: str, answer: str, cue: int, output: str) -> dict:
    """The continuation after a cue, scored as the whole answer it completes (" " + cue + output):
    RULER's match as in the table driver (so cue 0 is the plain evaluation), and the characters
    of the needle after the cue that are in place."""
    from titans_jax.long_context.harness import score_row

    full = " " + answer[:cue] + output if cue else output
    return {"cue": cue, "output": output, "exact": score_row(task, answer, full),
            "in_place": float(np.mean(answer_in_place(answer, full)[cue:]))}


def cue_rows(runner, examples, cues, tokenizer, progress: bool = False) -> list[dict]:
    """Every example streamed once per cue (harness.evaluate_rows on the cued prompts), rescored
    as the answer the cue and the continuation make."""
    from titans_jax.long_context import harness

    rows = [{**harness.example_row(example), "prompt": cued_prompt(example.prompt, example.answer, cue), "cue": cue}
            for example in examples for cue in cues]
    results = harness.evaluate_rows(runner, rows, tokenizer, progress=progress)
    # the harness's own score compares the continuation alone with the whole needle: dropped
    return [{**{k: v for k, v in result.items() if k != "score"},
             **continuation_row(result["task"], result["answer"], row["cue"], result["output"])}
            for row, result in zip(rows, results)]


def run(run_dir: pathlib.Path, task: str, lengths, depth: float, per_cell: int, seed: int, cues, window: int,
        progress: bool = False, changes: dict | None = None) -> list[dict]:
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.long_context import harness, make_examples
    from titans_jax.long_context.training_mix import check_eval_seeds
    from titans_jax.models import TitansLM
    from titans_jax.training import load_trained

    check_eval_seeds(range(seed, seed + per_cell))
    config, params, meta = load_trained(run_dir, changes)
    tokenizer = ByteTokenizer()
    runner = harness.StreamingRunner(TitansLM(config), params, window)
    examples = make_examples(task, lengths, (depth,), per_cell, seed, tokenizer)
    rows = cue_rows(runner, examples, cues, tokenizer, progress)
    for row in rows:
        row.update(depth=depth, step=int(meta["step"]))
    return rows


def report(rows: list[dict]) -> str:
    lengths = sorted({row["length"] for row in rows})
    lines = ["| cue (digits given) | " + " | ".join(f"{n:,}: exact [95%] / in place" for n in lengths) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    for cue in sorted({row["cue"] for row in rows}):
        cells = []
        for length in lengths:
            group = [row for row in rows if row["cue"] == cue and row["length"] == length]
            right = int(sum(row["exact"] for row in group))
            lo, hi = binomial_interval(right, len(group))
            cells.append(f"{100 * right / len(group):.0f} [{100 * lo:.0f}, {100 * hi:.0f}] / "
                         f"{100 * np.mean([row['in_place'] for row in group]):.0f} (n={len(group)})")
        lines.append(f"| {cue} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SAME_EVALUATION = ("task", "depth", "per_cell", "seed", "window")


def combine(files: dict[str, dict]) -> str:
    """Runs evaluated alike (needle_cue --out files: name -> contents), one row per run and cue, then
    per cue the mean ± sd over the runs of the exact rate and of the digits in place. Files whose
    evaluation differs (task, depth, examples, evaluation seeds, window) are refused: a mean over
    them would mix two measurements."""
    if len(files) < 2:
        raise ValueError(f"--combine needs two or more files, got {len(files)}")
    for name, contents in files.items():
        if not isinstance(contents, dict) or "rows" not in contents or "args" not in contents:
            raise ValueError(f"{name} is not a needle_cue --out file (no 'args' and 'rows')")
    first_name, first = next(iter(files.items()))
    for name, contents in files.items():
        differ = [key for key in SAME_EVALUATION if contents["args"].get(key) != first["args"].get(key)]
        if differ:
            raise ValueError(f"{name} and {first_name} were not evaluated alike: " + ", ".join(
                f"{key} {contents['args'].get(key)!r} vs {first['args'].get(key)!r}" for key in differ))
    lengths = sorted({row["length"] for contents in files.values() for row in contents["rows"]})
    cues = sorted({row["cue"] for contents in files.values() for row in contents["rows"]})
    lines = ["| run | cue | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---" * (len(lengths) + 2) + "|"]

    def scores(contents, cue, length, key):
        return [row[key] for row in contents["rows"] if row["cue"] == cue and row["length"] == length]

    for name, contents in files.items():
        for cue in cues:
            cells = []
            for length in lengths:
                exact, in_place = scores(contents, cue, length, "exact"), scores(contents, cue, length, "in_place")
                cells.append(f"{cell({0: exact})} / {100 * np.mean(in_place):.0f}" if exact else "")
            lines.append(f"| {name} | {cue} | " + " | ".join(cells) + " |")
    for cue in cues:
        cells = []
        for length in lengths:
            exact = {i: scores(c, cue, length, "exact") for i, c in enumerate(files.values())}
            in_place = {i: scores(c, cue, length, "in_place") for i, c in enumerate(files.values())}
            runs = sum(bool(v) for v in exact.values())
            cells.append(f"{cell(exact)} / {cell(in_place, binary=False)} ({runs} runs)" if runs > 1 else "")
        lines.append(f"| mean ± sd over runs | {cue} | " + " | ".join(cells) + " |")
    args = first["args"]
    seeds = f"{args['seed']}..{args['seed'] + args['per_cell'] - 1}"
    unit = "characters" if NIAH_VALUE_TYPE.get(args["task"]) == "uuids" else "digits"
    return (f"{args['task']}, depth {args['depth']}, evaluation seeds {seeds}; exact % [Wilson 95%] / "
            f"% of the {unit} after the cue in place\n\n" + "\n".join(lines) + "\n")


def length_curves(files: dict[str, dict]) -> dict[tuple, dict[int, list[float]]]:
    """(run, task, depth) -> length -> the exact scores of its uncued rows, over every file of that run.
    A length evaluated in two files of one model with overlapping evaluation seeds would count
    examples twice: refused, naming the files."""
    curves: dict[tuple, dict[int, list[float]]] = {}
    seen: dict[tuple, list[tuple[str, set]]] = {}
    for name, contents in files.items():
        if not isinstance(contents, dict) or "rows" not in contents or "args" not in contents:
            raise ValueError(f"{name} is not a needle_cue --out file (no 'args' and 'rows')")
        args = contents["args"]
        model = (args["run"], args["task"], args["depth"])
        seeds = set(range(args["seed"], args["seed"] + args["per_cell"]))
        for length in sorted({row["length"] for row in contents["rows"] if row["cue"] == 0}):
            for other, other_seeds in seen.get((model, length), []):
                if other_seeds & seeds:
                    raise ValueError(f"{name} and {other} both evaluate {args['run']} at {length:,} tokens on "
                                     "the same evaluation seeds: pass one of them")
            seen.setdefault((model, length), []).append((name, seeds))
            curves.setdefault(model, {}).setdefault(length, []).extend(
                row["exact"] for row in contents["rows"] if row["cue"] == 0 and row["length"] == length)
    if not curves:
        raise ValueError("no uncued rows (cue 0) in the files: nothing to plot")
    return curves


def curves_table(curves: dict[tuple, dict[int, list[float]]]) -> str:
    lengths = sorted({length for by_length in curves.values() for length in by_length})
    lines = ["| model | task | depth | " + " | ".join(f"{n:,}" for n in lengths) + " |",
             "|---" * (len(lengths) + 3) + "|"]
    for (run, task, depth), by_length in curves.items():
        cells = [f"{cell({0: by_length[n]})} (n={len(by_length[n])})" if n in by_length else "" for n in lengths]
        lines.append(f"| {run} | {task} | {depth} | " + " | ".join(cells) + " |")
    return "exact % [Wilson 95%] (examples), uncued\n\n" + "\n".join(lines) + "\n"


def plot_length_curves(curves: dict[tuple, dict[int, list[float]]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for (run, task, depth), by_length in curves.items():
        lengths = sorted(by_length)
        rates = [100 * float(np.mean(by_length[n])) for n in lengths]
        bounds = [binomial_interval(sum(by_length[n]), len(by_length[n])) for n in lengths]
        errors = [[rate - 100 * lo for rate, (lo, _) in zip(rates, bounds)],
                  [100 * hi - rate for rate, (_, hi) in zip(rates, bounds)]]
        ax.errorbar(lengths, rates, yerr=errors, marker="o", capsize=3, label=f"{run} ({task}, depth {depth})")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("context (bytes)")
    ax.set_ylabel("exact match % (Wilson 95%)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def depth_table(curves: dict[tuple, dict[int, list[float]]]) -> str:
    """length_curves' output for one model and task as a depth x length table; other models refused."""
    models = sorted({(run, task) for run, task, _ in curves})
    if len(models) != 1:
        raise ValueError("a heatmap shows one model on one task; the files hold " + ", ".join(
            f"{run} ({task})" for run, task in models))
    lengths = sorted({length for by_length in curves.values() for length in by_length})
    lines = ["| depth | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for (_, _, depth), by_length in sorted(curves.items(), key=lambda item: item[0][2]):
        cells = [f"{cell({0: by_length[n]})} (n={len(by_length[n])})" if n in by_length else "" for n in lengths]
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    run, task = models[0]
    return f"{run}, {task}: exact % [Wilson 95%] (examples), uncued\n\n" + "\n".join(lines) + "\n"


def needle_consistency(files: dict[str, dict]) -> str:
    """Whether a model's misses follow the needle or its place: of the needles (answers) evaluated,
    uncued, in every (depth, length) cell of the files, how many are exact in every cell, in none,
    and in some."""
    by_needle: dict[str, dict[tuple, float]] = {}
    for contents in files.values():
        depth = contents["args"]["depth"]
        for row in contents["rows"]:
            if row["cue"] == 0:
                by_needle.setdefault(row["answer"], {})[(depth, row["length"])] = row["exact"]
    cells = {key for scores in by_needle.values() for key in scores}
    everywhere = [scores for scores in by_needle.values() if len(scores) == len(cells)]
    right = sum(all(scores.values()) for scores in everywhere)
    wrong = sum(not any(scores.values()) for scores in everywhere)
    return (f"{len(everywhere)} needles evaluated in all {len(cells)} cells: {right} exact in every cell, "
            f"{wrong} in none, {len(everywhere) - right - wrong} in some\n")


def digits_in_place(output: str, answer: str) -> float:
    """Of the characters of the model's answer (said_answer), the share equal to the character at the
    same place of the needle's digits alone (a UUID with its letters and dashes dropped); 0 for no
    answer. A model that learnt 7-digit needles may copy a UUID's digits and skip its letters."""
    said, digits = said_answer(output).lower(), "".join(char for char in answer if char.isdigit())
    return float(np.mean([i < len(digits) and char == digits[i] for i, char in enumerate(said)])) if said else 0.0


def uuid_digits(files: dict[str, dict]) -> str:
    """Per file and length (uncued rows): the exact rate, the answers that are 7-digit numbers (the
    needles trained on), and digits_in_place against the row's own UUID and, as chance, against the
    next example's UUID of the same length."""
    lines = ["| run | length | exact % | 7-digit answers % | its UUID's digits in place | another UUID's (chance) |",
             "|---|---|---|---|---|---|"]
    for name, contents in files.items():
        for length, group in uuid_rows(name, contents).items():
            if len(group) < 2:
                raise ValueError(f"{name} has {len(group)} uncued row at {length}: chance needs another UUID")
            own = [digits_in_place(row["output"], row["answer"]) for row in group]
            other = [digits_in_place(row["output"], group[(i + 1) % len(group)]["answer"])
                     for i, row in enumerate(group)]
            seven = [len(said) == 7 and said.isdigit() for said in (said_answer(row["output"]) for row in group)]
            lines.append(f"| {contents['args']['run']} | {length:,} | {100 * np.mean([r['exact'] for r in group]):.0f} "
                         f"| {100 * np.mean(seven):.0f} | {np.mean(own):.2f} | {np.mean(other):.2f} |")
    return "\n".join(lines) + "\n"


UUID_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def uuid_rows(name: str, contents) -> dict[int, list[dict]]:
    """A niah_single_3 needle_cue file's uncued rows by length; any other file refused."""
    if not isinstance(contents, dict) or contents.get("args", {}).get("task") != "niah_single_3":
        raise ValueError(f"{name} is not a needle_cue --out file of niah_single_3 (UUIDs)")
    by_length: dict[int, list[dict]] = {}
    for row in contents["rows"]:
        if row["cue"] == 0:
            by_length.setdefault(row["length"], []).append(row)
    return dict(sorted(by_length.items()))


def group_figures(output: str, answer: str) -> tuple[bool, list[float], int, int]:
    """One answer against its UUID: whether it is UUID-shaped (8-4-4-4-12 hex digits, any case),
    the share of each of the UUID's groups' characters in place (answer_in_place), and of the
    answer's groups after the first (split at its dashes) those that begin with the first four
    characters of another of the UUID's groups and not of their own (the copy jumped), and how many
    such later groups of at least four characters it has."""
    said = said_answer(output).lower()
    in_place = answer_in_place(answer, output)
    groups, shares, start = answer.lower().split("-"), [], 0
    for group in groups:
        shares.append(float(np.mean(in_place[start:start + len(group)])))
        start += len(group) + 1
    later = [(i, part) for i, part in enumerate(said.split("-")[1:], 1) if len(part) >= 4]
    jumped = sum(any(part[:4] == other[:4] for j, other in enumerate(groups) if j != i)
                 and not (i < len(groups) and part[:4] == groups[i][:4]) for i, part in later)
    return bool(UUID_SHAPE.fullmatch(said)), shares, jumped, len(later)


def uuid_groups(files: dict[str, dict]) -> str:
    """Per file and length (uncued rows): exact %, UUID-shaped answers %, characters in place % over
    the whole UUID, against the next example's UUID as chance (the dashes, the version's 4 and a
    format learnt are in place whatever was read), and by the UUID's five groups, and the share of
    the answers' later groups that jumped to another group of the UUID (group_figures)."""
    lines = ["| run | length | exact % | UUID-shaped % | in place % | another UUID's (chance) | by group 1 / 2 / 3 / 4 "
             "/ 5, % | later groups from another group % |", "|---|---|---|---|---|---|---|---|"]
    for name, contents in files.items():
        for length, group in uuid_rows(name, contents).items():
            figures = [group_figures(row["output"], row["answer"]) for row in group]
            by_group = np.mean([shares for _, shares, _, _ in figures], axis=0)
            later = sum(n for *_, n in figures)
            jumped = f"{100 * sum(j for _, _, j, _ in figures) / later:.0f} (n={later})" if later else "- (n=0)"
            whole = np.mean([characters_in_place(row) for row in group])
            others = [characters_in_place({**row, "answer": group[(i + 1) % len(group)]["answer"]})
                      for i, row in enumerate(group)]
            chance = f"{100 * np.mean(others):.0f}" if len(group) > 1 else "-"
            lines.append(f"| {contents['args']['run']} | {length:,} | {100 * np.mean([r['exact'] for r in group]):.0f} "
                         f"| {100 * np.mean([shape for shape, *_ in figures]):.0f} | {100 * whole:.0f} | {chance} | "
                         + " / ".join(f"{100 * share:.0f}" for share in by_group) + f" | {jumped} |")
    return "\n".join(lines) + "\n"


def read_files(paths) -> dict[str, dict]:
    """path -> contents; a file given twice would count twice in a mean: refused."""
    files = {}
    for path in paths:
        if str(path) in files:
            raise SystemExit(f"{path} is given twice")
        try:
            files[str(path)] = json.loads(pathlib.Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"cannot read {path}: {error}")
    return files


def main(argv=None) -> str:
    from experiments.configs import add_model_changes_argument, parse_model_changes

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a trained run directory (experiments.train)")
    source.add_argument("--combine", nargs="+", metavar="JSON",
                        help="--out files of runs evaluated alike: one table, with the mean and spread over them")
    source.add_argument("--curves", metavar="PNG", help="plot exact match against length for the JSON files given")
    source.add_argument("--heatmap", metavar="PNG",
                        help="plot exact match by depth and length for the JSON files given (one model, one task)")
    source.add_argument("--uuid-digits", nargs="+", metavar="JSON",
                        help="--out files of niah_single_3: the UUID's digits the answers copy, against chance")
    source.add_argument("--uuid-groups", nargs="+", metavar="JSON",
                        help="--out files of niah_single_3: where the copy of the UUID breaks, group by group")
    parser.add_argument("files", nargs="*", help="with --curves or --heatmap: needle_cue --out files")
    parser.add_argument("--task", default="niah_single_1",
                        choices=("niah_single_1", "niah_single_2", "niah_single_3"),
                        help="passkeys in noise, numbers in the essays, or UUIDs in the essays (RULER's S-NIAH 1-3)")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--per-cell", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="first evaluation seed")
    parser.add_argument("--cues", default="0,1", help="the needle's first characters given, comma-separated")
    parser.add_argument("--window", type=int, default=4096)
    add_model_changes_argument(parser)
    parser.add_argument("--out", help="write the rows (JSON) here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    plot = args.curves or args.heatmap
    if args.files and not plot:
        raise SystemExit(f"unexpected arguments {args.files}: JSON files go with --curves, --heatmap or --combine")
    if plot and not args.files:
        flag = "--curves" if args.curves else "--heatmap"
        raise SystemExit(f"{flag} needs needle_cue --out files after the plot's path")
    if args.combine or args.uuid_digits or args.uuid_groups or plot:
        files = read_files(args.combine or args.uuid_digits or args.uuid_groups or args.files)
        try:
            if args.uuid_digits:
                text = uuid_digits(files)
            elif args.uuid_groups:
                text = uuid_groups(files)
            elif args.combine:
                names = [pathlib.Path(name).name for name in files]  # the paths where two files share a name
                text = combine(dict(zip(names if len(set(names)) == len(names) else list(files), files.values())))
            elif args.curves:
                curves = length_curves(files)
                text = curves_table(curves)
                plot_length_curves(curves, pathlib.Path(args.curves))
            else:
                curves = length_curves(files)
                text = depth_table(curves) + "\n" + needle_consistency(files)
                from titans_jax.long_context import harness

                model, task, _ = next(iter(curves))
                harness.plot_heatmap([{"task": task, "depth": depth, "length": length, "score": score}
                                      for (_, _, depth), by_length in curves.items()
                                      for length, scores in by_length.items() for score in scores],
                                     task, pathlib.Path(args.heatmap), title=f"{model}\n{task}")
        except ValueError as error:
            raise SystemExit(str(error))
        print(text)
        return text
    run_dir = pathlib.Path(args.run)
    if not (run_dir / "config.json").exists():
        raise SystemExit(f"{run_dir} is not a trained run (no config.json): train it with experiments.train")
    changes = parse_model_changes(parser, args.set)
    started = time.perf_counter()
    rows = run(run_dir, args.task, tuple(int(n) for n in args.lengths.split(",")), args.depth, args.per_cell,
               args.seed, tuple(int(c) for c in args.cues.split(",")), args.window, progress=not args.no_progress,
               changes=changes)
    text = f"`{args.run}`, {args.task}, depth {args.depth}, seeds {args.seed}..{args.seed + args.per_cell - 1}"
    text += f", evaluated with {', '.join(args.set)}\n\n" if args.set else "\n\n"
    text += report(rows)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "seconds": time.perf_counter() - started,
                                                      "rows": rows}, indent=1))
    return text


if __name__ == "__main__":
    main()
