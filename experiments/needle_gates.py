"""How much of the needle's write does the forgetting gate leave by the question? ([C2])

    python -m experiments.needle_gates --run runs/lc_niah_lmm_scratch_stage2/lmm/seed1 \
        --lengths 1024,4096,16384 --per-cell 16 --out runs/needle_gates_lmm_seed1.json

The memory's update scales all its weights by 1 - alpha_t at every token t (titans.md: M_t =
(1 - alpha_t) M_{t-1} + S_t), so what the needle wrote is multiplied, by the time the question
is read, by the product of 1 - alpha_t over the tokens in between: its *retention* under the
gate. That is the forgetting gate's share alone: the needle's surprise also enters through the
momentum S for a few tokens (eta ~0.5-0.8 here, so a tail of a few tokens against thousands of
haystack tokens), and the later writes change the memory around it, which this does not count.
The gates are the model's own, computed from each token (titans_jax.lmm), so they are measured
on the evaluation's prompts, not on training rows (experiments.gate_trace does those).

For each example (RULER's template and haystack, evaluation seeds from --seed, as
experiments.needle_cue builds them) the prompt runs once through the model as the evaluation
streams it (4,096-token windows) with the memory layers' inputs kept, and per memory layer:

- alpha: the forgetting gate's mean over the tokens after the needle (and its heads);
- retention: exp(sum of log(1 - alpha_t)) from the token after the needle's last digit to the
  prompt's last token, per head; the geometric mean over the heads and the best head's;
- write: theta (the inner step) on the needle's digits over its mean on the tokens after them.

Prints per length and layer the median over the examples (and the range) and writes every
example's figures to --out. With --exact (the model's experiments.needle_cue file on the same
examples: same task, depth and evaluation seeds) it adds each example's exact match, and per
length and layer the retention on the right answers against the wrong ones. A model
without the forgetting gate has retention 1. --rows reports an earlier --out file again.
With a BABILong-style --task (qa1 ... qa5; --depth none: the facts anywhere, as trained) the
needle is the answer's word in the story's last sentence that names it (answer_sentence).
Byte-level models whose memory reads the token sequence itself (LMM, MAG, MAL, the linear
memory, TTT): MAC's memory reads per-segment block inputs, which this does not map to tokens.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from titans_jax.long_context import babilong


def needle_span(prompt: str, answer: str, sentence: tuple[int, int]) -> tuple[int, int]:
    """[start, end) byte offsets (byte tokens: token offsets) of the needle's value, looked up
    in the needle's sentence (the characters `sentence` of the prompt, Example.needle_chars)."""
    within = prompt[sentence[0]:sentence[1]].find(answer)
    if within < 0:
        raise ValueError(f"the needle {answer!r} is not in its sentence {prompt[sentence[0]:sentence[1]]!r}")
    start = sentence[0] + within
    return len(prompt[:start].encode("utf-8")), len(prompt[:start + len(answer)].encode("utf-8"))


def layer_figures(theta: np.ndarray, log_keep: np.ndarray | None, start: int, end: int) -> dict:
    """theta, log_keep [H, T] of one memory layer (T the memory's positions of the prompt's
    tokens; log_keep None without the forgetting gate); the needle's digits at [start, end)."""
    after = slice(end, theta.shape[-1])
    if end >= theta.shape[-1]:
        raise ValueError(f"the needle ends at {end}, at or past the prompt's last position {theta.shape[-1] - 1}")
    write = float(np.mean(theta[:, start:end]) / np.mean(theta[:, after]))
    if log_keep is None:
        return {"alpha": 0.0, "retention": 1.0, "retention_best_head": 1.0, "write": write}
    log_retention = np.sum(log_keep[:, after].astype(np.float64), axis=-1)  # [H]
    return {"alpha": float(np.mean(-np.expm1(log_keep[:, after].astype(np.float64)))),
            "retention": float(np.exp(np.mean(log_retention))),
            "retention_best_head": float(np.exp(np.max(log_retention))), "write": write}


class GateStream:
    """Streams a prompt through `model` in windows of `window` tokens (batch 1, the evaluation's
    titans_jax.long_context.harness.StreamingRunner calls) with the memory layers' inputs kept:
    gates(ids) -> [(layer path, theta [H, T], log_keep [H, T] or None)] over the prompt's tokens
    (the persistent prefix, which the empty cache has already run, excluded). `empty`: that
    cache, the state before the prompt's first token."""

    def __init__(self, model, params, window: int = 4096):
        import jax

        from titans_jax.models import init_cache

        self.params, self.window = params, window
        self._call = jax.jit(lambda p, ids, cache: model.apply({"params": p}, ids, cache, logits_at="none",
                                                                mutable=["diagnostics"]))
        self.empty = jax.jit(lambda p: init_cache(model, p, 1, None))(params)

    def stream(self, ids: np.ndarray, cuts=()):
        """Yields (offset, cache, [(layer path, its memory inputs, batch axis dropped)]) after each
        call, the pieces also ending at every offset in `cuts` (so the cache there is the state
        after exactly those tokens): window_pieces of each stretch between cuts, so that only
        power-of-two shapes up to the window are compiled, whatever the cuts."""
        from experiments.gate_trace import memory_layers
        from titans_jax.long_context.harness import window_pieces

        bounds = sorted({0, ids.size, *cuts})
        if bounds[0] < 0 or bounds[-1] > ids.size:
            raise ValueError(f"cuts {sorted(cuts)} outside the prompt's {ids.size} tokens")
        cache, offset = self.empty, 0
        for stop in bounds[1:]:
            for piece in window_pieces(stop - offset, self.window):
                (_, cache), collected = self._call(self.params, ids[None, offset:offset + piece], cache)
                offset += piece
                yield offset, cache, [("/".join(path), tuple(None if x is None else x[0] for x in inputs))
                                      for path, inputs in memory_layers(collected["diagnostics"])]

    def gates(self, ids: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
        pieces = [[(path, np.asarray(inputs[3]), None if inputs[5] is None else np.asarray(inputs[5]))
                   for path, inputs in layers] for _, _, layers in self.stream(ids)]
        layers = []
        for index, (path, _, log_keep) in enumerate(pieces[0]):
            theta = np.concatenate([piece[index][1] for piece in pieces], axis=-1)
            if theta.shape[-1] != ids.size:
                raise ValueError(f"{path} reads {theta.shape[-1]} positions for a {ids.size}-token prompt: "
                                 "not the token sequence (MAC's per-segment memory is not supported)")
            keep = None if log_keep is None else np.concatenate([piece[index][2] for piece in pieces], axis=-1)
            layers.append((path, theta, keep))
        return layers


def answer_sentence(example) -> tuple[int, int]:
    """The character span of the needle's sentence (niah: the only one) or, for a BABILong-style
    story, of its last sentence that names the answer (the fact the question is answered from,
    or a later one naming the same word)."""
    naming = [span for span in example.needle_chars if example.answer in example.prompt[span[0]:span[1]]]
    if not naming:
        raise ValueError(f"no sentence of the {example.task} example (seed {example.seed}) names its answer "
                         f"{example.answer!r}")
    return tuple(naming[-1])


def example_figures(stream: GateStream, example) -> dict:
    """{memory layer path: layer_figures} for one example (an Example of titans_jax.long_context)."""
    from titans_jax.data.tokenizers import ByteTokenizer

    ids = ByteTokenizer().encode(example.prompt)
    start, end = needle_span(example.prompt, example.answer, answer_sentence(example))
    return {path: layer_figures(theta, log_keep, start, end) for path, theta, log_keep in stream.gates(ids)}


def load_streamable(run_dir, changes: dict | None = None):
    """(config, params, meta, TitansLM) of a trained run whose memory layers read the prompt's
    bytes token by token; other models are refused with the reason. `changes`: as
    training.load_trained's (an evaluation-time change of the model config)."""
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.models import TitansLM
    from titans_jax.training import load_trained

    config, params, meta = load_trained(run_dir, changes)
    if config.vocab_size != ByteTokenizer.vocab_size:
        raise SystemExit(f"the needle's offsets are byte offsets: byte-level models only (vocabulary "
                         f"{ByteTokenizer.vocab_size}); this run's vocabulary is {config.vocab_size}")
    if config.arch == "mac":
        raise SystemExit("the memory's positions are mapped to tokens; MAC's memory reads per-segment "
                         "block inputs (use experiments.gate_trace)")
    if config.scan_layers:
        raise SystemExit("only models whose blocks are unrolled (scan_layers=False): nn.scan does "
                         "not carry the memory layers' diagnostics out")
    return config, params, meta, TitansLM(config)


def run(run_dir, task: str, lengths, depth: float, per_cell: int, seed: int, window: int = 4096,
        changes: dict | None = None) -> list[dict]:
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.long_context import make_examples
    from titans_jax.long_context.training_mix import check_eval_seeds

    check_eval_seeds(range(seed, seed + per_cell))
    _, params, meta, model = load_streamable(run_dir, changes)
    stream = GateStream(model, params, window)
    rows = []
    for example in make_examples(task, lengths, (depth,), per_cell, seed, ByteTokenizer()):
        rows.append({"task": task, "length": example.length, "seed": example.seed, "depth": depth,
                     "answer": example.answer, "step": int(meta["step"]), "layers": example_figures(stream, example)})
    return rows


def join_exact(rows: list[dict], cue_file: dict) -> list[dict]:
    """Each row with `exact` (RULER's match, 0 or 1) of the same example's plain answer (cue 0)
    in an experiments.needle_cue --out file of the same model, task and depth; answers of another
    checkpoint (step) than the gates' are refused."""
    answers, steps = {}, {}
    for row in cue_file["rows"]:
        if row["cue"] == 0 and row["task"] == rows[0]["task"] and row["depth"] == rows[0]["depth"]:
            answers[(row["length"], row["seed"])], steps[(row["length"], row["seed"])] = row["exact"], row["step"]
    other = sorted({(steps[key], row["step"]) for row in rows if (key := (row["length"], row["seed"])) in steps
                    and steps[key] != row["step"]})
    if other:
        raise ValueError(f"the needle_cue answers are of other parameters than the gates (steps {other[0]}, as "
                         "(answers, gates)): evaluate the same checkpoint")
    missing = sorted({(row["length"], row["seed"]) for row in rows} - answers.keys())
    if missing:
        raise ValueError(f"the needle_cue file has no plain answer (cue 0, {rows[0]['task']}, depth "
                         f"{rows[0]['depth']}) for (length, evaluation seed) {missing[:4]}"
                         + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    return [{**row, "exact": answers[(row["length"], row["seed"])]} for row in rows]


def join_exact_files(rows: list[dict], run, paths, changes=()) -> list[dict]:
    """join_exact with the answers of needle_cue --out files (e.g. one a length), which must be
    of the same run, evaluated with the same --set changes."""
    files = [json.loads(pathlib.Path(path).read_text()) for path in paths]
    for path, contents in zip(paths, files):
        if pathlib.Path(contents["args"]["run"]) != pathlib.Path(run):
            raise SystemExit(f"{path} answers for {contents['args']['run']}, these figures are of {run}")
        if list(contents["args"].get("set", [])) != list(changes):
            raise SystemExit(f"{path} answers with --set {contents['args'].get('set', [])}, these figures are "
                             f"with --set {list(changes)}")
    return join_exact(rows, {"rows": [row for contents in files for row in contents["rows"]]})


def report(rows: list[dict]) -> str:
    lines = ["| length | layer | alpha after the needle | retention (geometric mean of heads) | best head | "
             "write (theta on the needle / after) |", "|---|---|---|---|---|---|"]

    def spread(values, fmt):
        return f"{format(np.median(values), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"

    for length in sorted({row["length"] for row in rows}):
        group = [row for row in rows if row["length"] == length]
        for layer in group[0]["layers"]:
            values = {key: [row["layers"][layer][key] for row in group] for key in group[0]["layers"][layer]}
            lines.append(f"| {length:,} | {layer} | {spread(values['alpha'], '.2e')} | "
                         f"{spread(values['retention'], '.2g')} | {spread(values['retention_best_head'], '.2g')} | "
                         f"{spread(values['write'], '.2f')} |")
    if "exact" in rows[0]:
        lines += ["", "| length | layer | retention, right answers | wrong answers |", "|---|---|---|---|"]
        for length in sorted({row["length"] for row in rows}):
            group = [row for row in rows if row["length"] == length]
            right = [row for row in group if row["exact"]]
            wrong = [row for row in group if not row["exact"]]
            for layer in group[0]["layers"]:
                cells = [f"{len(part)}: " + spread([row["layers"][layer]["retention"] for row in part], ".2g")
                         if part else "0" for part in (right, wrong)]
                lines.append(f"| {length:,} | {layer} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def _depth(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def cli(doc: str, run_fn, report_fn, argv=None, per_cell: int = 16, exact_help: str = "",
        tasks=("niah_single_1", "niah_single_2")) -> list[dict]:
    """The command line of needle_gates and needle_write: run `run_fn` on a trained model (or
    read an earlier --out file), join --exact answers, print `report_fn`'s table, write --out."""
    from experiments.configs import add_model_changes_argument, parse_model_changes

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run's directory (<out>/<variant>/seed<k>)")
    parser.add_argument("--rows", help="report the rows of an earlier --out file instead of running a model")
    parser.add_argument("--task", default="niah_single_1", choices=tasks)
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--depth", type=_depth, default=0.5,
                        help="where the needle or story sits; none: drawn (niah, RULER's depths) or the facts "
                             "anywhere (qa, as trained)")
    parser.add_argument("--per-cell", type=int, default=per_cell)
    parser.add_argument("--seed", type=int, default=0, help="the first evaluation seed")
    parser.add_argument("--window", type=int, default=4096, help="tokens a streamed call (the evaluation's)")
    parser.add_argument("--exact", nargs="+", help="experiments.needle_cue --out files of this model on these "
                                                    "examples (e.g. one per length): adds each example's exact "
                                                    "match" + exact_help)
    add_model_changes_argument(parser)
    parser.add_argument("--out", help="JSON file for every example's figures")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.rows is None):
        parser.error("give one of --run (a trained model) and --rows (an earlier --out file)")
    if args.rows and args.set:
        parser.error("--set changes the model a --run evaluates; an earlier --out file keeps its own")
    changes = parse_model_changes(parser, args.set)
    if args.rows:
        earlier = json.loads(pathlib.Path(args.rows).read_text())
        rows = earlier["rows"]
        for key in ("run", "task", "depth", "per_cell"):
            setattr(args, key, earlier["args"][key])
        args.set = earlier["args"].get("set", [])  # files written before --set ran the model as trained
    else:
        rows = run_fn(pathlib.Path(args.run), args.task, [int(n) for n in args.lengths.split(",")], args.depth,
                      args.per_cell, args.seed, args.window, changes=changes)
    if args.exact:
        rows = join_exact_files(rows, args.run, args.exact, args.set)
    changed = f" (with {', '.join(args.set)})" if args.set else ""
    print(f"{args.run}{changed}, {args.task} at depth {args.depth}, {args.per_cell} examples a length: "
          "median [range]\n")
    print(report_fn(rows))
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


def main(argv=None) -> list[dict]:
    return cli(__doc__, run, report, argv, exact_help=" and the retention of right against wrong answers",
               tasks=("niah_single_1", "niah_single_2", *babilong.QA_TASKS))


if __name__ == "__main__":
    main()
