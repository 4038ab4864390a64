"""The long-context harness: windowed streaming gives the parallel pass's next-token logits and
generate()'s greedy answer; scoring, tables and heatmaps on hand-made results; the CLI end to end
(slow)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax.data.tokenizers import ByteTokenizer
from titans_jax.long_context import harness, make_example, noise_haystack
from titans_jax.models import ModelConfig, TitansLM, full_attention_capacity, init_params

TINY = dict(vocab_size=256, d_model=32, num_layers=1, num_heads=2, head_dim=16, mlp_hidden=48, window=8,
            segment_size=8, num_persistent=2, attention_block=8, **{"lmm.memory.chunk_size": 4})


@pytest.fixture(scope="module", params=["mac", pytest.param("transformer", marks=pytest.mark.slow)])
def tiny(request):
    config = ModelConfig().replace(dict(TINY, arch=request.param))
    model, params = TitansLM(config), init_params(config, jax.random.PRNGKey(0))
    return model, params, harness.StreamingRunner(model, params, window=16)


def test_window_pieces_cover_the_length_with_few_shapes():
    for length in (1, 15, 16, 17, 100, 4097):
        pieces = harness.window_pieces(length, 16)
        assert sum(pieces) == length and all(p <= 16 for p in pieces)
        assert set(pieces) <= {16, 8, 4, 2, 1}
    assert harness.window_pieces(35, 16) == [16, 16, 2, 1]
    with pytest.raises(ValueError, match="nothing to stream"):
        harness.window_pieces(0, 16)
    with pytest.raises(ValueError, match="window must be >= 1"):
        harness.StreamingRunner(None, None, window=0)


def test_streaming_in_windows_gives_the_parallel_logits_and_greedy_answer(tiny):
    model, params, runner = tiny
    ids = np.random.default_rng(0).integers(0, 256, 40).astype(np.int32)  # calls of 16 + 16 + 8
    answer, stats = runner.answer(ids, 4)
    assert stats.tokens == 40 and stats.calls == 3 and stats.cache_bytes > 0
    # one parallel pass over prompt ++ answer: the streamed next-token logits, and every greedy
    # answer token is the argmax after the tokens before it
    full = np.concatenate([ids, np.asarray(answer[:-1], np.int32)])
    parallel = np.asarray(model.apply({"params": params}, jnp.asarray(full[None]))[0])
    logits, _, _ = runner.prefill(ids)
    np.testing.assert_allclose(np.asarray(logits), parallel[39], rtol=2e-5, atol=2e-5)
    assert answer == [int(t) for t in parallel[39:].argmax(-1)]
    stopped, _ = runner.answer(ids, 4, stop=lambda out: len(out) == 2)
    assert stopped == answer[:2]
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        runner.prefill(np.array([1, 300]))


def test_the_empty_cache_is_built_once_not_eagerly_per_example(tiny, monkeypatch):
    """The empty cache (the persistent prefix run through the model) is compiled, not run op by op
    for every example: a bounded cache is built once per runner; full attention once per window
    multiple of the capacity it needs."""
    model, params, _ = tiny
    built = []
    real = harness.init_cache
    monkeypatch.setattr(harness, "init_cache", lambda *args: built.append(args[3]) or real(*args))
    runner = harness.StreamingRunner(model, params, window=16)
    ids = np.random.default_rng(1).integers(0, 256, 40).astype(np.int32)
    answers = [runner.answer(ids[:n], 2)[0] for n in (33, 40, 40)]
    # 35 and 42 tokens in all: full attention rounds both up to a 48-key cache, traced once
    assert built == ([48] if model.config.arch == "transformer" else [None])
    if model.config.arch == "transformer":   # a prompt shorter than the window: the next power of two
        short = harness.StreamingRunner(model, params, window=64)
        assert full_attention_capacity(model.config, short.empty_cache(20)) == 32
        assert full_attention_capacity(model.config, short.empty_cache(64)) == 64
    eager = harness.StreamingRunner(model, params, window=16)
    eager.empty_cache = lambda max_len: real(model, params, 1, max_len)   # the exact need, run eagerly
    assert [eager.answer(ids[:n], 2)[0] for n in (33, 40)] == answers[:2]


class _Oracle:
    """A runner stand-in that answers with the gold value (or nonsense), to test the scoring path."""

    def __init__(self, tokenizer, outputs):
        self.tokenizer, self.outputs = tokenizer, iter(outputs)

    def answer(self, ids, budget, stop=None):
        out = self.tokenizer.encode(next(self.outputs))[:budget]
        return out, harness.StreamStats(len(ids), 1, 0.5, 0.1, 1024)


def test_evaluate_rows_scores_tables_and_heatmap(tmp_path):
    tokenizer = ByteTokenizer()
    haystack = noise_haystack()
    examples = [make_example("niah_single_1", length, depth=depth, seed=seed, tokenizer=tokenizer, haystack=haystack)
                for length in (512, 1024) for depth in (0.0, 1.0) for seed in (0,)]
    outputs = [f" {ex.answer}.\n" if i % 2 == 0 else " 1234567.\n" for i, ex in enumerate(examples)]
    results = harness.evaluate_rows(_Oracle(tokenizer, outputs), map(harness.example_row, examples), tokenizer,
                                    progress=False)
    assert [r["score"] for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert {(r["length"], r["depth"]) for r in results} == {(512, 0.0), (512, 1.0), (1024, 0.0), (1024, 1.0)}
    assert harness.accuracy_table(results) == {"niah_single_1": {512: (0.5, 2), 1024: (0.5, 2)}}
    assert "| niah_single_1 | 50.0 (n=2) | 50.0 (n=2) |" in harness.format_table(results)
    harness.plot_heatmap(results, "niah_single_1", tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
    json.dumps(results)  # results are plain JSON
    assert harness.score_row("qa1", "kitchen", "The kitchen. Then the garden.") == 1.0
    assert harness.score_row("qa1", "garden", "The kitchen. Then the garden.") == 0.0
    assert harness.score_row("niah_single_3", "AB-cd", " ab-CD") == 1.0
    with pytest.raises(ValueError, match="unknown task"):
        harness.score_row("qa9", "x", "x")


def test_peak_rss_sees_an_allocation():
    with harness.PeakRSS() as rss:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block.sum()
    assert rss.peak - rss.start > 32 * 2**20
    del block


@pytest.mark.slow
def test_the_cli_runs_a_grid_and_a_profile(tmp_path):
    from experiments import long_context

    common = ["--untrained", "--preset", "tiny", "--arch", "mac", "--window", "256", "--no-progress"]
    grid = long_context.main(common + ["--tasks", "niah_single_1,qa1", "--lengths", "1024", "--depths", "0,1",
                                       "--out", str(tmp_path / "grid")])
    assert len(grid["results"]) == 4 and (tmp_path / "grid" / "heatmap_niah_single_1.png").exists()
    assert (tmp_path / "grid" / "table.md").read_text().startswith("| task |")
    profile = long_context.main(common + ["--profile", "--lengths", "1024,4096", "--out", str(tmp_path / "p")])
    sizes = {row["cache_bytes"] for row in profile["profile"]}
    assert len(sizes) == 1  # the state does not grow with the context
