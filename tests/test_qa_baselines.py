"""experiments.qa_baselines: the readers that skip the QA tasks' reasoning."""

import pytest

from experiments import qa_baselines as qb
from titans_jax.long_context import babilong
from titans_jax.long_context.tasks import example_answer


def test_candidates_are_the_answers_kind_in_order_of_last_mention_without_the_questions():
    item = babilong.Story("qa1", ("Mary went to the kitchen.", "John moved to the office.",
                                  "Mary travelled to the garden.", "John went back to the kitchen."),
                          "Where is Mary?", "garden")
    assert qb.candidates(item) == ["office", "garden", "kitchen"]
    item = babilong.Story("qa4", ("The office is north of the kitchen.", "The kitchen is north of the garden."),
                          "What is north of the kitchen?", "office")
    assert qb.candidates(item) == ["office", "garden"]  # the question's place is no candidate
    item = babilong.Story("qa5", ("Mary picked up the milk.", "Mary gave the milk to Fred."),
                          "What did Mary give to Fred?", "milk")
    assert qb.answer_kind(item.answer) == "object" and qb.candidates(item) == ["milk"]


def test_the_stories_are_the_harness_ones_and_the_readers_score_what_they_should():
    assert all(qb.story(task, seed).answer == example_answer(task, seed) for task in babilong.QA_TASKS
               for seed in range(5))
    rows = qb.main(["--examples", "200"])
    for task, row in rows.items():
        assert row["answer_mentioned"] == 1.0  # every answer is a word of the story
        assert row["prior"] == pytest.approx(sum(example_answer(task, s) == row["prior_answer"]
                                                 for s in range(200)) / 200)
        assert 0 < row["prior"] < row["mentioned"] <= 1 and 0 < row["last"] < 1
    assert rows["qa4"]["mentioned"] == 0.5  # two places in the story but the question's: a coin toss
    with pytest.raises(SystemExit):
        qb.main(["--tasks", "qa6"])
