"""Is the needle's write still in the memory at the question, and what took it out? ([C2])

    python -m experiments.needle_write --run runs/lc_niah_mag_scratch_long16k/mag/seed1 \
        --lengths 16384,65536,262144 --per-cell 8 --out runs/needle_write_mag_seed1.json

experiments.needle_gates measures the forgetting gate's product between the needle and the
question. The gate is not the only thing that removes a write: every later token's inner
gradient is taken at the current weights, so it also moves the weights along what the needle
wrote (for the linear memory this is the delta rule, which overwrites along later keys), and
the momentum carries the needle's surprise on for a few tokens. This measures the net effect
by replaying each memory layer from the needle on, four times, on the layer's own inputs (its
keys, values and gates as the model computes them while the evaluation streams the prompt):

- A: as the model runs it;
- B: the needle's writes removed (theta = 0 on the needle's digits), all else as A;
- C: as A up to the needle's end, then no writes (theta = 0): only the gates act;
- D: as B up to the needle's end, then no writes.

A - B is the needle's contribution to the weights with everything that acts on it; C - D the
same with the gates and the momentum alone. The inputs of later tokens are A's in every replay
(the needle's effect on the layers' inputs is not counterfactual here). Per memory layer, with
W(t) the weights after t tokens, e the needle's last digit + 1 and q the question's first
token (|.| the Frobenius norm over the memory's layers and heads):

- retention: the gates' product from e to q (needle_gates' figure, which runs to the prompt's
  end, taken to the question; the geometric mean of heads);
- gates: |C(q) - D(q)| / |A(e) - B(e)|: what the gates and momentum leave of the write;
- kept: |A(q) - B(q)| / |A(e) - B(e)|: what is left with the later writes too;
- later writes: |A(q) - B(q)| / |C(q) - D(q)|: the later writes' factor on what the gates
  leave (1: they leave the needle's write alone; None where the gates leave exactly nothing);
- read: the same factor on what the memory returns for the needle's own keys,
  |M_A(q)(k) - M_B(q)(k)| / |M_C(q)(k) - M_D(q)(k)| over the needle's digits;
- fit at e and q: (l_B - l_A) / l_B with l the memory's loss on the needle's own (key, value)
  pairs: the share of the needle pairs' error the write removes, then at the question;
- |W(q)| / |W(e)|: how the weights' norm grows or shrinks over the haystack after the needle.

The replay A is checked against the model's own memory state at the prompt's end (the same
function on the same pieces, compiled apart; replay_gap, its relative distance, is in the rows:
experiments.stream_drift measures the model's own float32 scale for it), and after its first
piece, where it must be the model's state. With --exact the rows
get each example's exact match, as in needle_gates. Byte-level LMM / MAG / MAL / linear memory /
TTT models, as needle_gates; a BABILong-style story's needle is its answer's last mention, as there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments import needle_gates
from titans_jax import memory as memory_lib
from titans_jax.long_context import babilong

# The replay runs the memory outside the model's compiled program, so float32 rounding differs.
# After its first piece it must be the model's state (a wrong state or wrong inputs are off by
# O(1)); by the prompt's end the rounding can have grown as the model's own does between two
# window sizes (experiments.stream_drift: 1e-6 for the linear memory at 64K, 1e-2 for MAG at
# 256K, up to 0.4 for the deep LMM at 16K): replay_gap in the rows and the report. Float64: ~1e-14.
FIRST_PIECE_TOLERANCE = 1e-4
REPLAYS = ("A", "B", "C", "D")  # (needle written, writes after the needle) = (1, 1), (0, 1), (1, 0), (0, 0)


@functools.partial(jax.jit, static_argnames="config")
def _advance(params, state, inputs, config):
    """The memory state after `inputs` (keys, values, queries, theta, log_eta, log_keep of one
    piece, batch axis dropped), from `state`."""
    batched = tuple(None if x is None else x[None] for x in inputs)
    return memory_lib.memory_apply(params, *batched, config, state)[1]


def _read(params, weights, keys, config):
    """M(k) per head: weights per layer {"w": [1, H, I, O], ...}, keys [H, n, K] -> [H, n, V]."""
    norm = params.get("norm")
    per_head = jax.vmap(lambda w, n, k: memory_lib.memory_mlp(w, n, k, config),
                        in_axes=(0, None if norm is None else 0, 0))
    return per_head(jax.tree.map(lambda leaf: leaf[0], weights), norm, keys)


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(leaf, np.float64))) for leaf in jax.tree.leaves(tree))))


def _difference(a, b):
    return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def _relative_gap(mine, model) -> float:
    return _norm(_difference(mine, model)) / _norm(model)


def _check_first_piece(path: str, weights, cache) -> None:
    """The replay A after its first piece against the model's memory state there."""
    index = int(path.split("/")[0].removeprefix("block_"))
    gap = _relative_gap(weights, cache["layers"][index]["memory"].memory.weights)
    if not gap < FIRST_PIECE_TOLERANCE:
        raise AssertionError(f"{path}: the replay is {gap:.2e} (relative) from the model's memory state after "
                             "its first piece: not the model's memory")


def write_figures(params, config, at_end: dict, at_question: dict, keys, values) -> dict:
    """The figures of one memory layer from the replays' weights after the needle (A, B) and at
    the question (A-D), and the needle's keys / values [H, n, K]."""
    weights_e, weights_q = at_end, at_question
    write = _norm(_difference(weights_e["A"], weights_e["B"]))
    if write == 0.0:
        raise ValueError("the needle's write is zero (theta = 0 on its digits?): nothing to follow")
    net = _norm(_difference(weights_q["A"], weights_q["B"]))
    gated = _norm(_difference(weights_q["C"], weights_q["D"]))

    def read_gap(weights, first, second):
        return float(np.linalg.norm(np.asarray(_read(params, weights[first], keys, config), np.float64)
                                    - np.asarray(_read(params, weights[second], keys, config), np.float64)))

    def fit(weights):
        loss = {name: float(np.sum(np.square(np.asarray(_read(params, weights[name], keys, config), np.float64)
                                             - np.asarray(values, np.float64)))) for name in ("A", "B")}
        return (loss["B"] - loss["A"]) / loss["B"]

    gated_read = read_gap(weights_q, "C", "D")  # 0 where the gates leave nothing (MAL's saturated layers)
    return {"gates": gated / write, "kept": net / write, "later_writes": net / gated if gated else None,
            "read": read_gap(weights_q, "A", "B") / gated_read if gated_read else None,
            "fit_end": fit(weights_e), "fit_question": fit(weights_q),
            "norm_growth": _norm(weights_q["A"]) / _norm(weights_e["A"])}


def example_figures(stream: needle_gates.GateStream, config, example) -> dict:
    """{memory layer path: write_figures + retention} for one example."""
    from titans_jax.data.tokenizers import ByteTokenizer

    ids = ByteTokenizer().encode(example.prompt)
    start, end = needle_gates.needle_span(example.prompt, example.answer, needle_gates.answer_sentence(example))
    question = len(example.prompt[:example.context_chars[1]].encode("utf-8"))
    if not 0 < start < end < question < ids.size:
        raise ValueError(f"needle [{start}, {end}), question at {question}, prompt of {ids.size} tokens: "
                         "expected the needle, then the question, then the prompt's end")
    memory_config = config.memory_layer.resolve().memory_config
    replays, at_end, at_question, needle, gates = {}, {}, {}, {}, {}
    offset = 0
    for stop, cache, layers in stream.stream(ids, cuts=(start, end, question)):
        for path, inputs in layers:
            gates.setdefault(path, []).append((np.asarray(inputs[3]),
                                               None if inputs[5] is None else np.asarray(inputs[5])))
            if offset < start:
                continue
            block, name = path.split("/")
            params = stream.params[block][name]["memory"]
            if offset == start:
                replays[path] = dict.fromkeys(REPLAYS, cache_before[block])
            if stop <= end:
                needle.setdefault(path, []).append((inputs[0], inputs[1]))
            silent = inputs[:3] + (jnp.zeros_like(inputs[3]),) + inputs[4:]
            for replay in REPLAYS if offset < question else ("A",):
                writes = replay in ("A", "C") if stop <= end else replay in ("A", "B")
                replays[path][replay] = _advance(params, replays[path][replay], inputs if writes else silent,
                                                 memory_config)
            if offset == start:
                _check_first_piece(path, replays[path]["A"].weights, cache)
            if stop == end:
                at_end[path] = {replay: replays[path][replay].weights for replay in ("A", "B")}
            if stop == question:
                at_question[path] = {replay: state.weights for replay, state in replays[path].items()}
        if stop == start:
            cache_before = {f"block_{index}": layer["memory"].memory for index, layer in enumerate(cache["layers"])
                            if "memory" in layer}
        offset = stop
    figures = {}
    for index, layer in enumerate(cache["layers"]):  # the model's own state after the prompt
        path = f"block_{index}/memory"
        if path not in replays:
            continue
        gap = _relative_gap(replays[path]["A"].weights, layer["memory"].memory.weights)
        keys, values = (np.concatenate([np.asarray(piece[part]) for piece in needle[path]], axis=1) for part in (0, 1))
        block, name = path.split("/")
        figures[path] = write_figures(stream.params[block][name]["memory"], memory_config, at_end[path],
                                      at_question[path], keys, values)
        theta = np.concatenate([piece[0] for piece in gates[path]], axis=-1)[:, :question]
        keep = None if gates[path][0][1] is None else np.concatenate([p[1] for p in gates[path]], axis=-1)[:, :question]
        figures[path]["retention"] = needle_gates.layer_figures(theta, keep, start, end)["retention"]
        figures[path]["replay_gap"] = gap
    return figures


def run(run_dir, task: str, lengths, depth: float, per_cell: int, seed: int, window: int = 4096,
        changes: dict | None = None) -> list[dict]:
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.long_context import make_examples
    from titans_jax.long_context.training_mix import check_eval_seeds

    check_eval_seeds(range(seed, seed + per_cell))
    config, params, meta, model = needle_gates.load_streamable(run_dir, changes)
    if config.lmm.local_period:
        raise SystemExit("TNT's local memory is not replayed here: models without it only")
    stream = needle_gates.GateStream(model, params, window)
    rows = []
    for example in make_examples(task, lengths, (depth,), per_cell, seed, ByteTokenizer()):
        rows.append({"task": task, "length": example.length, "seed": example.seed, "depth": depth,
                     "answer": example.answer, "step": int(meta["step"]),
                     "layers": example_figures(stream, config, example)})
    return rows


COLUMNS = (("retention", ".2g"), ("gates", ".2g"), ("kept", ".2g"), ("later_writes", ".2g"), ("read", ".2g"),
           ("fit_end", ".2g"), ("fit_question", ".2g"), ("norm_growth", ".3g"), ("replay_gap", ".1e"))


def report(rows: list[dict]) -> str:
    lines = ["| length | layer | " + " | ".join(name.replace("_", " ") for name, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for length in sorted({row["length"] for row in rows}):
        group = [row for row in rows if row["length"] == length]
        for layer in group[0]["layers"]:
            cells = []
            for name, fmt in COLUMNS:
                values = [row["layers"][layer][name] for row in group if row["layers"][layer][name] is not None]
                if not values:  # the gates left nothing of the write in any example
                    cells.append("undefined")
                    continue
                low, middle, high = (format(value, fmt) for value in (min(values), np.median(values), max(values)))
                some = f" ({len(values)} of {len(group)})" if len(values) < len(group) else ""
                cells.append(f"{middle} [{low}, {high}]{some}")
            lines.append(f"| {length:,} | {layer} | " + " | ".join(cells) + " |")
    if "exact" in rows[0]:
        lines += ["", "| length | layer | later writes, right answers | wrong answers |", "|---|---|---|---|"]
        for length in sorted({row["length"] for row in rows}):
            group = [row for row in rows if row["length"] == length]
            for layer in group[0]["layers"]:
                cells = []
                for part in ([row for row in group if row["exact"]], [row for row in group if not row["exact"]]):
                    values = [row["layers"][layer]["later_writes"] for row in part
                              if row["layers"][layer]["later_writes"] is not None]
                    cells.append(f"{len(part)}: {np.median(values):.2g} [{min(values):.2g}, {max(values):.2g}]"
                                 if values else f"{len(part)}")
                lines.append(f"| {length:,} | {layer} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    return needle_gates.cli(__doc__, run, report, argv, per_cell=8,
                            exact_help=" and the later writes' factor on right against wrong answers",
                            tasks=("niah_single_1", "niah_single_2", *babilong.QA_TASKS))


if __name__ == "__main__":
    main()
