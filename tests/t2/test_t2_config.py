"""Configs: every preset validates and is shape-checked with jax.eval_shape (no memory); HF
config.json parsing; validation errors; Llama 3 RoPE scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t2_jax

# parameter counts of the published checkpoints (embeddings counted once when tied)
PARAMETER_COUNTS = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "qwen2.5-0.5b": 494_032_768,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_248_023_552,
}


@pytest.mark.parametrize("name", sorted(t2_jax.PRESETS))
def test_preset_shapes_with_eval_shape(name):
    config = t2_jax.get_config(name)
    shapes = jax.eval_shape(lambda k: t2_jax.init_params(config, k, jnp.bfloat16),
                            jax.random.key(0))
    t2_jax.check_params(shapes, config)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    if name in PARAMETER_COUNTS:
        assert count == PARAMETER_COUNTS[name]
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    logits, _ = jax.eval_shape(lambda p, t: t2_jax.apply(p, config, t), shapes, tokens)
    assert logits.shape == (1, 8, config.vocab_size)


def test_unknown_preset_names_choices():
    with pytest.raises(KeyError, match="smollm2-135m"):
        t2_jax.get_config("smollm3")


@pytest.mark.parametrize("changes,message", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(hidden_size=30), "not divisible by num_heads"),
    (dict(head_dim=7), "even"),
    (dict(rope_layout="interleaved"), "rope_layout"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_config_validation(changes, message):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                num_kv_heads=2)
    t2_jax.LlamaConfig(**base)
    with pytest.raises(ValueError, match=message):
        t2_jax.LlamaConfig(**{**base, **changes})


def test_from_hf_dict_llama32_and_qwen2():
    llama = t2_jax.LlamaConfig.from_hf_dict({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "max_position_embeddings": 131072})
    assert llama.replace(name="llama-3.2-1b") == t2_jax.get_config("llama-3.2-1b")
    qwen = t2_jax.LlamaConfig.from_hf_dict({
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
        "max_position_embeddings": 32768})
    assert qwen.replace(name="qwen2.5-0.5b") == t2_jax.get_config("qwen2.5-0.5b")
    with pytest.raises(ValueError, match="unsupported model_type"):
        t2_jax.LlamaConfig.from_hf_dict({"model_type": "gpt2"})


@pytest.mark.parametrize("model_type,qkv,o", [("llama", True, True), ("qwen2", True, False),
                                              ("mistral", False, False)])
def test_from_hf_dict_attention_bias_follows_transformers(model_type, qkv, o):
    # LlamaAttention biases q, k, v and o with attention_bias; Qwen2 biases q, k, v always;
    # MistralAttention has no biases whatever the config says
    config = t2_jax.LlamaConfig.from_hf_dict({
        "model_type": model_type, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "attention_bias": True})
    assert (config.attention_bias, config.attention_output_bias) == (qkv, o)
    shapes = t2_jax.param_shapes(config)["layers"]["attn"]
    assert ("bias" in shapes["o"]) == o and ("bias" in shapes["q"]) == qkv


def test_llama3_rope_scaling_bands():
    config = t2_jax.get_config("llama-3.2-1b")
    plain = t2_jax.rope_frequencies(config.replace(rope_scaling=None))
    scaled = t2_jax.rope_frequencies(config)
    wavelength = 2 * np.pi / plain
    high = wavelength < 8192 / 4     # high frequencies: unchanged
    low = wavelength > 8192 / 1      # low frequencies: divided by the factor
    np.testing.assert_allclose(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 32.0, rtol=1e-6)
    medium = ~high & ~low            # in between: smooth interpolation
    assert medium.any()
    assert np.all(scaled[medium] < plain[medium]) and np.all(scaled[medium] > plain[medium] / 32)
