"""experiments.needle_gates: the forgetting gate's product between the needle and the question,
from the gates the model computes while the prompt is streamed as the evaluation streams it."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import needle_gates
from experiments.gate_trace import memory_layers
from titans_jax import models


def test_needle_span_is_in_bytes_and_inside_the_needle_sentence():
    prompt = "é 123 ... The magic number is: 123. Question?"
    sentence = (prompt.index("The"), prompt.index("?"))
    assert needle_gates.needle_span(prompt, "123", sentence) == (32, 35)  # the second 123; é is two bytes
    assert prompt.encode()[32:35] == b"123"
    with pytest.raises(ValueError, match="not in its sentence"):
        needle_gates.needle_span(prompt, "999", sentence)


def test_a_story_s_needle_is_its_last_sentence_naming_the_answer():
    from titans_jax.long_context.tasks import make_example
    from titans_jax.long_context.haystacks import text_haystack

    documents = [" ".join(f"Line {d} {i} of a quiet page." for i in range(300)) for d in range(4)]
    example = make_example("qa1", 1024, seed=4, haystack=text_haystack("fixture", documents))  # named 3 times
    start, end = needle_gates.answer_sentence(example)
    sentence = example.prompt[start:end]
    later = example.prompt[end:example.prompt.index("</context>")]
    assert example.answer in sentence and example.answer not in later and (start, end) in example.needle_chars
    niah = make_example("niah_single_1", 512, 0.5, 0)
    assert needle_gates.answer_sentence(niah) == tuple(niah.needle_chars[0])
    with pytest.raises(ValueError, match="names its answer"):
        needle_gates.answer_sentence(dataclasses.replace(example, answer="attic"))
    assert needle_gates._depth("none") is None and needle_gates._depth("0.5") == 0.5


def test_layer_figures_are_the_gate_products_after_the_needle():
    theta = np.ones((2, 10))
    theta[:, 3:5] = 2.0
    log_keep = np.log(np.array([[0.9] * 10, [0.5] * 10]))
    figures = needle_gates.layer_figures(theta, log_keep, 3, 5)  # five tokens after the needle
    assert figures["retention"] == pytest.approx(math.sqrt(0.9 ** 5 * 0.5 ** 5))
    assert figures["retention_best_head"] == pytest.approx(0.9 ** 5)
    assert figures["alpha"] == pytest.approx(0.3) and figures["write"] == pytest.approx(2.0)
    assert needle_gates.layer_figures(theta, None, 3, 5)["retention"] == 1.0
    with pytest.raises(ValueError, match="past the prompt's last position"):
        needle_gates.layer_figures(theta, log_keep, 8, 10)


def test_streamed_gates_are_the_whole_sequence_gates_of_the_prompt_tokens():
    """GateStream (windows over a cache that already ran the persistent prefix) against one call
    over the whole sequence, whose memory reads the 3 persistent tokens first: the same gates at
    the prompt's positions, so the needle's offsets need no shift."""
    config = models.ModelConfig(arch="lmm", vocab_size=256, d_model=32, num_layers=2, num_heads=2, head_dim=16,
                                mlp_hidden=64, window=8, num_persistent=3).replace({"lmm.memory.chunk_size": 4})
    model = models.TitansLM(config)
    ids = np.random.RandomState(0).randint(0, 256, 40).astype(np.int32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(ids[None]))["params"]  # one program, not eager ops
    streamed = needle_gates.GateStream(model, params, window=16).gates(ids)  # pieces 16, 16, 8
    whole = memory_layers(jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["diagnostics"])[1])(
        params, jnp.asarray(ids[None]))["diagnostics"])
    assert [path for path, _, _ in streamed] == ["/".join(path) for path, _ in whole] == [
        "block_0/memory", "block_1/memory"]
    for (_, theta, log_keep), (_, inputs) in zip(streamed, whole):
        assert theta.shape == log_keep.shape == (2, 40)
        np.testing.assert_allclose(theta, np.asarray(inputs[3][0, :, 3:]), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(log_keep, np.asarray(inputs[5][0, :, 3:]), rtol=1e-5, atol=1e-9)
    no_gate = models.TitansLM(config.replace({"lmm.use_forgetting": False}))
    params = jax.jit(no_gate.init)(jax.random.key(0), jnp.asarray(ids[None]))["params"]
    assert all(keep is None for _, _, keep in needle_gates.GateStream(no_gate, params, window=16).gates(ids))


def test_exact_answers_are_joined_by_length_and_evaluation_seed(tmp_path, capsys):
    """--exact takes each example's plain answer (cue 0) from a needle_cue file; a file that lacks
    an example is refused with the examples it lacks, answers of another checkpoint or model too;
    several files are read as one; --rows reports an earlier --out file."""
    layers = lambda r: {"block_0/memory": {"alpha": 1e-4, "retention": r, "retention_best_head": r, "write": 1.0}}
    rows = [{"task": "niah_single_1", "depth": 0.5, "length": 1024, "seed": s, "step": 900,
             "layers": layers(0.1 * (s + 1))} for s in range(3)]
    cue = {"args": {"run": "runs/r/seed0"}, "rows": [
        {"task": "niah_single_1", "depth": 0.5, "length": 1024, "seed": s, "cue": c, "step": 900,
         "exact": float(s == c)} for s in range(3) for c in (0, 1)]}
    joined = needle_gates.join_exact(rows, cue)
    assert [row["exact"] for row in joined] == [1.0, 0.0, 0.0]  # cue 0's answers only
    assert "| 1,024 | block_0/memory | 1: 0.1 [0.1, 0.1] | 2: 0.25 [0.2, 0.3] |" in needle_gates.report(joined)
    with pytest.raises(ValueError, match=r"no plain answer .* \[\(1024, 2\)\]"):
        needle_gates.join_exact(rows, {"rows": cue["rows"][:4]})
    with pytest.raises(ValueError, match=r"other parameters than the gates \(steps \(600, 900\)"):
        needle_gates.join_exact(rows, {"rows": [{**row, "step": 600} for row in cue["rows"]]})
    earlier = tmp_path / "gates.json"
    earlier.write_text(json.dumps({"args": {"run": "runs/r/seed0", "task": "niah_single_1", "depth": 0.5,
                                            "per_cell": 3}, "rows": rows}))
    halves = [tmp_path / "cue_a.json", tmp_path / "cue_b.json"]  # e.g. one file a length
    halves[0].write_text(json.dumps({**cue, "rows": cue["rows"][:3]}))
    halves[1].write_text(json.dumps({**cue, "rows": cue["rows"][3:]}))
    assert needle_gates.main(["--rows", str(earlier), "--exact", *map(str, halves)]) == joined
    assert "| 1: 0.1 [0.1, 0.1] |" in capsys.readouterr().out
    other = tmp_path / "other.json"  # another model's answers
    other.write_text(json.dumps({**cue, "args": {"run": "runs/r/seed1"}}))
    with pytest.raises(SystemExit, match="answers for runs/r/seed1, these figures are of runs/r/seed0"):
        needle_gates.main(["--rows", str(earlier), "--exact", str(other)])
    changed = tmp_path / "changed.json"  # the same model's answers under an evaluation-time change
    changed.write_text(json.dumps({**cue, "args": {**cue["args"], "set": ["model.lmm.theta_max=0.1"]}}))
    with pytest.raises(SystemExit, match=r"answers with --set \['model.lmm.theta_max=0.1'\], these figures are "
                                         r"with --set \[\]"):
        needle_gates.main(["--rows", str(earlier), "--exact", str(changed)])
    with pytest.raises(SystemExit):  # an earlier file keeps the changes it was made with
        needle_gates.main(["--rows", str(earlier), "--set", "model.lmm.theta_max=0.1"])


def test_set_reaches_the_model_and_is_named(capsys):
    """--set: parsed, passed to the run (load_streamable's changes), named in the report's header."""
    calls = []

    def fake_run(run_dir, task, lengths, depth, per_cell, seed, window, changes=None):
        calls.append(changes)
        return [{"task": task, "depth": depth, "length": 1024, "seed": 0, "step": 1,
                 "layers": {"block_0/memory": {"alpha": 0.0, "retention": 1.0, "retention_best_head": 1.0,
                                               "write": 1.0}}}]

    needle_gates.cli("doc", fake_run, needle_gates.report,
                     ["--run", "runs/r/seed0", "--set", "model.lmm.memory.every_layer_floor=true"])
    assert calls == [{"lmm.memory.every_layer_floor": True}]
    assert "runs/r/seed0 (with model.lmm.memory.every_layer_floor=true), niah_single_1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        needle_gates.cli("doc", fake_run, needle_gates.report, ["--run", "runs/r/seed0", "--set", "theta=1"])


def test_models_it_cannot_map_are_refused_by_name(monkeypatch):
    """A vocabulary other than bytes (the needle's offsets are byte offsets) and MAC (its memory
    reads per-segment block inputs, not the token sequence) stop with the reason, not a wrong
    table."""
    from titans_jax import training

    for config, reason in [(models.ModelConfig(arch="lmm", vocab_size=1000), "byte-level models only"),
                           (models.ModelConfig(arch="mac", vocab_size=256), "MAC's memory reads per-segment")]:
        monkeypatch.setattr(training, "load_trained",
                            lambda run_dir, changes=None, config=config: (config, None, {"step": 0}))
        with pytest.raises(SystemExit, match=reason):
            needle_gates.run("run", "niah_single_1", [1024], 0.5, 1, 0)
