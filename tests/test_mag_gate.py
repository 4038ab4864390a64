"""experiments.mag_gate: MAG's output gate read from a model's own pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import mag_gate
from titans_jax.models import ModelConfig, TitansLM, init_params


def _model(arch="mag", **changes):
    config = ModelConfig().replace(dict(vocab_size=256, d_model=32, num_layers=2, num_heads=2, head_dim=16,
                                        mlp_hidden=48, window=8, num_persistent=2, attention_block=8, arch=arch,
                                        **{"lmm.memory.chunk_size": 4, "lmm.theta_max": 1.0}, **changes))
    return TitansLM(config), init_params(config, jax.random.PRNGKey(3))


def test_the_gate_is_sigmoid_of_the_normalised_retrieval_at_the_last_tokens():
    model, params = _model()
    ids = np.random.RandomState(0).randint(0, 256, (2, 24)).astype(np.int32)
    figures = mag_gate.gate_figures(model, params, ids, last=5)
    assert [f["layer"] for f in figures] == ["block_0", "block_1"]
    # independently: the memory's retrieval of each block, normalised with the gate's own scale
    _, state = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids), logits_at="none",
                                             capture_intermediates=True, mutable=["intermediates"]))(params)
    for f in figures:
        block = state["intermediates"][f["layer"]]
        m = np.asarray(block["memory"]["__call__"][0][0], np.float64)[:, -5:]
        scale = np.asarray(params[f["layer"]]["gate"]["norm_m"]["scale"], np.float64)
        want = 1 / (1 + np.exp(-(m / np.sqrt(np.mean(m ** 2, axis=-1, keepdims=True) + 1e-6) * scale)))
        np.testing.assert_allclose(f["gate"], want, rtol=1e-4, atol=1e-6)
        assert f["gate"].shape == (2, 5, 32) and f["mean"] == pytest.approx(float(want.mean()), rel=1e-4)
        assert f["output_rms"] > 0
    # the same parameters with the memory held at M_0: another gate at the question
    held, _ = _model(**{"lmm.write": False})
    held_figures = mag_gate.gate_figures(held, params, ids, last=5)
    assert max(float(np.max(np.abs(a["gate"] - b["gate"]))) for a, b in zip(figures, held_figures)) > 1e-4
    text = mag_gate.report([{"layer": "block_0", "gate_writes": 0.5, "gate_held": 0.25, "change": 0.125,
                             "output_rms_writes": 0.75, "output_rms_held": 0.5}])
    assert "| block_0 | 0.500 / 0.250 | 0.125 | 0.750 / 0.500 |" in text


def test_a_model_without_the_gate_is_refused():
    model, params = _model(arch="lmm")
    with pytest.raises(SystemExit, match="has none"):
        mag_gate.gate_figures(model, params, np.zeros((1, 8), np.int32), last=4)
    with pytest.raises(SystemExit):
        mag_gate.main(["--run", "x", "--last", "0"])
