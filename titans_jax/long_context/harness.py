"""Streaming evaluation of long-context examples through a Titans language model.

    runner = StreamingRunner(model, params, window=4096)
    answer_ids, stats = runner.answer(prompt_ids, max_new_tokens=16)
    scores = runner.continuation_logprobs(prompt_ids, [ids_a, ids_b])   # log p(each | prompt)

The prompt goes through `model.apply(params, tokens, cache, logits_at=...)` in windows of
`window` tokens (the cache carries everything: memory state, conv states, sliding-window keys, MAC
segment buffers), with logits only for the last position of the last window, so a 2M-token
context never materialises [T, V] logits. The remainder shorter than a window is fed in pieces of
power-of-two lengths, so at most log2(window) + 1 programs are compiled whatever the example
lengths. The answer is then decoded greedily one token per call. The window size changes nothing
but speed and memory: any split of a sequence into calls gives the logits of one pass.

Memory: `PeakRSS` samples the process's resident set (/proc/self/statm) in a thread while an
example runs; with a bounded-state model (every architecture but full attention) the peak stays
flat in the context length, the prompt's ids (4 bytes a token) aside.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from titans_jax.long_context import tasks as tasks_lib
from titans_jax.models import TitansLM, full_attention_capacity, init_cache


def rss_bytes() -> int:
    """The current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRSS:
    """Context manager: the peak resident set size while it is open, sampled every `interval`
    seconds in a thread (and at entry and exit)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def tree_bytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def window_pieces(length: int, window: int) -> list[int]:
    """Lengths of the calls that feed `length` tokens: full windows, then the remainder as powers
    of two (largest first), so that few distinct shapes are ever compiled."""
    if length < 1:
        raise ValueError(f"nothing to stream: length {length}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    pieces = [window] * (length // window)
    rest = length % window
    bit = 1 << max(rest.bit_length() - 1, 0)
    while rest:
        if rest >= bit:
            pieces.append(bit)
            rest -= bit
        bit >>= 1
    return pieces


@dataclasses.dataclass
class StreamStats:
    tokens: int
    calls: int
    stream_seconds: float
    decode_seconds: float
    cache_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.stream_seconds, 1e-9)


class StreamingRunner:
    """Streams prompts through `model` (batch 1) and decodes answers greedily; the jitted call is
    shared by every example (one program per distinct call length)."""

    def __init__(self, model: TitansLM, params, window: int = 4096):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.model, self.params, self.window = model, params, window
        self._call = jax.jit(
            lambda params, tokens, cache, logits_at: model.apply({"params": params}, tokens, cache,
                                                                 logits_at=logits_at),
            static_argnames=("logits_at",))
        # The empty cache runs the persistent prefix through the model: eagerly, op by op, that
        # was ~6 s an example on a shared core, 50x the streaming of a 1K-token prompt. Compiled
        # once; a bounded cache (every architecture but full attention) is the same every example.
        self._init_cache = jax.jit(lambda params, max_len: init_cache(model, params, 1, max_len), static_argnums=1)
        self._empty = None

    def warm_up(self, lengths: Iterable[int], max_new_tokens: int = 1) -> float:
        """Compile every call shape that prompts of these lengths (and decoding) will use, so
        that timings measure streaming, not compilation; returns the seconds it took."""
        start = time.perf_counter()
        pieces = sorted({piece for length in lengths for piece in window_pieces(length, self.window)} | {1})
        max_len = max(lengths) + max_new_tokens if self.model.config.arch == "transformer" else None
        cache = self.empty_cache(max_len)
        for piece in pieces:
            for logits_at in ("none", "last"):
                jax.block_until_ready(self._call.lower(
                    self.params, jnp.zeros((1, piece), jnp.int32), cache, logits_at).compile())
        return time.perf_counter() - start

    def empty_cache(self, max_len: int | None = None):
        """The cache before the first token (batch 1). Full attention (max_len, the tokens it must
        hold) gets a capacity rounded up, so that prompts of nearby lengths share the compiled
        programs: to a power of two up to the window (at most 2x the keys a short prompt needs,
        masked out), beyond it to a multiple of the window (at most one window more)."""
        if max_len is None:
            if self._empty is None:
                self._empty = self._init_cache(self.params, None)
            return self._empty
        if max_len <= self.window:
            capacity = 1 << (max_len - 1).bit_length()
        else:
            capacity = -(-max_len // self.window) * self.window
        return self._init_cache(self.params, capacity)

    def prefill(self, ids: np.ndarray, max_new_tokens: int = 0) -> tuple[jax.Array, Any, StreamStats]:
        """(next-token logits [V], cache, stats) after streaming `ids` [T] from an empty cache."""
        ids = np.asarray(ids, np.int32).reshape(-1)
        vocab = self.model.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}); got [{ids.min()}, {ids.max()}]")
        max_len = None
        if self.model.config.arch == "transformer":  # full attention: the cache holds every key
            max_len = ids.size + max_new_tokens
        cache = self.empty_cache(max_len)
        capacity = full_attention_capacity(self.model.config, cache) if max_len is not None else None
        if capacity is not None and ids.size + max_new_tokens > capacity:
            raise ValueError(f"{ids.size} + {max_new_tokens} tokens exceed the full-attention cache of {capacity}")
        start, offset, calls = time.perf_counter(), 0, 0
        pieces = window_pieces(ids.size, self.window)
        logits = None
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            logits, cache = self._call(self.params, jnp.asarray(ids[None, offset:offset + piece]), cache,
                                       "last" if last else "none")
            offset += piece
            calls += 1
        logits = jax.block_until_ready(logits)[0, -1]
        stats = StreamStats(tokens=int(ids.size), calls=calls, stream_seconds=time.perf_counter() - start,
                            decode_seconds=0.0, cache_bytes=tree_bytes(cache))
        return logits, cache, stats

    def continuation_logprobs(self, ids: np.ndarray, continuations: Sequence[Sequence[int]]) -> list[float]:
        """log p(continuation | prompt `ids`) (natural log, summed over its tokens) of each
        continuation, teacher-forced: the prompt is streamed once and every continuation is fed
        token by token from that same cache (a cache is a value: feeding one does not change it)."""
        if not continuations or any(len(c) == 0 for c in continuations):
            raise ValueError("continuation_logprobs needs at least one continuation, none of them empty")
        vocab = self.model.config.vocab_size
        if any(not 0 <= token < vocab for c in continuations for token in c):
            raise ValueError(f"continuation token ids must be in [0, {vocab})")
        logits, cache, _ = self.prefill(ids, max(len(c) for c in continuations))
        first = jax.nn.log_softmax(logits)
        scores = []
        for continuation in continuations:
            total, state = float(first[continuation[0]]), cache
            for previous, token in zip(continuation[:-1], continuation[1:]):
                step, state = self._call(self.params, jnp.asarray([[previous]], jnp.int32), state, "last")
                total += float(jax.nn.log_softmax(step[0, -1])[token])
            scores.append(total)
        return scores

    def answer(self, ids: np.ndarray, max_new_tokens: int,
               stop: Callable[[list[int]], bool] | None = None) -> tuple[list[int], StreamStats]:
        """Greedy continuation (at most max_new_tokens ids) of the prompt `ids`; `stop(generated)`
        ends it early (e.g. at a newline)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        logits, cache, stats = self.prefill(ids, max_new_tokens)
        start = time.perf_counter()
        generated: list[int] = []
        while True:
            token = int(jnp.argmax(logits))
            generated.append(token)
            if len(generated) >= max_new_tokens or (stop is not None and stop(generated)):
                break
            logits, cache = self._call(self.params, jnp.asarray([[token]], jnp.int32), cache, "last")
            logits = logits[0, -1]
        stats.decode_seconds = time.perf_counter() - start
        return generated, stats


def score_row(task: str, answer: str, output: str) -> float:
    """RULER's string_match_all for niah tasks, BABILong's first-sentence match for qa tasks."""
    if task in tasks_lib.NIAH_TASKS:
        return tasks_lib.string_match_all(output, [answer])
    if task in tasks_lib.QA_TASKS:
        return tasks_lib.babilong_match(output, answer)
    raise ValueError(f"unknown task {task!r}; expected one of {tasks_lib.TASKS}")


ANSWER_TOKENS = {"niah_single_1": 12, "niah_single_2": 12, "niah_single_3": 44}  # qa: 24


def evaluate_rows(runner: StreamingRunner, rows: Iterable[dict], tokenizer, progress: bool = True) -> list[dict]:
    """Each row (an Example as a dict, or a row of an evaluation set) streamed and answered:
    the row's key fields, the output text, the score, time, peak RSS and cache size."""
    rows = list(rows)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), unit="example", dynamic_ncols=True)
    results = []
    newline = tokenizer.encode("\n")
    for row in rows:
        task = _text(row["task"])
        ids = np.asarray(tokenizer.encode(_text(row["prompt"])), np.int32)
        budget = ANSWER_TOKENS.get(task, 24)
        with PeakRSS() as rss:
            generated, stats = runner.answer(
                ids, budget, stop=lambda out: len(out) > 1 and out[-len(newline):] == newline)
        output = tokenizer.decode(generated)
        answer = _text(row["answer"])
        results.append({
            "key": _text(row.get("key", "")), "task": task, "length": int(row["length"]),
            "depth": _depth(row), "seed": int(row["seed"]), "answer": answer, "output": output,
            "score": score_row(task, answer, output), "tokens": stats.tokens,
            "stream_seconds": stats.stream_seconds, "decode_seconds": stats.decode_seconds,
            "tokens_per_second": stats.tokens_per_second, "peak_rss_bytes": rss.peak,
            "cache_bytes": stats.cache_bytes,
        })
        if bar is not None:
            bar.update(1)
            bar.set_postfix(task=task, length=int(row["length"]), acc=f"{np.mean([r['score'] for r in results]):.2f}")
    if bar is not None:
        bar.close()
    return results


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _depth(row) -> float | None:
    if "depth" in row:
        depth = row["depth"]
        return None if depth is None else float(depth) if np.isscalar(depth) else float(np.mean(depth))
    lo, hi = float(row["depth_lo"]), float(row["depth_hi"])
    return None if np.isnan(lo) else (lo + hi) / 2


def example_row(example: tasks_lib.Example) -> dict:
    depth = example.depth
    return {"key": tasks_lib.example_key(example.task, example.requested_length, depth, example.seed),
            "task": example.task, "prompt": example.prompt, "answer": example.answer,
            "length": example.length, "seed": example.seed,
            "depth": None if depth is None else float(np.mean(depth))}


def accuracy_table(results: list[dict]) -> dict[str, dict[int, tuple[float, int]]]:
    """task -> length -> (mean score, count)."""
    table: dict[str, dict[int, list[float]]] = {}
    for r in results:
        table.setdefault(r["task"], {}).setdefault(r["length"], []).append(r["score"])
    return {task: {length: (float(np.mean(s)), len(s)) for length, s in sorted(by.items())}
            for task, by in sorted(table.items())}


def format_table(results: list[dict]) -> str:
    """A RULER-style table: accuracy (%) per task (rows) and length (columns), with counts."""
    table = accuracy_table(results)
    lengths = sorted({length for by in table.values() for length in by})
    lines = ["| task | " + " | ".join(f"{length:,}" for length in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for task, by in table.items():
        cells = [f"{100 * by[length][0]:.1f} (n={by[length][1]})" if length in by else "" for length in lengths]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_heatmap(results: list[dict], task: str, path, title: str | None = None) -> None:
    """The classic needle-in-a-haystack picture for one task: accuracy by depth (rows) and
    context length (columns), each cell annotated with its percentage and number of examples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["task"] == task and r["depth"] is not None]
    if not rows:
        raise ValueError(f"no results with a depth for task {task!r}")
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({round(r["depth"], 4) for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    counts = np.zeros((len(depths), len(lengths)), int)
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            scores = [r["score"] for r in rows if round(r["depth"], 4) == depth and r["length"] == length]
            if scores:
                grid[i, j], counts[i, j] = np.mean(scores), len(scores)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(lengths), 1.4 + 0.45 * len(depths)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i, j in zip(*np.nonzero(counts)):
        ax.text(j, i, f"{100 * grid[i, j]:.0f}\n(n={counts[i, j]})", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(lengths)), [f"{length:,}" for length in lengths], rotation=45, ha="right")
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (model tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or task, fontsize=7 if title else None)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["ANSWER_TOKENS", "PeakRSS", "StreamStats", "StreamingRunner", "accuracy_table", "evaluate_rows",
           "example_row", "format_table", "plot_heatmap", "rss_bytes", "score_row", "tree_bytes", "window_pieces"]

