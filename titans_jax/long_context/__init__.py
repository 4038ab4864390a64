"""Long-context evaluation tasks generated from real text, seeded and reproducible.

    from titans_jax.long_context import make_example, make_examples, score
    ex = make_example("niah_single_2", length=4096, depth=0.5, seed=0)
    ex.prompt, ex.answer, ex.needle_tokens      # 4096 UTF-8 bytes, gold value, needle span
    score(ex, model_output)                     # RULER string_match_all / BABILong match

Tasks: RULER S-NIAH niah_single_1/2/3 (noise / essays / essays; number / number / UUID) and
BABILong qa1-qa5 (bAbI-like stories hidden in book text). Haystacks: `noise`, `essays` (RULER's
Paul Graham essays, `python -m titans_jax.data.fetch essays`), `books` (the titans_jax book
corpus, `python -m titans_jax.data.fetch books`). Fixed evaluation sets: tfds array_record
builders keyed by (task, length, depth, seed) in titans_jax.long_context.eval_sets (imported
lazily: it imports tensorflow_datasets).

Modules: sentences (the splitter), words (key word lists), haystacks (data, fetch, windows),
babilong (story simulator, prompts), tasks (examples, fitting, scoring), eval_sets (tfds),
training_mix (task windows trained on their answers, mixed with language-model windows).
"""

from titans_jax.long_context.babilong import Story, format_prompt, generate_story
from titans_jax.long_context.haystacks import (
    FETCH_ESSAYS_COMMAND,
    HAYSTACKS,
    Haystack,
    books_haystack,
    essays_haystack,
    fetch_essays,
    get_haystack,
    noise_haystack,
    text_haystack,
)
from titans_jax.long_context.sentences import split_sentences
from titans_jax.long_context.tasks import (
    GENERATOR_VERSION,
    NIAH_TASKS,
    QA_TASKS,
    TASKS,
    Example,
    babilong_match,
    example_answer,
    example_key,
    example_story,
    make_example,
    make_examples,
    min_length,
    score,
    string_match_all,
)


_EVAL_SET_NAMES = ("EvalSetSpec", "build_eval_set", "eval_set_builder", "examples_by_key",
                   "load_eval_set")


def __getattr__(name):
    """The evaluation-set API of titans_jax.long_context.eval_sets, imported lazily (it imports
    tensorflow_datasets)."""
    if name in _EVAL_SET_NAMES:
        from titans_jax.long_context import eval_sets

        return getattr(eval_sets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "babilong_match", "books_haystack", "build_eval_set", "essays_haystack", "eval_set_builder",
    "EvalSetSpec", "Example", "example_answer", "example_key", "example_story", "examples_by_key", "fetch_essays",
    "FETCH_ESSAYS_COMMAND", "format_prompt", "generate_story", "GENERATOR_VERSION", "get_haystack",
    "Haystack", "HAYSTACKS", "load_eval_set", "make_example", "make_examples", "NIAH_TASKS",
    "noise_haystack", "QA_TASKS", "score", "split_sentences", "Story", "string_match_all", "TASKS",
    "text_haystack",
]
