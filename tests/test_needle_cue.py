"""experiments.needle_cue: a needle's first digits given after the prompt, the rest read."""

import jax
import pytest

from experiments import needle_cue as nc
from titans_jax.data.tokenizers import ByteTokenizer
from titans_jax.long_context import harness, make_examples
from titans_jax.models import ModelConfig, TitansLM, init_params


def test_cued_prompts_and_their_scores():
    assert nc.cued_prompt("... text is", "6976681", 0) == "... text is"
    assert nc.cued_prompt("... text is", "6976681", 2) == "... text is 69"
    with pytest.raises(ValueError, match=r"cue must be in \[0, 7\)"):
        nc.cued_prompt("p", "6976681", 7)
    right = nc.continuation_row("niah_single_1", "6976681", 1, "976681.\n")
    assert right["exact"] == 1.0 and right["in_place"] == 1.0
    # a space after the cue breaks the number: not the needle, and no digit of the rest in place
    spaced = nc.continuation_row("niah_single_1", "6976681", 1, " 976681.\n")
    assert spaced["exact"] == 0.0 and spaced["in_place"] == 0.0
    half = nc.continuation_row("niah_single_1", "6976681", 1, "970000.\n")   # 9, 7 of the six after the cue
    assert half["exact"] == 0.0 and half["in_place"] == pytest.approx(2 / 6)
    plain = nc.continuation_row("niah_single_1", "6976681", 0, " 6976681.\n")
    assert plain["exact"] == 1.0 and plain["in_place"] == 1.0


def test_no_cue_is_the_plain_evaluation():
    config = ModelConfig().replace(dict(vocab_size=256, d_model=32, num_layers=1, num_heads=2, head_dim=16,
                                        mlp_hidden=48, window=16, segment_size=8, num_persistent=2,
                                        attention_block=8, arch="lmm", **{"lmm.memory.chunk_size": 4}))
    model, params = TitansLM(config), init_params(config, jax.random.PRNGKey(0))
    runner, tokenizer = harness.StreamingRunner(model, params, window=64), ByteTokenizer()
    examples = make_examples("niah_single_1", (400,), (0.5,), 2, 0, tokenizer)
    plain = harness.evaluate_rows(runner, [harness.example_row(e) for e in examples], tokenizer, progress=False)
    rows = nc.cue_rows(runner, examples, (0, 1), tokenizer)
    assert [r["output"] for r in rows if r["cue"] == 0] == [r["output"] for r in plain]
    assert [r["exact"] for r in rows if r["cue"] == 0] == [r["score"] for r in plain]
    assert [r["cue"] for r in rows] == [0, 1, 0, 1] and all(r["answer"] == e.answer for r, e in
                                                             zip(rows[::2], examples))
    assert "| 0 | " in nc.report(rows) and "(n=2)" in nc.report(rows)
