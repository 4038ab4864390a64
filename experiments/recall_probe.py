"""Can the memory recall an association from beyond the attention window, when binding it is easy?
A controlled probe for [C2].

    python -m experiments.recall_probe --variants lmm,swa,mac,transformer --out runs/recall_probe
    python -m experiments.recall_probe --quick --out /tmp/recall_quick      # smoke (about a minute)

Needle-in-a-haystack in bytes asks a small model for two things at once: recall across the
context, and binding a key that is a phrase ("the special magic number for <word>") to a value
that is 7 digits, tokens apart from it, which no single position sees together. This probe keeps
the first and removes the second: multi-query associative recall (MQAR, Arora et al. 2023,
"Zoology") where, by default (--gap 0), each association fits in the LMM's causal conv window
(width 4). A row is

    ab:Xcd:Y...     (P pairs: key = 2 lowercase letters, value = 1 uppercase letter)
    0815993...      (random digits: a filler of drawn length)
    cd:Yab:X...     (the same pairs queried in a random order)

and the loss counts only the value after each query's ':'. The mapping is drawn afresh per row
(nothing can be memorised in the weights), chance is 1/26, and every query's distance to its
pair (in tokens, pair's value to query's value) is recorded, so the accuracy is reported by
distance: below the SWA window (mini preset: 128), between it and the row, etc. A model whose
memory stores k -> v at the pair's value token (the conv sees "a b : X") and reads it at the
query's ':' answers at any distance; SWA cannot beyond its window; Transformer++ can by attention.

Each variant trains with the `lc_<variant>` config (experiments.configs: the mini preset, the
same optimiser for all) on these rows only, with `--steps`, `--seq-len`, `--batch`; finished runs
are skipped, interrupted ones resume. Evaluation is teacher-forced (a query's answer is one
token), on fresh seeds, and written to <out>/<variant>/seed<k>/recall.json; `--eval-lengths`
also evaluates on rows longer than the training rows (the same pairs and queries, a longer
filler between them), so recall is measured at distances the model never trained on -- the
probe's form of Table 2's question. Rerunning a finished run evaluates it again (no training) and
keeps what an earlier evaluation of it measured that this one did not (other lengths, --address);
experiments.recall_table makes the table and curves from these files.

`--filler` replaces the random digits by text (a haystack of titans_jax.long_context.haystacks:
`books:train` to train on, `books` (the test split), `essays` or `noise` to evaluate on): the
filler is then a random window of that text, every ':' in it read as ';' so that no filler window
looks like a pair's "ab:". A model trained this way has seen real text between its pairs, as the
paper's models see in S-NIAH's haystacks; `--eval-filler` picks the evaluation's text (by default
the books' test split for a books-trained run, else the training filler); evaluating on the text
a run trained on (the same haystack, or a book split in common) is refused.

`--init-from RUN` starts training from another run's final parameters (RUN/<variant>/seed<k> when
RUN is an earlier probe's --out) instead of the seed's initialisation: a curriculum, the probe
learnt on 256-token rows, then continued on longer rows, where a pair and its query are further
apart. The optimiser starts afresh (warm-up included); the run it continues must have the same
model, and it is recorded in the checkpoints' identity and in recall.json (`init_from`, with the
runs that run continued), so results name a continued run apart from one trained from scratch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time

import numpy as np

PAIR = 4  # "ab:X" (plus `gap` filler digits between the key and ':')
KEY_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
VALUE_LETTERS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
DIGITS = np.frombuffer(b"0123456789", np.uint8)
EVAL_SEED_OFFSET = 10**9  # evaluation rows use seeds from here (training: (seed, step))
SEQ_LEN, BATCH, PAIRS = 256, 16, 8  # the training rows' defaults (a record without "batch" predates it: 16)


@dataclasses.dataclass(frozen=True, eq=False)
class TextFiller:
    """Text to fill a row with instead of random digits: `data` (uint8 bytes, no ':') is read as a
    window from a random offset; a `repeating` source (RULER's noise block) is tiled to any length,
    any other is never repeated inside one row (ValueError when a row needs more than it holds)."""

    name: str
    data: np.ndarray
    repeating: bool = False

    @classmethod
    def from_text(cls, name: str, text: str, repeating: bool = False) -> TextFiller:
        data = np.frombuffer(text.encode("utf-8"), np.uint8).copy()
        if not len(data):
            raise ValueError(f"text filler {name!r} is empty")
        data[data == ord(":")] = ord(";")  # no filler window reads as a key's "ab:"
        data.flags.writeable = False
        return cls(name, data, repeating)

    def window(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """`length` consecutive filler bytes (int32) from an offset drawn with rng."""
        size = len(self.data)
        if self.repeating:
            start = int(rng.integers(0, size))
            return np.resize(np.roll(self.data, -start), length).astype(np.int32)
        if length > size:
            raise ValueError(f"filler {self.name!r} holds {size:,} bytes of text, fewer than the {length:,} a row "
                             f"needs (text is not repeated inside a row): choose a shorter row or a larger text "
                             f"(books:validation+test holds 2.67 MB, essays 3.1 MB)")
        start = int(rng.integers(0, size - length + 1))
        return self.data[start:start + length].astype(np.int32)


@functools.lru_cache(maxsize=8)
def text_filler(name: str) -> TextFiller:
    """A haystack of titans_jax.long_context.haystacks (noise, essays, books, books:train, ...) as a
    filler: its documents joined by its joiner (a blank line between documents), UTF-8 bytes.
    FileNotFoundError names the fetch command when the text is not fetched."""
    from titans_jax.long_context.haystacks import get_haystack

    haystack = get_haystack(name)
    if haystack.repeating:
        return TextFiller.from_text(name, haystack.documents[0][1] + haystack.joiner, repeating=True)
    return TextFiller.from_text(name, "\n\n".join(text for _, text in haystack.documents))


def shared_text(train: str, evaluation: str) -> bool:
    """Whether evaluation rows would be drawn from text the training rows were drawn from: the same
    haystack, or book splits in common ("books" is the test split). RULER's noise block is one
    sentence repeated, shared by construction, and digits are drawn afresh: neither counts."""
    def splits(name):
        if name == "books":
            return {"test"}
        return set(name.removeprefix("books:").split("+")) if name.startswith("books:") else None

    if {train, evaluation} & {"digits", "noise"}:
        return False
    if splits(train) is not None and splits(evaluation) is not None:
        return bool(splits(train) & splits(evaluation))
    return train == evaluation


def filler_named(name: str) -> TextFiller | None:
    """None for the random digits ("digits"), else text_filler(name)."""
    return None if name == "digits" else text_filler(name)


def recall_row(rng: np.random.Generator, seq_len: int, num_pairs: int, gap: int = 0,
               filler: TextFiller | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32 [seq_len + 1], mask bool [seq_len], distance int32 [seq_len]) of one row: mask[t]
    marks the targets ids[t + 1] that are a query's value, distance[t] the tokens from that
    pair's value to it (0 elsewhere). Distinct keys per row; the filler fills the rest. gap:
    filler tokens between each key and its ':' (in pairs and queries alike), so that key and value
    no longer fit one conv window (width 4) once gap >= 1: binding them then needs attention or
    depth. filler: text to fill the row with (a TextFiller window; None: random digits)."""
    if num_pairs < 1 or gap < 0:
        raise ValueError(f"need at least one pair and a gap >= 0, got {num_pairs} pairs and gap {gap}")
    span = PAIR + gap
    used = 2 * num_pairs * span
    if used > seq_len + 1:
        raise ValueError(f"{num_pairs} pairs and their queries need {used} tokens; a row has {seq_len + 1}")
    codes = rng.choice(len(KEY_LETTERS) ** 2, num_pairs, replace=False)
    keys = np.stack([KEY_LETTERS[codes // len(KEY_LETTERS)], KEY_LETTERS[codes % len(KEY_LETTERS)]], 1)
    values = VALUE_LETTERS[rng.integers(0, len(VALUE_LETTERS), num_pairs)]
    filler_length = int(rng.integers(0, seq_len + 1 - used + 1))
    if filler is None:  # the filler everywhere first
        ids = DIGITS[rng.integers(0, len(DIGITS), seq_len + 1)].astype(np.int32)
    else:
        ids = filler.window(seq_len + 1, rng)
    value_at = np.zeros(num_pairs, np.int64)
    for index in range(num_pairs):
        start = index * span
        ids[start:start + 2] = keys[index]
        ids[start + span - 2:start + span] = [ord(":"), values[index]]
        value_at[index] = start + span - 1
    mask = np.zeros(seq_len, bool)
    distance = np.zeros(seq_len, np.int32)
    query_start = num_pairs * span + filler_length
    for slot, index in enumerate(rng.permutation(num_pairs)):
        start = query_start + slot * span
        ids[start:start + 2] = keys[index]
        ids[start + span - 2:start + span] = [ord(":"), values[index]]
        mask[start + span - 2] = True  # the target at the ':' is the value after it
        distance[start + span - 2] = start + span - 1 - value_at[index]
    return ids, mask, distance


def recall_batch(seed: int, step: int, batch_size: int, seq_len: int, num_pairs: int, gap: int = 0,
                 filler: TextFiller | None = None):
    """(ids [B, T + 1], mask [B, T], distance [B, T]): a pure function of (seed, step) and the filler."""
    rows = [recall_row(np.random.default_rng([seed, step, row]), seq_len, num_pairs, gap, filler)
            for row in range(batch_size)]
    return tuple(np.stack(parts) for parts in zip(*rows, strict=True))


def distance_bins(seq_len: int, window: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of distance: half the window, the window, then doubling (2, 4, 8, ... times
    the window) up to the end of the row."""
    edges, edge = {0, seq_len + 1} | ({window // 2} if 0 < window // 2 < seq_len else set()), window
    while 0 < edge < seq_len:
        edges.add(edge)
        edge *= 2
    edges = sorted(edges)
    return list(zip(edges[:-1], edges[1:], strict=True))


def stream_call(model):
    """The jitted (params, tokens [B, T], cache) -> (logits at every position, cache) call."""
    import jax

    return jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, logits_at="all"))


def streamed_predictions(model, params, ids: np.ndarray, window: int, call=None) -> np.ndarray:
    """argmax of the next-token logits at every position of ids [B, T], streamed through the
    model's cache in pieces of at most `window` tokens (harness.window_pieces): memory stays
    bounded by the window (and the recurrent state; full attention's cache grows with T), which
    a 2M-token row needs. Equal to the parallel pass up to float rounding (tests/test_streaming).
    `call`: a stream_call(model) to reuse (its compiled programs) across batches."""
    import jax.numpy as jnp

    from titans_jax.long_context.harness import window_pieces
    from titans_jax.models import init_cache

    batch, length = ids.shape
    call = call or stream_call(model)
    cache = init_cache(model, params, batch, length if model.config.arch == "transformer" else None)
    out, offset = np.empty((batch, length), np.int32), 0
    for piece in window_pieces(length, window):
        logits, cache = call(params, jnp.asarray(ids[:, offset:offset + piece]), cache)
        out[:, offset:offset + piece] = np.asarray(jnp.argmax(logits, -1))
        offset += piece
    return out


def evaluate(model, params, seed: int, batches: int, batch_size: int, seq_len: int, num_pairs: int,
             bins: list[tuple[int, int]], gap: int = 0, stream_window: int = 0,
             filler: TextFiller | None = None) -> dict:
    """Accuracy of the queries' values by distance bin over `batches` fresh batches, teacher-forced:
    one parallel pass per batch, or streamed in pieces of stream_window tokens when the rows are
    longer than that (stream_window > 0). filler: the rows' text filler (None: digits)."""
    import jax
    import jax.numpy as jnp

    predict = jax.jit(lambda ids: jnp.argmax(model.apply({"params": params}, ids), -1))
    call = stream_call(model) if 0 < stream_window < seq_len else None
    correct, total = np.zeros(len(bins)), np.zeros(len(bins))
    for index in range(batches):
        ids, mask, distance = recall_batch(EVAL_SEED_OFFSET + seed, index, batch_size, seq_len, num_pairs, gap,
                                           filler)
        if 0 < stream_window < seq_len:
            predicted = streamed_predictions(model, params, ids[:, :-1], stream_window, call)
        else:
            predicted = np.asarray(predict(jnp.asarray(ids[:, :-1])))
        right = predicted == ids[:, 1:]
        for b, (lo, hi) in enumerate(bins):
            where = mask & (distance >= lo) & (distance < hi)
            correct[b] += right[where].sum()
            total[b] += where.sum()
    return {f"{lo}-{hi - 1}": {"correct": int(c), "count": int(n), "accuracy": float(c / max(n, 1))}
            for (lo, hi), c, n in zip(bins, correct, total, strict=True)}


def address_match(model, params, ids: np.ndarray, mask: np.ndarray, distance: np.ndarray) -> dict[str, dict]:
    """How each memory layer addresses the pairs of a batch of rows (from recall_batch).

    For every query, the memory's read query at the query's ':' (what predicts the value) is
    compared, per head, with the memory's write key at each pair's value token of the same row
    (where the conv sees "ab:X", the write that can bind key to value); tokens a layer sees before
    the row (persistent memory) are skipped. Returns, per memory layer,
    {"top1": the fraction of (query, head) whose own pair's key is the row's most similar one
    (chance 1 / pairs), "own": the mean cosine with its own pair's key, "other": with the other
    pairs' keys, "key_spread": the mean cosine between different pairs' keys (1: the keys do not
    tell the pairs apart)}. A memory that recalls by content has top1 near 1."""
    import jax
    import jax.numpy as jnp

    from experiments.gate_trace import memory_layers

    collected = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["diagnostics"])[1])(
        params, jnp.asarray(ids[:, :-1]))
    report = {}
    for names, inputs in memory_layers(collected.get("diagnostics", {})):
        keys, _, queries = (np.asarray(x, np.float64) for x in inputs[:3])  # [B, H, T, E]
        prefix = keys.shape[2] - mask.shape[1]  # tokens the layer sees before the row (persistent memory)
        if prefix < 0:
            raise ValueError(f"memory layer {names} saw {keys.shape[2]} tokens of a {mask.shape[1]}-token row")
        top1, own, other, spread = [], [], [], []
        for row in range(ids.shape[0]):
            at = np.flatnonzero(mask[row])  # the queries' ':' tokens
            written = at + 1 - distance[row, at] + prefix  # the value token of each query's pair
            at = at + prefix
            q = queries[row][:, at]
            k = keys[row][:, written]  # [H, P, E]
            q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-30)
            k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-30)
            cos = np.einsum("hpe,hqe->hpq", q, k)
            between = np.einsum("hpe,hqe->hpq", k, k)
            off = ~np.eye(len(at), dtype=bool)
            top1.append(np.argmax(cos, -1) == np.arange(len(at)))
            own.append(np.diagonal(cos, axis1=1, axis2=2))
            other.append(cos[:, off])
            spread.append(between[:, off])
        report["/".join(names)] = {
            "top1": float(np.mean(np.concatenate(top1, axis=1))), "own": float(np.mean(np.concatenate(own, axis=1))),
            "other": float(np.mean(np.concatenate(other, axis=1))),
            "key_spread": float(np.mean(np.concatenate(spread, axis=1)))}
    return report


def params_digest(params) -> str:
    """A short hash of a parameter pytree (paths, dtypes, shapes and values): which trained run a
    result belongs to."""
    import hashlib

    import jax

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def carry_over(record: dict, path: pathlib.Path) -> dict:
    """The record with what an earlier evaluation of the same trained run (its recall.json at
    `path`) measured and this one did not: lengths not evaluated again, the address measurement.
    Same run: the same params_digest, or for files written before it existed, the same step and
    the same training-length evaluation (deterministic for given parameters); an evaluation on another
    filler keeps nothing."""
    if not path.exists():
        return record
    earlier = json.loads(path.read_text())
    if "params_digest" in earlier:
        same = earlier["params_digest"] == record["params_digest"]
    else:
        same = (earlier.get("step"), earlier.get("accuracy_by_distance")) == (record["step"],
                                                                           record["accuracy_by_distance"])
    if not same or earlier.get("eval_filler", "digits") != record.get("eval_filler", "digits"):
        return record  # another run, or another evaluation filler: nothing to keep
    lengths = {**earlier.get("accuracy_by_length", {}), **record.get("accuracy_by_length", {})}
    merged = {**record, **({"accuracy_by_length": dict(sorted(lengths.items(), key=lambda kv: int(kv[0])))}
                           if lengths else {})}
    timings = {**earlier.get("long_eval", {}), **record.get("long_eval", {})}
    if timings:
        merged["long_eval"] = dict(sorted(timings.items(), key=lambda kv: int(kv[0])))
    if "address" in earlier and "address" not in record:
        merged["address"] = earlier["address"]
    return merged


def row_changes(record: dict) -> list[str]:
    """How a run's training rows differ from the probe's defaults (256-token rows, batch 16, 8 pairs,
    trained from initialisation), in words, for the names of its results: runs that differ only
    there are different runs."""
    seq_len, batch, pairs = (record.get(key, default) for key, default in
                             (("seq_len", SEQ_LEN), ("batch", BATCH), ("pairs", PAIRS)))
    changes = [f"{seq_len}-token rows"] if seq_len != SEQ_LEN else []
    changes += [f"batch {batch}"] if batch != BATCH else []
    changes += [f"{pairs} pairs"] if pairs != PAIRS else []
    stages = []  # --init-from: trained further from another run (itself perhaps a continuation)
    start = record.get("init_from")
    while start:
        stages.insert(0, f"{start.get('seq_len', SEQ_LEN)}-token rows ({start['step']} steps)")
        start = start.get("init_from")
    return changes + ([f"after {', then '.join(stages)}"] if stages else [])


def recent_loss(directory: pathlib.Path, steps: int) -> float | None:
    """Mean training loss over the last `steps` steps of a run (its metrics.jsonl; a step logged
    twice, before and after a resume, counts once, with its last value)."""
    path = directory / "metrics.jsonl"
    if not path.exists():
        return None
    by_step = {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row}
    last = max(by_step, default=0)
    recent = [loss for step, loss in by_step.items() if step > last - steps]
    return float(np.mean(recent)) if recent else None


def run_to_continue(init_from: str, variant: str, seed: int) -> str:
    """The run that --init-from names for (variant, seed): the directory itself when it is a run,
    else its <variant>/seed<k> (the --out of an earlier probe: each seed continues its own run)."""
    path = pathlib.Path(init_from)
    return str(path if (path / "config.json").exists() else path / variant / f"seed{seed}")


def initial_parameters(run_dir: str, model_config) -> tuple[dict, dict]:
    """The final parameters of a finished run to start another from (the curriculum of
    --init-from), with what identifies them: the run, its step, its rows and its parameters'
    digest. The run's model must be `model_config` (the same variant and model settings)."""
    from titans_jax.training import load_trained, model_identity

    try:
        their_config, params, meta = load_trained(run_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"--init-from {run_dir}: {error}") from None
    if model_identity(their_config) != model_identity(model_config):
        mine, theirs = model_identity(model_config), model_identity(their_config)
        differ = sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))
        raise SystemExit(f"--init-from {run_dir}: its model differs from this run's in {differ}; give the same "
                         f"variant and model --set as the run it continues")
    probe = meta.get("recall_probe", {})
    start = {"run": str(run_dir), "step": int(meta["step"]), "params_digest": params_digest(params),
             **{key: probe[key] for key in ("seq_len", "filler", "init_from") if key in probe}}
    return params, start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="lmm,swa,mac,transformer")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--gap", type=int, default=0, help="filler tokens between each key and its ':' (see recall_row)")
    parser.add_argument("--filler", default="digits",
                        help="what fills the rows in training: random digits (default) or a text haystack "
                             "(books:train, or noise / essays / books:<split>; see TextFiller)")
    parser.add_argument("--eval-filler",
                        help="what fills the evaluation rows (default: books, the held-out test split, for a "
                             "run trained on books:<split>; else the training filler)")
    parser.add_argument("--loss-on", choices=("answers", "all"), default="answers",
                        help="train on the queries' values only (default) or on every next token (the pairs' "
                             "structure then rewards layers that represent the last few tokens)")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--eval-lengths", default="",
                        help="comma-separated row lengths beyond the training length to evaluate the trained "
                             "model at too (the same pairs, a longer filler: recall at distances it never "
                             "trained on)")
    parser.add_argument("--long-eval-batches", type=int,
                        help="batches per --eval-lengths length (default: --eval-batches)")
    parser.add_argument("--long-batch", type=int,
                        help="rows per batch at the --eval-lengths lengths (default: --batch)")
    parser.add_argument("--stream-window", type=int, default=0,
                        help="stream --eval-lengths rows longer than this through the model's cache in pieces "
                             "of this many tokens (bounded memory: 256K-2M-token rows) instead of one parallel "
                             "pass (default 0: always the parallel pass)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides of the lc_<variant> configs (model., optim.)")
    parser.add_argument("--address", action="store_true",
                        help="also measure how each memory layer addresses the pairs (address_match), trained "
                             "and at a fresh initialisation")
    parser.add_argument("--init-from", metavar="RUN",
                        help="start training from the final parameters of this run (a curriculum: e.g. a run "
                             "on 256-token rows continued on longer ones), or of RUN/<variant>/seed<k> when RUN is "
                             "an earlier probe's --out; its model must be the one these settings make; the "
                             "optimiser starts afresh (warm-up included)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 steps: a smoke run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.address and args.pairs < 2:
        parser.error("--address compares each query with the other pairs' keys: it needs --pairs >= 2")
    try:
        eval_lengths = [int(text) for text in args.eval_lengths.split(",") if text.strip()]
    except ValueError:
        parser.error(f"--eval-lengths must be comma-separated integers, got {args.eval_lengths!r}")
    if args.stream_window < 0 or (args.long_batch is not None and args.long_batch < 1):
        parser.error(f"--stream-window must be >= 0 and --long-batch >= 1, got {args.stream_window} and "
                     f"{args.long_batch}")
    too_short = [length for length in eval_lengths if length < 2 * args.pairs * (PAIR + args.gap) - 1]
    if too_short:
        parser.error(f"--eval-lengths {too_short}: {args.pairs} pairs and their queries need rows of at least "
                     f"{2 * args.pairs * (PAIR + args.gap) - 1} tokens")

    eval_filler_name = args.eval_filler or ("books" if args.filler.startswith("books") else args.filler)
    if shared_text(args.filler, eval_filler_name):
        parser.error(f"--filler {args.filler} and --eval-filler {eval_filler_name} draw from the same text: the "
                     f"evaluation would read windows the model trained on; train on books:train (the default "
                     f"evaluation is the books' test split) or evaluate on another haystack")
    try:
        train_filler, eval_filler = filler_named(args.filler), filler_named(eval_filler_name)
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"--filler / --eval-filler: {error}")
    longest = max([args.seq_len, *eval_lengths]) + 1
    for name, filler, needed in ((args.filler, train_filler, args.seq_len + 1),
                                 (eval_filler_name, eval_filler, longest)):
        if filler is not None and not filler.repeating and len(filler.data) < needed:
            parser.error(f"filler {name!r} holds {len(filler.data):,} bytes, fewer than the {needed:,} of its "
                         f"longest row; choose a larger text (e.g. books:validation+test or essays)")

    from experiments.configs import apply_overrides, get_config
    from titans_jax.long_context.harness import PeakRSS
    from titans_jax.models import TitansLM
    from titans_jax.training import load_trained, train

    overrides = [f"run.steps={args.steps}", f"run.seq_len={args.seq_len}", f"run.batch_size={args.batch}",
                 "run.save_every=100", "run.log_every=10", "run.progress=false", *args.set]
    if args.quick:
        overrides += ["preset=tiny", "run.steps=2", "run.save_every=2", "run.log_every=1", "optim.warmup_steps=1"]
    out = pathlib.Path(args.out)
    results = {}
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            config = apply_overrides(get_config(f"lc_{variant}"), overrides + [f"run.seed={seed}"])
            model_config = config.model_config(vocab_size=256)
            if args.address and model_config.scan_layers:
                raise SystemExit(f"--address reads the memory layers' inputs, which a model with scanned layers "
                                 f"(scan_layers=True, lc_{variant} with these overrides) does not carry out")
            directory = out / variant / f"seed{seed}"
            print(f"[recall] {variant} seed {seed}: {config.run.steps} steps of {config.run.batch_size} x "
                  f"{config.run.seq_len}, {args.pairs} pairs per row; {directory}", flush=True)
            def batch(step, seed=seed):
                ids, mask, _ = recall_batch(seed, step, args.batch, args.seq_len, args.pairs, args.gap, train_filler)
                return ids, (mask if args.loss_on == "answers" else np.ones_like(mask))

            text = {"filler": args.filler} if train_filler is not None else {}
            initial, start = None, {}
            if args.init_from:
                initial, start = initial_parameters(run_to_continue(args.init_from, variant, seed), model_config)
            meta = {"recall_probe": {"pairs": args.pairs, "seq_len": args.seq_len, "data_seed": seed,
                                     **({"gap": args.gap} if args.gap else {}), **text,
                                     **({"loss_on": args.loss_on} if args.loss_on != "answers" else {}),
                                     **({"init_from": start} if start else {})}}
            record = {"experiment": f"recall_probe lc_{variant}", "overrides": overrides, "recall_probe": vars(args),
                      "config": dataclasses.asdict(config), "model_config": dataclasses.asdict(model_config)}
            summary = train(model_config, config.optim, config.run, directory, batch, meta=meta, run_record=record,
                            initial_params=initial)
            if summary.get("stopped_by_signal"):
                raise SystemExit("stopped; run the same command again to resume")
            model_config, params, ckpt_meta = load_trained(directory)
            window = model_config.window
            bins = distance_bins(args.seq_len, window)
            accuracy = evaluate(TitansLM(model_config), params, seed, args.eval_batches, args.batch, args.seq_len,
                                args.pairs, bins, args.gap, filler=eval_filler)
            record = {"variant": variant, "seed": seed, "step": int(ckpt_meta["step"]),
                      "params_digest": params_digest(params), "window": window,
                      "segment_size": model_config.segment_size, "pairs": args.pairs, "seq_len": args.seq_len,
                      "batch": args.batch, "gap": args.gap, "set": args.set, "loss_on": args.loss_on, **text,
                      **({"init_from": start} if start else {}),
                      **({"eval_filler": eval_filler_name} if eval_filler is not None else {}),
                      "loss_last_100_steps": recent_loss(directory, 100),
                      "accuracy_by_distance": accuracy}
            if eval_lengths:  # rows longer than any the model trained on, evaluated in one parallel pass
                batches = args.long_eval_batches or args.eval_batches
                record["accuracy_by_length"] = {}
                for length in eval_lengths:
                    started, peak = time.perf_counter(), PeakRSS()
                    with peak:
                        cells = evaluate(TitansLM(model_config), params, seed, batches, args.long_batch or args.batch,
                                         length, args.pairs, distance_bins(length, window), args.gap,
                                         args.stream_window, eval_filler)
                    record["accuracy_by_length"][str(length)] = cells
                    record.setdefault("long_eval", {})[str(length)] = {
                        "rows": batches * (args.long_batch or args.batch), "seconds": time.perf_counter() - started,
                        "peak_rss_bytes": peak.peak, "stream_window": args.stream_window if
                        0 < args.stream_window < length else None}
            if args.address:
                import jax

                ids, mask, distance = recall_batch(EVAL_SEED_OFFSET + seed, 0, args.batch, args.seq_len, args.pairs,
                                                   args.gap, eval_filler)
                model = TitansLM(model_config)
                fresh = model.init(jax.random.key(seed), ids[:1, :-1])["params"]
                record["address"] = {"trained": address_match(model, params, ids, mask, distance),
                                     "init": address_match(model, fresh, ids, mask, distance)}
                for when, layers in record["address"].items():
                    for name, cell in layers.items():
                        print(f"[recall] {variant} seed {seed} {when} {name}: own pair's key first in "
                              f"{cell['top1']:.2f} (chance {1 / args.pairs:.2f}); cosine own {cell['own']:.2f}, "
                              f"other {cell['other']:.2f}; between keys {cell['key_spread']:.2f}", flush=True)
            record = carry_over(record, directory / "recall.json")
            (directory / "recall.json").write_text(json.dumps(record, indent=1))
            results[(variant, seed)] = record
            line = ", ".join(f"{k}: {v['correct']}/{v['count']} ({v['accuracy']:.2f})" for k, v in accuracy.items())
            print(f"[recall] {variant} seed {seed} (step {record['step']}, window {window}): accuracy by distance "
                  f"in tokens: {line}", flush=True)
            for length, cells in record.get("accuracy_by_length", {}).items():
                line = ", ".join(f"{k}: {v['correct']}/{v['count']} ({v['accuracy']:.2f})" for k, v in cells.items())
                print(f"[recall] {variant} seed {seed}, rows of {length} tokens: {line}", flush=True)
    return results


if __name__ == "__main__":
    main()
