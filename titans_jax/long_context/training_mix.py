"""Training data for the long-context tasks: task examples trained on their answers, mixed with
plain language-model windows (issue [C2]).

    from titans_jax.long_context.training_mix import TaskMixture, task_window
    ids, mask = task_window("niah_single_1", 1024, seed=TRAIN_SEED_OFFSET)   # [1025], [1024]
    mixture = TaskMixture(books.batch, batch_size=8, seq_len=1024, task_fraction=0.5, seed=0)
    ids, mask = mixture(step)      # a pure function of (seed, step): titans_jax.training.train's
                                   # train_batch, with the loss on the marked targets only

A task window is one example of a task (titans_jax.long_context.tasks) followed by its answer,
and its mask marks only the answer's targets: the model learns to answer, not to predict the
haystack. By default the example fills the window (`seq_len + 1` tokens in all, exactly with the
byte tokenizer); with `prompt_length` it is shorter and the rest of the window is zeros, outside
the mask (causal models never see them before the answer). TaskMixture(prompt_lengths="uniform")
draws that length per row, uniformly between the task's template minimum (`min_length`) and the
full window, and fills the rest with language-model text (still outside the mask): with a single length per task a Transformer++ learned to answer at that *position*
and not after the question (it copied the needle 20/20 at its training prompt length and 0/20
seven tokens earlier; experiments/results/long_context_probe_cpu.md). The answer is written `answer_text(answer)` = " {answer}.\\n":
after the niah answer prefix ("... mentioned in the provided text is") and after a BABILong
question alike; the evaluation harness stops at the newline and scores with RULER's
string_match_all / BABILong's first-sentence match, both of which this form satisfies.

Nothing the evaluation uses is trained on:
- haystacks: the books' train split (the evaluation uses the books' test split and the essays)
  and, for niah_single_1, RULER's noise block (the same meaningless sentences by definition);
- needles and stories: a task example's key / value / story is a function of (task, seed) only,
  and training draws seeds from TRAIN_SEED_OFFSET up, far above any evaluation seed
  (`check_eval_seeds` refuses evaluation seeds that reach it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import numpy as np

from titans_jax.data.tokenizers import ByteTokenizer
from titans_jax.long_context.haystacks import Haystack, get_haystack
from titans_jax.long_context.tasks import GENERATOR_VERSION, QA_TASKS, TASKS, example_answer, make_example, min_length

TRAIN_SEED_OFFSET = 1_000_000_000  # training examples' seeds start here; evaluation seeds stay below
TRAIN_HAYSTACK = {task: "books:train" for task in TASKS}
TRAIN_HAYSTACK["niah_single_1"] = "noise"  # RULER's niah_single_1 is defined on the noise block


def answer_text(answer: str) -> str:
    """What the model is trained to write after a task prompt."""
    return f" {answer}.\n"


def check_eval_seeds(seeds: Sequence[int]) -> None:
    """Evaluation examples must not share a needle or story with training examples."""
    bad = [seed for seed in seeds if seed >= TRAIN_SEED_OFFSET]
    if bad:
        raise ValueError(f"evaluation seeds {bad[:3]} reach TRAIN_SEED_OFFSET = {TRAIN_SEED_OFFSET}: their needles "
                         "or stories could have been trained on; use smaller seeds")


def task_window(task: str, seq_len: int, seed: int, tokenizer=None, haystack: Haystack | str | None = None,
                depth=None, prompt_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [seq_len + 1], mask bool [seq_len]) of one example of `task` with its answer;
    mask[t] is True where ids[t + 1] is an answer token. depth as in make_example (None: a
    RULER depth drawn from the seed for niah, facts anywhere for qa). prompt_length: the
    example's length in tokens (None: the whole window less the answer: seq_len + 1 - len(answer));
    the window's tail after the answer is zeros, not in the mask."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    tokenizer = tokenizer or ByteTokenizer()
    haystack = haystack or TRAIN_HAYSTACK[task]
    # The needle / story depends on (task, seed) only, so the answer is known before the prompt.
    answer = example_answer(task, seed)
    target = np.asarray(tokenizer.encode(answer_text(answer)), np.int32)
    longest = seq_len + 1 - len(target)
    if prompt_length is None:
        prompt_length = longest
    elif not 0 < prompt_length <= longest:
        raise ValueError(f"{task}: prompt_length {prompt_length} does not fit a {seq_len}-token window with its "
                         f"{len(target)}-token answer (at most {longest})")
    example = make_example(task, int(prompt_length), depth, seed, tokenizer, haystack)
    if example.answer != answer:  # the generator's contract; a silent mismatch would train nonsense
        raise AssertionError(f"{task} seed {seed}: example_answer {answer!r} but the example says {example.answer!r}")
    prompt = np.asarray(tokenizer.encode(example.prompt), np.int32)
    ids = np.zeros(seq_len + 1, np.int32)
    mask = np.zeros(seq_len, bool)
    ids[:len(prompt)] = prompt
    ids[len(prompt):len(prompt) + len(target)] = target
    mask[len(prompt) - 1:len(prompt) - 1 + len(target)] = True  # targets ids[len(prompt) ...]
    return ids, mask


class TaskMixture:
    """train_batch(step) -> (ids int32 [B, T + 1], mask bool [B, T]) for titans_jax.training.train.

    Each row is, with probability `task_fraction`, a task window of a task drawn uniformly from
    `tasks` (loss on the answer only), else row r of `lm_batch(step)` (plain language modelling,
    every target counted). A pure function of (seed, step): a resumed run sees the same data.

    answer_weight: "token" (default) -- a bool mask, every counted target weighs the same (the ~10
    answer bytes of a row are then ~1% of a 1,024-byte batch's targets); "row" -- the mask is
    float32 and each answer target weighs seq_len / (answer length), so that a task row counts as
    much as a language-model row. "row" is the more sensible objective, but with today's memory
    gradient spikes it drove a mini MAC to NaN within 95 steps
    (experiments/results/long_context_probe_cpu.md), so it is not the default yet.
    prompt_lengths: "full" (default) -- every task example fills its row, so its question ends at
    the same position in every row; "uniform" -- each row's prompt length is drawn uniformly from
    [min_length(task, seed), the full row] (a function of (seed, step, row)); the rest of the row
    is the start of that row's language-model window, outside the mask (natural text rather than
    a run of one token; for a causal model it cannot change the answer's loss or gradient).
    full_steps: with "uniform", batches of steps < full_steps still use full-length prompts (a
    curriculum: a fixed answer position first, where a Transformer++ formed the copy mechanism
    by step ~900 and did not within 1,500 steps of drawn lengths; then drawn lengths, so that
    the answer's position is not what is learnt). 0 (default): drawn lengths from the start.
    qa_span: where a qa row's story lies. "whole" (default) -- its facts anywhere in the context,
    as the evaluation draws them; "drawn" -- in the last fraction w of the context, w uniform in
    [0, 1) per row (a function of (seed, step, row)): the story as often right before the question
    (w ~ 0: contiguous there, inside a local window) as spread over the whole row. On qa1 alone the
    LMM learnt to answer the last place mentioned, not the asked person's
    (experiments/results/long_context_niah_cpu.md); near stories are where binding the place to
    the person should be learnt first (tried there once: SWA learnt to read the near stories,
    neither it nor the LMM bound the place to the person). niah rows are unchanged.
    Task seeds are TRAIN_SEED_OFFSET + a counter over (step, row), so no two training examples
    share a needle and none shares one with an evaluation example."""

    def __init__(self, lm_batch: Callable[[int], np.ndarray], batch_size: int, seq_len: int,
                 tasks: Sequence[str] = TASKS, task_fraction: float = 0.5, seed: int = 0, tokenizer=None,
                 answer_weight: str = "token", prompt_lengths: str = "full", full_steps: int = 0,
                 qa_span: str = "whole"):
        unknown = [task for task in tasks if task not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown tasks {unknown} (or none); expected a subset of {TASKS}")
        if not 0.0 <= task_fraction <= 1.0:
            raise ValueError(f"task_fraction must be in [0, 1], got {task_fraction}")
        if answer_weight not in ("row", "token"):
            raise ValueError(f"answer_weight must be 'row' or 'token', got {answer_weight!r}")
        if prompt_lengths not in ("full", "uniform"):
            raise ValueError(f"prompt_lengths must be 'full' or 'uniform', got {prompt_lengths!r}")
        if int(full_steps) != full_steps or full_steps < 0:
            raise ValueError(f"full_steps must be an integer >= 0, got {full_steps!r}")
        if full_steps and prompt_lengths != "uniform":
            raise ValueError(f"full_steps={full_steps} switches from full to drawn prompt lengths: it needs "
                             f"prompt_lengths='uniform', got {prompt_lengths!r}")
        if qa_span not in ("whole", "drawn"):
            raise ValueError(f"qa_span must be 'whole' or 'drawn', got {qa_span!r}")
        if qa_span != "whole" and not any(task in QA_TASKS for task in tasks):
            raise ValueError(f"qa_span={qa_span!r} places the qa stories' facts, but no qa task is among "
                             f"{tuple(tasks)}")
        self.answer_weight, self.prompt_lengths, self.full_steps = answer_weight, prompt_lengths, int(full_steps)
        self.qa_span = qa_span
        self.lm_batch, self.batch_size, self.seq_len = lm_batch, int(batch_size), int(seq_len)
        self.tasks, self.task_fraction, self.seed = tuple(tasks), float(task_fraction), int(seed)
        self.tokenizer = tokenizer or ByteTokenizer()
        self.haystacks = {name: get_haystack(name) for name in {TRAIN_HAYSTACK[task] for task in self.tasks}}

    def rows(self, step: int) -> list[str | None]:
        """The task of each row of batch `step` (None: a language-model row)."""
        rng = np.random.default_rng([self.seed, int(step), 0x7A5C])
        is_task = rng.random(self.batch_size) < self.task_fraction
        picks = rng.integers(0, len(self.tasks), self.batch_size)
        return [self.tasks[p] if t else None for t, p in zip(is_task, picks, strict=True)]

    def example_seed(self, step: int, row: int) -> int:
        return TRAIN_SEED_OFFSET + (self.seed * 1_000_003 + int(step)) * self.batch_size + row

    def prompt_length(self, task: str, step: int, row: int) -> int | None:
        """The prompt length of task row `row` of batch `step` (None: the full row)."""
        if self.prompt_lengths == "full" or step < self.full_steps:
            return None
        seed = self.example_seed(step, row)
        target = len(self.tokenizer.encode(answer_text(example_answer(task, seed))))
        lo = min_length(task, seed, tokenizer=self.tokenizer, haystack=self.haystacks[TRAIN_HAYSTACK[task]])
        hi = self.seq_len + 1 - target
        if lo > hi:
            raise ValueError(f"{task} seed {seed}: its template alone is {lo} tokens, longer than a {self.seq_len}-"
                             f"token row leaves for the prompt ({hi}); use a longer run.seq_len or fewer tasks")
        return int(np.random.default_rng([self.seed, int(step), row, 0x1E6]).integers(lo, hi + 1))

    def depth(self, task: str, step: int, row: int) -> tuple[float, float] | None:
        """The depth window of task row `row` of batch `step` (None: the task's default, make_example's)."""
        if self.qa_span == "whole" or task not in QA_TASKS:
            return None
        width = float(np.random.default_rng([self.seed, int(step), row, 0x5BA]).random())
        return (1.0 - width, 1.0)

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        lm = np.asarray(self.lm_batch(step))
        if lm.shape != (self.batch_size, self.seq_len + 1):
            raise ValueError(f"lm_batch({step}) gave shape {lm.shape}, expected {(self.batch_size, self.seq_len + 1)}")
        ids = lm.astype(np.int32).copy()
        by_row = self.answer_weight == "row"
        mask = np.ones((self.batch_size, self.seq_len), np.float32 if by_row else bool)
        for row, task in enumerate(self.rows(step)):
            if task is not None:
                ids[row], answer = task_window(task, self.seq_len, self.example_seed(step, row), self.tokenizer,
                                               self.haystacks[TRAIN_HAYSTACK[task]],
                                               depth=self.depth(task, step, row),
                                               prompt_length=self.prompt_length(task, step, row))
                mask[row] = answer * (self.seq_len / answer.sum()) if by_row else answer
                end = int(np.flatnonzero(answer)[-1]) + 2  # ids[end:] follow the answer
                ids[row, end:] = lm[row, :self.seq_len + 1 - end]  # natural text, masked
        return ids, mask

    @property
    def fingerprint(self) -> str:
        """What defines the stream (store it in checkpoints' meta: a resume on other data is refused)."""
        spec = {"tasks": self.tasks, "task_fraction": self.task_fraction, "seed": self.seed,
                "answer_weight": self.answer_weight,
                **({"prompt_lengths": self.prompt_lengths} if self.prompt_lengths != "full" else {}),
                **({"full_steps": self.full_steps} if self.full_steps else {}),
                **({"qa_span": self.qa_span} if self.qa_span != "whole" else {}),
                "seq_len": self.seq_len, "batch_size": self.batch_size, "generator": GENERATOR_VERSION,
                "haystacks": {name: stack.fingerprint for name, stack in sorted(self.haystacks.items())},
                "tokenizer": getattr(self.tokenizer, "fingerprint", repr(self.tokenizer))}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
