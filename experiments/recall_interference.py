"""Why does the recall probe's recall fall beyond ~64K tokens? Interference from the filler's writes
against decay, measured by changing only what lies between the pairs and their queries. For [C2].

    python -m experiments.recall_interference --runs runs/recall_probe_lengths/lmm/seed0 \
        --fillers digits,periodic,binary,constant --fillers-lengths 1024,16384,65536,262144 \
        --json experiments/results/recall_probe/interference.json
    python -m experiments.recall_interference --show experiments/results/recall_probe/interference.json
    python -m experiments.recall_interference --quick       # smoke: a tiny untrained model

A trained recall-probe run (experiments.recall_probe) sees rows of the probe's form with one
filler length F exactly (not drawn): 8 pairs "ab:X", F filler tokens, the 8 queries, so every
query is F + 4 .. F + 60 tokens from its pair. The pairs, their order and the query order are the
same for every filler kind at a given (row, F): the comparison between kinds is paired. Kinds, in
order of how many distinct 4-token windows (what the causal conv turns into a write) they hold:

    constant   "0000..."                                1 window: the memory writes one association
    binary     random over {0, 1}                       16 windows
    periodic   one random 64-digit block repeated       <= 64 windows
    digits     random over 0-9, the training filler     10^4 windows

A filler the memory has learnt (constant) writes almost nothing once learnt, so recall across it
measures what the forgetting gate (and any drift of the state) alone removes; if recall at a
long F survives it and falls with the diverse fillers, the loss is interference (the filler's own
associations overwriting the pairs' in a small memory). The gate is data-dependent, so
--mechanism-length reports, per filler and memory layer, the gates and write sizes that decide
between the two (and what the gate alone keeps of a weight over 16K-256K tokens). Short F is the
control: every kind should recall there (an out-of-distribution filler that confused the model
would show up at F = 1024 already).

Text kinds (S-NIAH's haystacks, for a run trained with recall_probe --filler books:train): the
filler is a window of a text haystack, every ':' read as ';' (recall_probe.TextFiller):

    noise      RULER's noise block, repeated             ~90 windows, as periodic
    essays     Paul Graham's essays (RULER's haystack)   natural text
    books      the books' test split (1.34 MB; books:validation+test, 2.67 MB, for 2M-token rows)
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import pathlib
import re
import time
import zlib

import numpy as np

from experiments.recall_probe import (DIGITS, EVAL_SEED_OFFSET, KEY_LETTERS, PAIR, VALUE_LETTERS, row_changes,
                                      text_filler)

FILLERS = ("constant", "binary", "periodic", "digits")
TEXT_FILLERS = ("noise", "essays", "books")  # and books:<split>+<split>
PERIOD = 64


def is_filler_kind(kind: str) -> bool:
    return kind in FILLERS or kind in TEXT_FILLERS or kind.startswith("books:")


def _kind_seed(kind: str) -> int:
    """The filler's part of a row's seed: the kind's index for the digit kinds (as before the text
    kinds existed), a checksum of the name for the text kinds."""
    return FILLERS.index(kind) if kind in FILLERS else zlib.crc32(kind.encode())


def filler_tokens(kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` filler bytes (int32) of one kind (see the module docstring)."""
    if kind not in FILLERS and is_filler_kind(kind):  # a text haystack
        return text_filler(kind).window(length, rng)
    if kind == "constant":
        return np.full(length, DIGITS[0], np.int32)
    if kind == "binary":
        return DIGITS[rng.integers(0, 2, length)].astype(np.int32)
    if kind == "periodic":
        block = DIGITS[rng.integers(0, len(DIGITS), PERIOD)].astype(np.int32)
        return np.resize(block, length)
    if kind == "digits":
        return DIGITS[rng.integers(0, len(DIGITS), length)].astype(np.int32)
    raise ValueError(f"unknown filler kind {kind!r}; choose from {FILLERS + TEXT_FILLERS} or books:<split>")


def fixed_filler_row(seed: int, row: int, filler_length: int, num_pairs: int, kind: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32 [T + 1], mask bool [T], distance int32 [T]) of one row with exactly `filler_length`
    filler tokens between the pairs and the queries, T + 1 = 2 * PAIR * num_pairs + filler_length.
    The pairs and query order depend on (seed, row) only; the filler on (seed, row, length, kind)."""
    if num_pairs < 1 or filler_length < 0:
        raise ValueError(f"need at least one pair and a filler length >= 0, got {num_pairs} and {filler_length}")
    pairs_rng = np.random.default_rng([seed, row])
    codes = pairs_rng.choice(len(KEY_LETTERS) ** 2, num_pairs, replace=False)
    values = VALUE_LETTERS[pairs_rng.integers(0, len(VALUE_LETTERS), num_pairs)]
    order = pairs_rng.permutation(num_pairs)

    def block(indices):
        out = np.empty((len(indices), PAIR), np.int32)
        out[:, 0] = KEY_LETTERS[codes[indices] // len(KEY_LETTERS)]
        out[:, 1] = KEY_LETTERS[codes[indices] % len(KEY_LETTERS)]
        out[:, 2] = ord(":")
        out[:, 3] = values[indices]
        return out.reshape(-1)

    filler = filler_tokens(kind, filler_length, np.random.default_rng([seed, row, filler_length, _kind_seed(kind)]))
    ids = np.concatenate([block(np.arange(num_pairs)), filler, block(order)])
    seq_len = len(ids) - 1
    mask, distance = np.zeros(seq_len, bool), np.zeros(seq_len, np.int32)
    query_start = PAIR * num_pairs + filler_length
    for slot, index in enumerate(order):
        colon = query_start + slot * PAIR + PAIR - 2
        mask[colon] = True  # the target at the ':' is the query's value
        distance[colon] = colon + 1 - (index * PAIR + PAIR - 1)
    return ids, mask, distance


def measure(model, params, kinds, lengths, rows: int, batch: int, num_pairs: int, stream_window: int,
            seed: int = EVAL_SEED_OFFSET + 7) -> dict:
    """{kind: {filler length: {"correct", "count", "accuracy", "ci95", "seconds"}}}: teacher-forced
    recall of the queries' values, one parallel pass per batch, or streamed through the cache in
    pieces of stream_window tokens for rows longer than that."""
    import jax
    import jax.numpy as jnp

    from experiments.long_context_table import binomial_interval
    from experiments.recall_probe import stream_call, streamed_predictions

    predict = jax.jit(lambda ids: jnp.argmax(model.apply({"params": params}, ids), -1))
    call = stream_call(model) if stream_window > 0 else None
    out = {}
    for kind in kinds:
        out[kind] = {}
        for length in lengths:
            started, correct, count = time.perf_counter(), 0, 0
            for first in range(0, rows, batch):
                chunk = range(first, min(rows, first + batch))
                parts = [fixed_filler_row(seed, row, length, num_pairs, kind) for row in chunk]
                ids, mask, _ = (np.stack(p) for p in zip(*parts, strict=True))
                if 0 < stream_window < ids.shape[1] - 1:
                    predicted = streamed_predictions(model, params, ids[:, :-1], stream_window, call)
                else:
                    predicted = np.asarray(predict(jnp.asarray(ids[:, :-1])))
                correct += int((predicted == ids[:, 1:])[mask].sum())
                count += int(mask.sum())
            cell = {"correct": correct, "count": count, "accuracy": correct / count,
                    "ci95": binomial_interval(correct, count), "seconds": time.perf_counter() - started}
            out[kind][str(length)] = cell
            print(f"[interference] {kind:>9} filler of {length:>8} tokens: {correct}/{count} = {cell['accuracy']:.2f} "
                  f"[{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}] ({cell['seconds']:.0f} s)", flush=True)
    return out


def mechanism(model, params, kinds, filler_length: int, rows: int, num_pairs: int,
              horizons: tuple[int, ...] = (16384, 65536, 262144), seed: int = EVAL_SEED_OFFSET + 7) -> dict:
    """What each memory layer writes while it reads the filler: {kind: {layer: {...}}} over the
    last half of a `filler_length`-token filler (its steady state), mean over rows and heads:
    theta (inner step size), alpha (forgetting), keep {h: the fraction of a weight the gate alone
    leaves after h filler tokens, exp(h * mean log(1 - alpha)) per row and head, then averaged}
    for h in `horizons`, surprise (median norm of a token's inner gradient at its chunk's start
    weights, experiments.gate_trace.surprise_norms) and write (mean theta * surprise: the size of
    each token's step before momentum). A filler the memory has learnt writes ~nothing. "pairs"
    holds theta, surprise and write at the pairs' value tokens (where the conv sees "ab:X"): a
    memory that singles out what it must keep writes more there than in the filler. "heads" holds
    theta, write, the pairs' write, alpha and keep per head (mean over rows): a layer whose mean
    gate forgets may still keep the pairs in one head."""
    import jax
    import jax.numpy as jnp

    from experiments.gate_trace import _memory_config, memory_layers, surprise_norms

    collect = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["diagnostics"])[1])
    config = _memory_config(model.config)
    out = {}
    for kind in kinds:
        parts = [fixed_filler_row(seed, row, filler_length, num_pairs, kind) for row in range(rows)]
        ids = np.stack([p[0] for p in parts])
        found = memory_layers(collect(params, jnp.asarray(ids[:, :-1])).get("diagnostics", {}))
        if not found:
            raise ValueError("this model has no memory layer to measure")
        out[kind] = {}
        for layer, inputs in found:
            node = functools.reduce(operator.getitem, layer, params)
            keys, _, _, theta, _, log_keep = inputs
            prefix = keys.shape[2] - (ids.shape[1] - 1)  # tokens seen before the row (persistent memory)
            start = prefix + PAIR * num_pairs
            steady = slice(start + filler_length // 2, start + filler_length)
            surprise_all = surprise_norms(node["memory"], inputs, config)
            theta_all = np.asarray(theta, np.float64)
            surprise, theta = surprise_all[..., steady], theta_all[..., steady]
            cell = {"theta": float(theta.mean()), "surprise": float(np.median(surprise)),
                    "write": float(np.mean(theta * surprise))}
            values_at = prefix + PAIR * np.arange(num_pairs) + PAIR - 1
            pairs_write = theta_all[..., values_at] * surprise_all[..., values_at]
            cell["pairs"] = {"theta": float(theta_all[..., values_at].mean()),
                             "surprise": float(np.median(surprise_all[..., values_at])),
                             "write": float(pairs_write.mean())}
            cell["heads"] = {"theta": theta.mean((0, 2)).tolist(), "write": (theta * surprise).mean((0, 2)).tolist(),
                             "pairs_write": pairs_write.mean((0, 2)).tolist()}
            if log_keep is not None:
                log_keep = np.asarray(log_keep, np.float64)[..., steady]
                cell["alpha"] = float(np.mean(-np.expm1(log_keep)))
                cell["keep"] = {str(h): float(np.mean(np.exp(h * log_keep.mean(-1)))) for h in horizons}
                cell["heads"]["alpha"] = (-np.expm1(log_keep)).mean((0, 2)).tolist()
                cell["heads"]["keep"] = {str(h): np.exp(h * log_keep.mean(-1)).mean(0).tolist() for h in horizons}
            out[kind]["/".join(layer)] = cell
            print(f"[interference] {kind:>9} filler, {'/'.join(layer)}: theta {cell['theta']:.3g}, surprise "
                  f"{cell['surprise']:.3g}, write {cell['write']:.3g} (at the pairs' values: theta "
                  f"{cell['pairs']['theta']:.3g}, write {cell['pairs']['write']:.3g})"
                  + (f", alpha {cell['alpha']:.2e}, kept by the gate over " + ", ".join(
                      f"{int(h):,}: {v:.3g}" for h, v in cell["keep"].items()) + " tokens" if "alpha" in cell else ""),
                  flush=True)
            print(f"[interference] {kind:>9} filler, {'/'.join(layer)} per head: write " + ", ".join(
                f"{value:.3g}" for value in cell["heads"]["write"]) + "; at the pairs' values " + ", ".join(
                f"{value:.3g}" for value in cell["heads"]["pairs_write"]) + (
                "; alpha " + ", ".join(f"{value:.2e}" for value in cell["heads"]["alpha"])
                if "alpha" in cell["heads"] else ""), flush=True)
    return out


def table(results: dict) -> str:
    """A markdown table: one row per (run, filler kind), one column per filler length."""
    lengths = sorted({int(length) for record in results.values() for cells in record["recall"].values()
                      for length in cells})
    lines = ["| run | filler | " + " | ".join(f"F = {length:,}" for length in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for name, record in results.items():
        for kind, cells in record["recall"].items():
            shown = []
            for length in lengths:
                cell = cells.get(str(length))
                shown.append("-" if cell is None else
                             f"{cell['accuracy']:.2f} [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}]")
            lines.append(f"| {name} | {kind} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def seed_tables(results: dict) -> str:
    """Table 2's layout over seeds: for each filler kind (haystack), one row per run setting (an
    entry's name without its seed) and one column per filler length; a cell is the mean ± sd of
    the seeds' recall and their number, or one seed's recall with its 95% interval."""
    lengths = sorted({int(length) for record in results.values() for cells in record["recall"].values()
                      for length in cells})
    kinds = list(dict.fromkeys(kind for record in results.values() for kind in record["recall"]))
    settings: dict[str, dict[int, dict]] = {}
    for name, record in results.items():
        match = re.search(r" seed (\d+)", name)
        setting = name if match is None else name[:match.start()] + name[match.end():]
        settings.setdefault(setting, {})[int(match.group(1)) if match else 0] = record
    out = []
    for kind in kinds:
        lines = [f"filler {kind}:", "", "| run | seeds | " + " | ".join(f"F = {length:,}" for length in lengths) + " |",
                 "|---|---|" + "---|" * len(lengths)]
        for setting, seeds in settings.items():
            measured = {seed: record["recall"][kind] for seed, record in sorted(seeds.items())
                        if kind in record["recall"]}
            if not measured:
                continue
            shown = []
            for length in lengths:
                cells = [cells[str(length)] for cells in measured.values() if str(length) in cells]
                if not cells:
                    shown.append("-")
                elif len(cells) == 1:
                    shown.append(f"{cells[0]['accuracy']:.2f} [{cells[0]['ci95'][0]:.2f}, {cells[0]['ci95'][1]:.2f}]")
                else:
                    values = [cell["accuracy"] for cell in cells]
                    shown.append(f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (n={len(values)})")
            lines.append(f"| {setting} | {', '.join(map(str, measured))} | " + " | ".join(shown) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def mechanism_table(results: dict) -> str:
    """A markdown table of the mechanism measurements: one row per (run, memory layer, filler kind)."""
    lines = ["| run | memory layer | filler | theta | median surprise | write (theta x surprise) | alpha | "
             "kept by the gate over 16K / 64K / 256K tokens | at the pairs' values: theta / write |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, record in results.items():
        layers = sorted({layer for cells in record.get("mechanism", {}).values() for layer in cells})
        for layer in layers:
            for kind, cells in record["mechanism"].items():
                cell = cells.get(layer)
                if cell is None:
                    continue
                keep = " / ".join(f"{value:.2g}" for value in cell.get("keep", {}).values()) or "-"
                alpha = f"{cell['alpha']:.1e}" if "alpha" in cell else "- (no gate)"
                pairs = (f"{cell['pairs']['theta']:.2g} / {cell['pairs']['write']:.2g}" if "pairs" in cell
                         else "-")
                lines.append(f"| {name} | {layer.removesuffix('/memory')} | {kind} | {cell['theta']:.2g} | "
                             f"{cell['surprise']:.2g} | {cell['write']:.2g} | {alpha} | {keep} | {pairs} |")
    return "\n".join(lines)


def heads_table(results: dict) -> str:
    """A markdown table of the mechanism per head, for the measurements that recorded heads: one
    row per (run, memory layer, filler kind, head); empty when none did."""
    lines = ["| run | memory layer | filler | head | theta | write | alpha | kept over 16K / 64K / 256K tokens | "
             "write at the pairs' values |", "|---|---|---|---|---|---|---|---|---|"]
    for name, record in results.items():
        for kind, cells in record.get("mechanism", {}).items():
            for layer, cell in sorted(cells.items()):
                heads = cell.get("heads")
                for head in range(len(heads["theta"]) if heads else 0):
                    alpha = f"{heads['alpha'][head]:.1e}" if "alpha" in heads else "- (no gate)"
                    keep = " / ".join(f"{values[head]:.2g}" for values in heads.get("keep", {}).values()) or "-"
                    lines.append(f"| {name} | {layer.removesuffix('/memory')} | {kind} | {head} | "
                                 f"{heads['theta'][head]:.2g} | {heads['write'][head]:.2g} | {alpha} | {keep} | "
                                 f"{heads['pairs_write'][head]:.2g} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def entry_name(recorded: dict, eval_set: list[str]) -> str:
    """A run's name in the results file: variant and seed, the run's training settings (rows of
    another shape than the default, recall_probe --set, and a text --filler) in brackets and the
    evaluation's changes in parentheses, so that two runs of one variant and seed never replace
    each other's results (merge_results replaces an entry whose parameters changed)."""
    trained = row_changes(recorded) + [override.removeprefix("model.") for override in recorded.get("set", [])]
    trained += [f"filler {recorded['filler']}"] if recorded.get("filler", "digits") != "digits" else []
    return (f"{recorded['variant']} seed {recorded['seed']}" + (f" [{', '.join(trained)}]" if trained else "")
            + (f" ({', '.join(eval_set)})" if eval_set else ""))


def merge_results(earlier: dict, new: dict) -> dict:
    """The results file after a new measurement: a run measured again (same params digest) keeps
    the cells it measured before that the new one does not (other kinds, lengths, the mechanism);
    a run trained again replaces its entry."""
    merged = dict(earlier)
    for name, record in new.items():
        before = earlier.get(name)
        if before is None or before.get("params_digest") != record.get("params_digest"):
            merged[name] = record
            continue
        recall = {kind: {**before.get("recall", {}).get(kind, {}), **cells}
                  for kind, cells in record.get("recall", {}).items()}
        merged[name] = {**before, **record, "recall": {**before.get("recall", {}), **recall},
                        **({"mechanism": {**before.get("mechanism", {}), **record["mechanism"]}}
                           if "mechanism" in record else {})}
    return merged


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="", help="comma-separated run directories of experiments.recall_probe")
    parser.add_argument("--fillers", default=",".join(FILLERS))
    parser.add_argument("--fillers-lengths", default="1024,16384,65536,262144")
    parser.add_argument("--rows", type=int, default=8, help="rows per (kind, length); 8 queries each")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--stream-window", type=int, default=16384,
                        help="stream rows longer than this through the cache in pieces of this many tokens (0: never)")
    parser.add_argument("--mechanism-length", type=int, default=4096,
                        help="measure gates and write sizes over a filler this long (2 rows; 0: skip)")
    parser.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                        help="evaluate the trained weights under a changed model setting (e.g. "
                             "lmm.memory.norm_eps=1e-30); the results are named after the change")
    parser.add_argument("--json", default="", help="write the results here (merged into what the file holds)")
    parser.add_argument("--show", default="", help="print the tables of a results file and exit (first Table 2's "
                        "layout over seeds: per haystack, a row per setting, a column per filler length)")
    parser.add_argument("--quick", action="store_true", help="a tiny untrained model, two short lengths: a smoke run")
    args = parser.parse_args(argv)
    kinds = [kind for kind in args.fillers.split(",") if kind]
    unknown = [kind for kind in kinds if not is_filler_kind(kind)]
    if unknown or not kinds:
        parser.error(f"--fillers {args.fillers!r}: choose from {', '.join(FILLERS + TEXT_FILLERS)} or books:<split>")
    try:
        lengths = [int(text) for text in args.fillers_lengths.split(",") if text.strip()]
    except ValueError:
        parser.error(f"--fillers-lengths must be comma-separated integers, got {args.fillers_lengths!r}")
    if not lengths or min(lengths) < 0 or args.rows < 1 or args.batch < 1 or args.pairs < 1 or args.stream_window < 0 \
            or args.mechanism_length < 0:
        parser.error("need filler lengths >= 0, --rows, --batch and --pairs >= 1, --stream-window >= 0 and "
                     "--mechanism-length >= 0")
    for kind in kinds:  # a text filler must be fetched and hold the longest filler (it is never repeated)
        if kind not in FILLERS:
            try:
                source = text_filler(kind)
            except (ValueError, FileNotFoundError) as error:
                parser.error(f"--fillers {kind}: {error}")
            if not source.repeating and len(source.data) < max(lengths):
                parser.error(f"--fillers {kind}: {len(source.data):,} bytes of text, fewer than the longest filler "
                             f"({max(lengths):,}); use books:validation+test or essays for longer ones")
    if args.show:
        shown = json.loads(pathlib.Path(args.show).read_text())
        print("\n\n".join(filter(None, [seed_tables(shown), table(shown), mechanism_table(shown),
                                         heads_table(shown)])))
        return shown
    runs = [pathlib.Path(text) for text in args.runs.split(",") if text]
    if not runs and not args.quick:
        parser.error("give --runs (directories of trained experiments.recall_probe runs) or --quick")
    missing = [str(run) for run in runs if not (run / "recall.json").exists()]
    if missing:
        parser.error(f"not a finished recall-probe run (no recall.json): {', '.join(missing)}; train it with "
                     f"python -m experiments.recall_probe --variants <variant> --out <dir>")

    import jax

    from experiments.recall_probe import params_digest
    from titans_jax import config_tree
    from titans_jax.models import ModelConfig, TitansLM
    from titans_jax.training import load_trained

    try:
        changes = config_tree.parse_assignments(ModelConfig, args.eval_set)
    except ValueError as error:
        parser.error(f"--eval-set {error}")

    results = {}
    if args.quick:
        config = ModelConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=2, arch="lmm", segment_size=16,
                             window=16)
        model = TitansLM(config_tree.replace(config, changes))
        ids, _, _ = fixed_filler_row(0, 0, 8, args.pairs, "digits")
        params = model.init(jax.random.key(0), ids[None, :-1])["params"]
        results["quick"] = {"recall": measure(model, params, kinds, lengths, args.rows, args.batch, args.pairs,
                                              args.stream_window)}
        if args.mechanism_length:
            results["quick"]["mechanism"] = mechanism(model, params, kinds, args.mechanism_length, 2, args.pairs)
    for run in runs:
        recorded = json.loads((run / "recall.json").read_text())
        model_config, params, meta = load_trained(run)
        model_config = config_tree.replace(model_config, changes)
        digest = params_digest(params)
        if recorded.get("params_digest") not in (None, digest):
            raise SystemExit(f"{run}: its recall.json belongs to other parameters ({recorded['params_digest']} != "
                             f"{digest}); evaluate the run again with experiments.recall_probe first")
        print(f"[interference] {run}: {model_config.arch}, step {meta['step']}", flush=True)
        name = entry_name(recorded, args.eval_set)
        results[name] = {"run": str(run), "params_digest": digest, "eval_set": args.eval_set,
                         "step": int(meta["step"]), "pairs": args.pairs,
                         "rows": args.rows, "stream_window": args.stream_window,
                         "recall": measure(TitansLM(model_config), params, kinds, lengths, args.rows, args.batch,
                                           args.pairs, args.stream_window)}
        if args.mechanism_length:
            results[name]["mechanism"] = mechanism(TitansLM(model_config), params, kinds, args.mechanism_length, 2,
                                                   args.pairs)
    print("\n\n".join(filter(None, [table(results), mechanism_table(results), heads_table(results)])))
    if args.json:
        write_merged(pathlib.Path(args.json), results)
    return results


def write_merged(path: pathlib.Path, results: dict) -> None:
    """Merge `results` into the JSON file at `path` (merge_results) under an exclusive lock on its
    folder, so that processes measuring other runs into one file do not lose each other's
    entries; the file is replaced atomically."""
    import fcntl
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        earlier = json.loads(path.read_text()) if path.exists() else {}
        temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(merge_results(earlier, results), indent=1))
        os.replace(temporary, path)
    finally:
        os.close(folder)  # releases the lock


if __name__ == "__main__":
    main()
