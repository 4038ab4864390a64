"""Hugging Face parity without torch: tiny checkpoints written by transformers and the logits /
greedy tokens transformers computed from them are committed under tests/t2/golden (written by
experiments/make_t2_golden.py, which needs the `hf` extra); our loader + model must reproduce
them at the live parity test's tolerance (test_t2_hf_parity.py, which runs when torch is
installed)."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import t2_jax
from t2_jax import testing

GOLDEN = pathlib.Path(__file__).parent / "golden"
TOL = 1e-4  # as test_t2_hf_parity.py


@pytest.fixture(scope="module", params=testing.GOLDEN_FAMILIES)
def golden(request):
    directory = GOLDEN / request.param
    assert (directory / "golden.npz").exists(), (
        f"golden fixture {directory} is missing; write it with experiments/make_t2_golden.py")
    params, config = t2_jax.load_hf(directory)
    with np.load(directory / "golden.npz") as data:
        stored = {key: data[key] for key in data.files}
    return request.param, params, config, stored


def max_error(params, config, stored):
    ours, _ = t2_jax.apply(params, config, jnp.asarray(stored["tokens"]))
    return float(np.abs(np.asarray(ours) - stored["logits"]).max())


def test_fixture_config_has_the_family_features(golden):
    family, params, config, stored = golden
    assert config.attention_bias == (family in ("llama-bias", "qwen2"))
    assert config.attention_output_bias == (family == "llama-bias")
    assert config.tie_embeddings == (family == "qwen2")
    assert config.sliding_window == (4 if family == "mistral" else None)
    assert (config.rope_scaling is not None) == family.startswith("llama")
    assert stored["tokens"].shape[1] > 16  # past llama3's original context and the window


def test_logits_match_transformers(golden):
    family, params, config, stored = golden
    assert np.abs(stored["logits"]).max() > 1.0  # the check is sensitive
    assert max_error(params, config, stored) < TOL


def test_left_padded_logits_match_transformers(golden):
    family, params, config, stored = golden
    mask = stored["padded_mask"]
    ours, _ = t2_jax.apply(params, config, jnp.asarray(stored["padded_tokens"]),
                           attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], stored["padded_logits"][real], atol=TOL,
                               rtol=0)


def test_greedy_generation_matches_transformers(golden):
    family, params, config, stored = golden
    out = t2_jax.generate(params, config, stored["prompt"],
                          max_new_tokens=stored["generated"].shape[1])
    np.testing.assert_array_equal(np.asarray(out.tokens), stored["generated"])


def test_the_comparison_catches_one_perturbed_weight_or_a_dropped_bias(golden):
    family, params, config, stored = golden
    up = params["layers"]["mlp"]["up"]["kernel"]
    perturbed = {**params, "layers": {**params["layers"], "mlp": {
        **params["layers"]["mlp"], "up": {"kernel": up.at[1, 3, 5].add(0.05)}}}}
    assert max_error(perturbed, config, stored) > 10 * TOL
    if config.attention_output_bias:  # what the loader used to do with Llama's o_proj.bias
        attn = params["layers"]["attn"]
        dropped = {**params, "layers": {**params["layers"], "attn": {
            **attn, "o": {"kernel": attn["o"]["kernel"],
                          "bias": jnp.zeros_like(attn["o"]["bias"])}}}}
        assert max_error(dropped, config, stored) > 10 * TOL
