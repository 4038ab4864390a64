"""Training data for the long-context tasks: task windows with the loss on their answers, the
mixture with language-model windows, and the separation from evaluation data."""

import random

import numpy as np
import pytest

from titans_jax.long_context import TASKS, make_example, text_haystack
from titans_jax.long_context.babilong import format_prompt
from titans_jax.long_context.tasks import example_answer, example_story, min_length
from titans_jax.long_context import haystacks as haystacks_lib
from titans_jax.long_context.training_mix import (
    TRAIN_HAYSTACK,
    TRAIN_SEED_OFFSET,
    TaskMixture,
    answer_text,
    check_eval_seeds,
    task_window,
)


def _documents(num_docs=12, sentences=60):
    rng = random.Random(99)
    words = ["harbour", "candle", "meadow", "naïve", "bridge", "letter", "Zoë", "winter"]
    return [(f"train/doc{d:02d}", " ".join(f"Doc {d} line {s} holds {' '.join(rng.choice(words) for _ in range(6))}."
                                            for s in range(sentences))) for d in range(num_docs)]


@pytest.fixture(scope="module")
def haystack():
    return text_haystack("train-fixture", _documents())


@pytest.mark.parametrize("task", TASKS)
def test_a_task_window_is_the_example_then_its_answer_and_only_the_answer_is_trained(task, haystack):
    seq_len, seed = 1200, TRAIN_SEED_OFFSET + 17
    stack = "noise" if task == "niah_single_1" else haystack
    ids, mask = task_window(task, seq_len, seed, haystack=stack)
    assert ids.shape == (seq_len + 1,) and ids.dtype == np.int32 and mask.shape == (seq_len,) and mask.dtype == bool
    target = answer_text(example_answer(task, seed)).encode()
    example = make_example(task, seq_len + 1 - len(target), None, seed, haystack=stack)
    assert bytes(ids.tolist()) == example.prompt.encode() + target  # exactly seq_len + 1 bytes, no padding
    assert bytes(ids[1:][mask].tolist()) == target  # the masked targets are the answer, nothing else
    assert np.flatnonzero(mask).tolist() == list(range(seq_len - len(target), seq_len))


def test_a_shorter_prompt_puts_the_answer_earlier_and_masks_the_zero_tail(haystack):
    seq_len, seed = 1200, TRAIN_SEED_OFFSET + 5
    target = answer_text(example_answer("qa1", seed)).encode()
    shortest = min_length("qa1", seed, haystack=haystack)
    assert 0 < shortest < 1000
    for length in (shortest, 777, seq_len + 1 - len(target)):
        ids, mask = task_window("qa1", seq_len, seed, haystack=haystack, prompt_length=length)
        prompt = make_example("qa1", length, None, seed, haystack=haystack).prompt.encode()
        assert len(prompt) == length
        assert bytes(ids[:length + len(target)].tolist()) == prompt + target
        assert not ids[length + len(target):].any()
        assert np.flatnonzero(mask).tolist() == list(range(length - 1, length - 1 + len(target)))
    with pytest.raises(ValueError, match="shorter than the template"):
        task_window("qa1", seq_len, seed, haystack=haystack, prompt_length=shortest - 1)
    with pytest.raises(ValueError, match="does not fit"):
        task_window("qa1", seq_len, seed, haystack=haystack, prompt_length=seq_len + 2 - len(target))


def _fixture_haystacks(monkeypatch):
    stacks = {}
    monkeypatch.setattr(haystacks_lib, "get_haystack", lambda name: stacks.setdefault(
        name, haystacks_lib.noise_haystack() if name == "noise" else text_haystack(name, _documents())))
    monkeypatch.setattr("titans_jax.long_context.training_mix.get_haystack", haystacks_lib.get_haystack)


def test_uniform_prompt_lengths_move_the_answer_across_the_row(monkeypatch):
    _fixture_haystacks(monkeypatch)
    seq_len, batch_size = 1024, 16
    lm = lambda step: np.random.default_rng([5, step]).integers(1, 256, (batch_size, seq_len + 1))  # noqa: E731
    mixture = TaskMixture(lm, batch_size, seq_len, ("niah_single_1", "qa4"), task_fraction=1.0, seed=2,
                          answer_weight="row", prompt_lengths="uniform")
    full = TaskMixture(lm, batch_size, seq_len, ("niah_single_1", "qa4"), task_fraction=1.0, seed=2,
                       answer_weight="row")
    assert mixture.fingerprint != full.fingerprint and mixture.rows(3) == full.rows(3)
    ends = []
    for step in range(3):
        ids, mask = mixture(step)
        np.testing.assert_array_equal(ids, mixture(step)[0])
        for row, task in enumerate(mixture.rows(step)):
            seed = mixture.example_seed(step, row)
            target = answer_text(example_answer(task, seed)).encode()
            length = mixture.prompt_length(task, step, row)
            stack = mixture.haystacks[TRAIN_HAYSTACK[task]]
            assert min_length(task, seed, haystack=stack) <= length <= seq_len + 1 - len(target)
            answer_at = np.flatnonzero(mask[row])
            assert answer_at.tolist() == list(range(length - 1, length - 1 + len(target)))
            assert bytes(ids[row][length:length + len(target)].tolist()) == target
            tail = seq_len + 1 - length - len(target)  # the text row's start, not trained on
            np.testing.assert_array_equal(ids[row][length + len(target):], lm(step)[row][:tail])
            np.testing.assert_allclose(mask[row].sum(), seq_len, rtol=1e-5)
            ends.append(length)
    # the question ends at many different positions (a single one taught a shortcut)
    assert len(set(ends)) > 0.8 * len(ends) and max(ends) - min(ends) > 300


def test_full_steps_keep_full_rows_first_then_draw_lengths(monkeypatch):
    _fixture_haystacks(monkeypatch)
    seq_len, batch_size = 1024, 8
    lm = lambda step: np.random.default_rng([5, step]).integers(1, 256, (batch_size, seq_len + 1))  # noqa: E731
    args = (lm, batch_size, seq_len, ("niah_single_1", "qa4"))
    kwargs = dict(task_fraction=1.0, seed=2, answer_weight="row")
    curriculum = TaskMixture(*args, **kwargs, prompt_lengths="uniform", full_steps=2)
    full = TaskMixture(*args, **kwargs)
    uniform = TaskMixture(*args, **kwargs, prompt_lengths="uniform")
    assert len({curriculum.fingerprint, full.fingerprint, uniform.fingerprint}) == 3
    for step in (0, 1):  # the same rows as full-length training
        for got, want in zip(curriculum(step), full(step), strict=True):
            np.testing.assert_array_equal(got, want)
    for step in (2, 3):  # then the same rows as drawn lengths
        for got, want in zip(curriculum(step), uniform(step), strict=True):
            np.testing.assert_array_equal(got, want)
        assert not np.array_equal(curriculum(step)[1], full(step)[1])
    with pytest.raises(ValueError, match="needs prompt_lengths='uniform'"):
        TaskMixture(*args, **kwargs, full_steps=2)
    with pytest.raises(ValueError, match="full_steps must be an integer"):
        TaskMixture(*args, **kwargs, prompt_lengths="uniform", full_steps=-1)
    from experiments.configs import DataConfig

    assert DataConfig(tasks=("qa1",), task_fraction=0.5, task_prompt_length="uniform", task_full_steps=9)
    with pytest.raises(ValueError, match="task_full_steps .* needs data.task_prompt_length=uniform"):
        DataConfig(tasks=("qa1",), task_fraction=0.5, task_full_steps=9)


def test_a_drawn_qa_span_puts_the_story_anywhere_from_right_before_the_question_to_the_whole_row(monkeypatch):
    _fixture_haystacks(monkeypatch)
    seq_len, batch_size = 1024, 8
    lm = lambda step: np.random.default_rng([5, step]).integers(1, 256, (batch_size, seq_len + 1))  # noqa: E731
    args = (lm, batch_size, seq_len, ("niah_single_1", "qa1"))
    drawn = TaskMixture(*args, task_fraction=1.0, seed=4, qa_span="drawn")
    whole = TaskMixture(*args, task_fraction=1.0, seed=4)
    assert drawn.fingerprint != whole.fingerprint
    starts = []
    for step in range(4):
        got, want = drawn(step), whole(step)
        for row, task in enumerate(drawn.rows(step)):
            text = bytes(got[0][row].tolist()).decode()
            if task == "niah_single_1":  # needle rows are untouched
                assert drawn.depth(task, step, row) is None
                np.testing.assert_array_equal(got[0][row], want[0][row])
                continue
            lo, hi = drawn.depth(task, step, row)
            assert hi == 1.0 and 0.0 <= lo <= 1.0
            seed = drawn.example_seed(step, row)
            ids, _ = task_window(task, seq_len, seed, haystack=haystacks_lib.get_haystack("books:train"),
                                 depth=(lo, hi))
            np.testing.assert_array_equal(got[0][row], ids)
            story = example_story(task, seed)
            head, tail = format_prompt(task, "\x00", story.question, False).split("\x00")
            assert text.startswith(head)
            context = text[len(head):text.rindex(tail)]
            haystack_chars = len(context) - sum(len(fact) for fact in story.facts)
            first = context.index(story.facts[0])  # haystack text before the story
            # the story lies in the context's last (1 - lo), up to a sentence boundary's slack
            assert first >= lo * haystack_chars - 120, (lo, first, haystack_chars)
            starts.append(first / haystack_chars)
    # stories right before the question and stories from the row's start both occur
    assert min(starts) < 0.3 and max(starts) > 0.85, starts
    with pytest.raises(ValueError, match="qa_span must be"):
        TaskMixture(*args, qa_span="near")
    with pytest.raises(ValueError, match="no qa task"):
        TaskMixture(lm, batch_size, seq_len, ("niah_single_1",), qa_span="drawn")
    from experiments.configs import DataConfig

    assert DataConfig(tasks=("qa1",), task_fraction=0.5, task_qa_span="drawn")
    with pytest.raises(ValueError, match="data.tasks has no qa task"):
        DataConfig(tasks=("niah_single_1",), task_fraction=0.5, task_qa_span="drawn")
    with pytest.raises(ValueError, match="task_qa_span must be"):
        DataConfig(tasks=("qa1",), task_fraction=0.5, task_qa_span="near")


def test_the_mixture_is_a_pure_function_of_the_step_and_keeps_language_model_rows(monkeypatch):
    _fixture_haystacks(monkeypatch)
    seq_len, batch_size = 1536, 16
    lm = lambda step: np.random.default_rng([5, step]).integers(0, 256, (batch_size, seq_len + 1))  # noqa: E731
    mixture = TaskMixture(lm, batch_size, seq_len, task_fraction=0.5, seed=3, answer_weight="row")
    ids, mask = mixture(4)
    again_ids, again_mask = mixture(4)
    np.testing.assert_array_equal(ids, again_ids)
    np.testing.assert_array_equal(mask, again_mask)
    rows = mixture.rows(4)
    assert 0 < sum(task is not None for task in rows) < batch_size
    for row, task in enumerate(rows):
        if task is None:  # a language-model row: untouched, every target counted
            np.testing.assert_array_equal(ids[row], lm(4)[row])
            assert (mask[row] == 1).all()
        else:  # the answer only, weighted so that the row counts as much as a language-model row
            assert 0 < np.count_nonzero(mask[row]) <= 40 and bytes(ids[row][-1:].tolist()) == b"\n"
            np.testing.assert_allclose(mask[row].sum(), seq_len, rtol=1e-5)
    assert mask.dtype == np.float32
    tokens_mode = TaskMixture(lm, batch_size, seq_len, task_fraction=0.5, seed=3)  # the default: pooled
    plain_ids, plain_mask = tokens_mode(4)
    np.testing.assert_array_equal(plain_ids, ids)
    assert plain_mask.dtype == bool
    np.testing.assert_array_equal(plain_mask, mask > 0)
    seeds = {mixture.example_seed(step, row) for step in range(50) for row in range(batch_size)}
    assert len(seeds) == 50 * batch_size and min(seeds) >= TRAIN_SEED_OFFSET
    assert not np.array_equal(mixture(5)[0], ids)
    assert TaskMixture(lm, batch_size, seq_len, task_fraction=0.25, seed=3, answer_weight="row").fingerprint \
        != mixture.fingerprint
    only_lm = TaskMixture(lm, batch_size, seq_len, task_fraction=0.0)(4)
    np.testing.assert_array_equal(only_lm[0], lm(4))
    assert only_lm[1].all()


def test_training_never_uses_evaluation_haystacks_or_seeds():
    assert set(TRAIN_HAYSTACK.values()) == {"books:train", "noise"}
    check_eval_seeds([0, 1, 999])
    with pytest.raises(ValueError, match="TRAIN_SEED_OFFSET"):
        check_eval_seeds([3, TRAIN_SEED_OFFSET + 1])


def test_bad_mixtures_are_refused():
    lm = lambda step: np.zeros((2, 9), np.int32)  # noqa: E731
    with pytest.raises(ValueError, match="unknown tasks"):
        TaskMixture(lm, 2, 8, tasks=("niah_single_9",))
    with pytest.raises(ValueError, match="task_fraction"):
        TaskMixture(lm, 2, 8, tasks=("niah_single_1",), task_fraction=1.5)
    with pytest.raises(ValueError, match=r"expected \(2, 9\)"):
        TaskMixture(lambda step: np.zeros((2, 8), np.int32), 2, 8, tasks=("niah_single_1",))(0)
    with pytest.raises(ValueError, match="unknown task"):
        task_window("qa9", 100, TRAIN_SEED_OFFSET)
    with pytest.raises(ValueError, match="answer_weight"):
        TaskMixture(lm, 2, 8, tasks=("niah_single_1",), answer_weight="byte")
    with pytest.raises(ValueError, match="prompt_lengths"):
        TaskMixture(lm, 2, 8, tasks=("niah_single_1",), prompt_lengths="random")
    with pytest.raises(ValueError, match="longer than a 8-token row"):
        TaskMixture(lm, 2, 8, tasks=("niah_single_1",), task_fraction=1.0, prompt_lengths="uniform")(0)
