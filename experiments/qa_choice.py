"""How much of a BABILong-style answer a model reads from the story: its probability over the
words the answer could be ([C2]).

    python -m experiments.qa_choice --run runs/lc_niah_lmm_qa1_scratch_stage2/lmm/seed0 --tasks qa1 \\
        --lengths 1024,4096 --per-cell 60 --out runs/qa_choice_lmm_qa1.json
    python -m experiments.qa_choice --report lmm=runs/qa_choice_lmm_qa1.json swa=runs/qa_choice_swa_qa1.json

A greedy answer says which word a model writes, not whether the story moved it: a model that
writes the most frequent training answer to every story scores the prior reader's accuracy
(experiments.qa_baselines) whether or not it has begun to read. Here each evaluation prompt (those
of experiments.long_context with --depths none: the same evaluation set, facts anywhere; with
--depth d those of --depths d, the story contiguous at depth d, 1 right before the question;
--set model.KEY=VALUE runs the trained parameters under a change of the model, as needle_cue's) is
streamed once and every word of the answer's kind (qa1-qa4: the six places; qa5: the people or
the objects, as its question asks) is scored as the model is trained to write it, " {word}.\\n",
teacher-forced from the prompt's cache (harness.StreamingRunner.continuation_logprobs).
Renormalised over those words it is the model's choice. Per task and length, over the stories:

- choice: how often the gold word is the most probable one (% with a binomial 95% interval);
  greedy: how often greedy decoding restricted to the words picks it (letter by letter, so words
  that share a first letter, bathroom and bedroom, pool their probability at the first);
- bits: the mean -log2 p(gold) of the choice, beside the prior's: the training answers'
  frequencies over the same words (qa_baselines.answer_counts, add-one smoothed). A model that
  reads nothing of the story does no better than the prior; and prior - model, the bits it
  saves, paired by story, with a normal 95% interval;
- story: the mean probability on the words the story mentions (qa_baselines.candidates: those
  of the answer's kind, less the question's), beside the blind's: the model's mean choice over
  the cell's other stories on the same words (what a model that ignores the story but keeps its
  preferences gives them; the training prior's figure is no control, since a model whose fixed
  choice favours often mentioned words scores above it). Above it, the model looks at the story
  (the difference paired, as the bits'); last: on the last mentioned one (the last reader's pick),
  and the choice's accuracy on the stories whose answer is not the last mentioned word (where
  copying the last place scores 0 and following the asked person is needed);
- kind: the mean unnormalised probability of writing one of the words at all (the answer's form;
  the LMM's answers at 16K were not words).

Each row also keeps how far from the prompt's end its story ends and its answer was last named
(fact_distances, in tokens). `--report ... --reach N` splits every cell at N: the stories whose
answer a sliding window of reach N (layers x (window - 1) tokens) can see, and the others. Files
scored before the distances were kept get them from the evaluation set their args name.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np

from experiments.configs import add_model_changes_argument, parse_model_changes
from experiments.long_context_table import binomial_interval
from experiments.qa_baselines import KINDS, answer_counts, answer_kind, candidates, named_paths
from titans_jax.long_context import babilong
from titans_jax.long_context.tasks import example_story
from titans_jax.long_context.training_mix import answer_text

ROW_KEYS = ("task", "length", "seed", "answer", "words", "logprobs")


def choice_words(task: str, seed: int) -> tuple[str, ...]:
    """The words the answer of this story could be: every word of its answer's kind."""
    return KINDS[answer_kind(example_story(task, seed).answer)]


def kind_prior(counts, words) -> np.ndarray:
    """The training answers' frequencies over `words`, add-one smoothed (no word has probability 0)."""
    hits = np.array([counts.get(word, 0) for word in words], float) + 1.0
    return hits / hits.sum()


def score_rows(runner, rows, tokenizer, progress: bool = False) -> list[dict]:
    """Each evaluation row (an experiments.long_context row: task, length, seed, prompt, answer)
    with the model's log p(" {word}.\\n" | prompt) (natural log) of every word of its kind."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), unit="story", dynamic_ncols=True)
    out = []
    for row in rows:
        task, seed = _text(row["task"]), int(row["seed"])
        if task not in babilong.QA_TASKS:
            raise ValueError(f"qa_choice scores the qa tasks {babilong.QA_TASKS}; got a {task} row")
        words = choice_words(task, seed)
        ids = np.asarray(tokenizer.encode(_text(row["prompt"])), np.int32)
        logprobs = runner.continuation_logprobs(ids, [tokenizer.encode(answer_text(word)) for word in words])
        out.append({"task": task, "length": int(row["length"]), "seed": seed, "answer": _text(row["answer"]),
                    "words": list(words), "logprobs": logprobs,
                    **(fact_distances(row) if "needle_chars" in row else {})})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def fact_distances(row) -> dict:
    """Tokens from the end of the story's last sentence (`story_distance`) and of its last sentence
    that names the answer (`answer_distance`) to the prompt's end, where the model starts writing
    the answer: past a sliding window's reach (layers x (window - 1) tokens) attention cannot see
    them. `row`: an evaluation row (prompt, answer, needle_chars / needle_tokens: the story's
    sentences, in order)."""
    prompt, answer = _text(row["prompt"]), _text(row["answer"])
    chars, tokens = np.asarray(row["needle_chars"]), np.asarray(row["needle_tokens"])
    total = int(row["length"])  # the prompt's tokens
    naming = [i for i, (start, end) in enumerate(chars) if answer in prompt[start:end]]
    if len(chars) == 0 or not naming:
        raise ValueError(f"row {_text(row['task'])}/{row['seed']}: no story sentence names the answer {answer!r}")
    return {"story_distance": int(total - tokens[-1][1]), "answer_distance": int(total - tokens[naming[-1]][1])}


def with_distances(rows: list[dict], args: dict) -> list[dict]:
    """`rows` of a file scored before the distances were kept, given them from its evaluation set
    (rebuilt from the file's args: the same tasks, lengths, stories and depth)."""
    if all("answer_distance" in row for row in rows):
        return rows
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.long_context.eval_sets import EvalSetSpec, load_eval_set

    spec = EvalSetSpec(tasks=tuple(args["tasks"].split(",")), lengths=tuple(int(n) for n in args["lengths"].split(",")),
                       depths=(args.get("depth"),), num_per_cell=args["per_cell"], seed=args["seed"], name="harness")
    source = load_eval_set(spec, ByteTokenizer())
    found = {(_text(ex["task"]), int(ex["length"]), int(ex["seed"])): ex for ex in map(source.__getitem__,
                                                                                        range(len(source)))}
    out = []
    for row in rows:
        ex = found.get((row["task"], row["length"], row["seed"]))
        if ex is None or _text(ex["answer"]) != row["answer"]:
            raise ValueError(f"row {row['task']}/{row['length']}/{row['seed']} is not in the evaluation set of {args}")
        out.append({**row, **fact_distances(ex)})
    return out


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def choice(row: dict) -> np.ndarray:
    """The model's probabilities over row["words"] (its log-probs renormalised)."""
    logprobs = np.asarray(row["logprobs"], float)
    if len(logprobs) != len(row["words"]):
        raise ValueError(f"row {row.get('task')}/{row.get('seed')}: {len(row['words'])} words, "
                         f"{len(logprobs)} log-probs")
    p = np.exp(logprobs - logprobs.max())
    return p / p.sum()


def greedy_pick(words, p) -> int:
    """The word that greedy decoding among `words` writes: at each character the one whose words
    hold the most probability, so words sharing a first letter (bathroom, bedroom) pool theirs."""
    alive, depth = list(range(len(words))), 0
    while len(alive) > 1:
        mass: dict[str, float] = {}
        for i in alive:
            letter = words[i][depth] if depth < len(words[i]) else ""
            mass[letter] = mass.get(letter, 0.0) + float(p[i])
        best = max(mass, key=mass.get)
        alive = [i for i in alive if (words[i][depth] if depth < len(words[i]) else "") == best]
        depth += 1
    return alive[0]


def measures(row: dict, prior: np.ndarray, blind: np.ndarray) -> dict:
    """One scored row's figures (see the module's docstring); `prior` and `blind` (the model's mean
    choice over its cell) are distributions over row["words"]."""
    p, words = choice(row), row["words"]
    if not len(words) == len(prior) == len(blind):
        raise ValueError(f"row {row.get('task')}/{row.get('seed')}: {len(words)} words, {len(prior)} prior and "
                         f"{len(blind)} blind probabilities")
    gold = words.index(row["answer"])
    story = [words.index(word) for word in candidates(example_story(row["task"], row["seed"]))]
    bits, prior_bits = -math.log2(p[gold]), -math.log2(prior[gold])
    return {"right": float(np.argmax(p) == gold), "greedy_right": float(greedy_pick(words, p) == gold),
            "bits": bits, "prior_bits": prior_bits, "gain": prior_bits - bits,
            "story": float(p[story].sum()), "blind_story": float(blind[story].sum()),
            "story_gain": float(p[story].sum() - blind[story].sum()), "last": float(p[story[-1]]) if story else 0.0,
            "gold_last": float(bool(story) and story[-1] == gold),
            "kind": float(np.exp(np.asarray(row["logprobs"], float)).sum())}


def cell_measures(rows: list[dict], prior_examples: int = 5000) -> tuple[dict, dict]:
    """((task, length) -> [(row, its measures)], (task, length) -> the cell's story depth). `blind`
    is the model's mean choice over the other stories of the cell (of the same words): what the
    model gives the story's words on average, read or not, so that story - blind_story is what
    reading the story adds."""
    depths: dict[tuple[str, int], set] = {}
    for row in rows:
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"a qa_choice row lacks {missing}: {sorted(row)}")
        depths.setdefault((row["task"], row["length"]), set()).add(row.get("depth"))
    mixed = {key: sorted(map(str, found)) for key, found in depths.items() if len(found) > 1}
    if mixed:  # stories placed differently are different cells: pooling them would hide the placement's effect
        raise ValueError(f"rows of one task and length at different story depths {mixed}; score each depth apart")
    counts = {task: answer_counts(task, prior_examples) for task in {row["task"] for row in rows}}
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["task"], row["length"], tuple(row["words"])), []).append(row)
    groups: dict[tuple[str, int], list[dict]] = {}
    for (task, length, words), cell in cells.items():
        choices = np.array([choice(row) for row in cell])
        total, n = choices.sum(axis=0), len(cell)
        prior = kind_prior(counts[task], words)
        for row, own in zip(cell, choices):  # blind: the mean over the cell's other stories
            blind = (total - own) / (n - 1) if n > 1 else own
            groups.setdefault((task, length), []).append((row, measures(row, prior, blind)))
    return groups, {key: next(iter(found)) for key, found in depths.items()}


def mean_measures(group: list[dict]) -> dict:
    """The mean of each measure over a group of stories' measures, with n, the choice's binomial
    interval and the half-widths of the two gains' 95% intervals (`gain_95`, `story_gain_95`;
    normal, 1.96 sd / sqrt(n): paired by story)."""
    n, right = len(group), sum(item["right"] for item in group)
    hard = [item["right"] for item in group if not item["gold_last"]]
    mean = {name: float(np.mean([item[name] for item in group])) for name in group[0]}
    half = {f"{name}_95": 1.96 * float(np.std([item[name] for item in group], ddof=1)) / math.sqrt(n)
            if n > 1 else math.inf for name in ("gain", "story_gain")}
    return {**mean, **half, "n": n, "interval": binomial_interval(right, n), "not_last_n": len(hard),
            "not_last_right": float(np.mean(hard)) if hard else math.nan}


def summarise(rows: list[dict], prior_examples: int = 5000) -> dict[tuple[str, int], dict]:
    """(task, length) -> mean_measures over its stories (cell_measures) and the cell's depth."""
    groups, depths = cell_measures(rows, prior_examples)
    return {key: {**mean_measures([item for _, item in groups[key]]), "depth": depths[key]} for key in sorted(groups)}


def reach_report(results: dict[str, list[dict]], reach: int, prior_examples: int = 5000) -> str:
    """Each cell split by whether the story's last sentence naming the answer ends within `reach`
    tokens of the prompt's end (fact_distances): the choice and the story mass above blind (blind
    over the whole cell, as in the main table) of the stories whose answer a sliding window of that
    reach can see, and of the others."""
    lines = [f"Stories split by where the last sentence naming the answer ends: within {reach:,} tokens of the "
             "prompt's end, or farther", "",
             "| model | task | length | within: stories | choice % [95%] | story: model - blind [95%] | "
             "farther: stories | choice % [95%] | story: model - blind [95%] |", "|---" * 9 + "|"]
    for name, rows in results.items():
        groups, depths = cell_measures(rows, prior_examples)
        for (task, length), group in sorted(groups.items()):
            at = "" if depths[(task, length)] is None else f" (story at {depths[(task, length)]:g})"
            cells = []
            for part in ([m for row, m in group if row["answer_distance"] <= reach],
                         [m for row, m in group if row["answer_distance"] > reach]):
                if not part:
                    cells.append("0 | - | -")
                    continue
                s = mean_measures(part)
                lo, hi = s["interval"]
                spread = "" if s["n"] < 2 else f" ± {s['story_gain_95']:.2f}"
                cells.append(f"{s['n']} | {100 * s['right']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] | "
                             f"{s['story_gain']:+.2f}{spread}")
            lines.append(f"| {name} | {task} | {length:,}{at} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def report(results: dict[str, list[dict]], prior_examples: int = 5000) -> str:
    """One table per task: a line per model and length."""
    by_model = {name: summarise(rows, prior_examples) for name, rows in results.items()}
    tasks = [task for task in babilong.QA_TASKS if any(key[0] == task for s in by_model.values() for key in s)]
    lines = []
    for task in tasks:
        lines += [f"**{task}**: the choice among the answer's words (mean over the stories; the prior: the training "
                  "answers' frequencies)", "",
                  "| model | length | stories | choice % [95%] | greedy % | bits: model / prior | prior - model "
                  "[95%] | story: model / blind [95%] | last mentioned | choice %, answer not the last mentioned "
                  "| kind |",
                  "|---" * 11 + "|"]
        for name, summary in by_model.items():
            for (row_task, length), s in summary.items():
                if row_task != task:
                    continue
                lo, hi = s["interval"]
                at = "" if s["depth"] is None else f" (story at {s['depth']:g})"
                lines.append(f"| {name} | {length:,}{at} | {s['n']} | {100 * s['right']:.0f} [{100 * lo:.0f}, "
                             f"{100 * hi:.0f}] | {100 * s['greedy_right']:.0f} | {s['bits']:.2f} / "
                             f"{s['prior_bits']:.2f} | {s['gain']:+.2f} ± {s['gain_95']:.2f} | "
                             f"{s['story']:.2f} / {s['blind_story']:.2f} ({s['story_gain']:+.2f} ± "
                             f"{s['story_gain_95']:.2f}) | {s['last']:.2f} | {100 * s['not_last_right']:.0f} "
                             f"(n={s['not_last_n']}) | {s['kind']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def evaluate(run_dir: str, tasks, lengths, per_cell: int, seed: int, window: int, progress: bool,
             depth: float | None = None, changes: dict | None = None) -> list[dict]:
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.long_context import harness
    from titans_jax.long_context.eval_sets import EvalSetSpec, load_eval_set
    from titans_jax.models import TitansLM
    from titans_jax.training import load_trained

    unknown = [task for task in tasks if task not in babilong.QA_TASKS]
    if unknown:
        raise SystemExit(f"--tasks {unknown}: qa_choice scores the qa tasks {babilong.QA_TASKS}")
    record = json.loads((pathlib.Path(run_dir) / "config.json").read_text())
    if record["config"]["data"]["tokenizer"] != "byte":  # the prompts and words are bytes: refuse, not misread
        raise SystemExit(f"{run_dir} uses a {record['config']['data']['tokenizer']} tokenizer; qa_choice scores "
                         "byte-level runs")
    config, params, meta = load_trained(run_dir, changes)
    tokenizer = ByteTokenizer()
    runner = harness.StreamingRunner(TitansLM(config), params, window)
    # the evaluation set experiments.long_context --depths none reads (--depths <depth> with a depth): the
    # same prompts, the same stories
    spec = EvalSetSpec(tasks=tuple(tasks), lengths=tuple(lengths), depths=(depth,), num_per_cell=per_cell, seed=seed,
                       name="harness")
    source = load_eval_set(spec, tokenizer)
    rows = score_rows(runner, [source[i] for i in range(len(source))], tokenizer, progress)
    for row in rows:
        row["step"], row["depth"] = int(meta["step"]), depth
    return rows


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained byte-level run (its newest good checkpoint)")
    parser.add_argument("--tasks", default="qa1")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--per-cell", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0, help="the first evaluation seed (stories seed .. seed + n - 1)")
    parser.add_argument("--depth", type=float, default=None,
                        help="the story contiguous at this depth of the context (1: right before the question); "
                             "default: facts anywhere, as trained")
    parser.add_argument("--window", type=int, default=4096)
    add_model_changes_argument(parser)
    parser.add_argument("--out", help="JSON file for the scored rows (with --run)")
    parser.add_argument("--report", nargs="+", metavar="NAME=JSON", help="tabulate --out files side by side")
    parser.add_argument("--reach", type=int, default=None,
                        help="with --report: split each cell by whether the last sentence naming the answer ends "
                             "within this many tokens of the prompt's end (a sliding window's reach: layers x "
                             "(window - 1))")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.reach is not None and not args.report:
        parser.error("--reach splits the cells of --report files")
    if bool(args.run) == bool(args.report):
        parser.error("give either --run (score a model) or --report NAME=JSON ... (tabulate scored files)")
    if args.report:
        paths = named_paths(parser, "--report", args.report)
        files = {name: json.loads(path.read_text()) for name, path in paths.items()}
        if args.reach is None:
            text = report({name: data["rows"] for name, data in files.items()})
        else:
            if args.reach < 0:
                parser.error(f"--reach must be >= 0, got {args.reach}")
            text = reach_report({name: with_distances(data["rows"], data["args"]) for name, data in files.items()},
                                args.reach)
    else:
        if args.per_cell < 1:
            parser.error(f"--per-cell must be >= 1, got {args.per_cell}")
        if args.depth is not None and not 0.0 <= args.depth <= 1.0:
            parser.error(f"--depth must be in [0, 1], got {args.depth}")
        tasks, lengths = args.tasks.split(","), [int(n) for n in args.lengths.split(",")]
        rows = evaluate(args.run, tasks, lengths, args.per_cell, args.seed, args.window, not args.no_progress,
                        args.depth, parse_model_changes(parser, args.set))
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        text = report({"/".join(pathlib.Path(args.run).parts[-3:]): rows})
    print(text)
    return text


if __name__ == "__main__":
    main()
