"""Loader reliability: every tensor a checkpoint holds is loaded or refused by name (Llama's
attention_bias gives o_proj a bias too), for Hugging Face directories and GGUF files alike."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import t2_jax
from t2_jax import testing

# q/k/v biases, like Qwen2; a Llama checkpoint with attention_bias adds o_proj.bias
CONFIG = t2_jax.get_config("tiny").replace(attention_bias=True, name="tiny-bias")


def write_hf_directory(directory, state, **hf_config):
    from safetensors.numpy import save_file

    c = CONFIG
    config = {"model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
              "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
              "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
              "tie_word_embeddings": False, "attention_bias": True, **hf_config}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
              str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def params():
    return testing.tiny_params(CONFIG, seed=11)


def o_biases(seed=12):
    rng = np.random.default_rng(seed)
    return [0.5 * rng.standard_normal(CONFIG.hidden_size).astype(np.float32)
            for _ in range(CONFIG.num_layers)]


def test_llama_attention_bias_loads_and_applies_the_o_proj_bias(params, tmp_path):
    # transformers' Llama with attention_bias=True biases q, k, v and o
    state = t2_jax.params_to_hf_state(params, CONFIG)
    for i, bias in enumerate(o_biases()):
        state[f"model.layers.{i}.self_attn.o_proj.bias"] = bias
    loaded, config = t2_jax.load_hf(write_hf_directory(tmp_path / "llama", state))
    assert config.attention_bias and config.attention_output_bias
    np.testing.assert_array_equal(loaded["layers"]["attn"]["o"]["bias"], np.stack(o_biases()))
    tokens = testing.random_tokens(1, 6, CONFIG.vocab_size, seed=1)
    with_bias, _ = t2_jax.apply(loaded, config, tokens)
    loaded["layers"]["attn"]["o"]["bias"] = jnp.zeros_like(loaded["layers"]["attn"]["o"]["bias"])
    without, _ = t2_jax.apply(loaded, config, tokens)
    assert float(jnp.abs(with_bias - without).max()) > 0.1  # the bias is applied


def test_unused_hf_tensors_are_refused_or_named_in_a_warning(params, tmp_path):
    state = t2_jax.params_to_hf_state(params, CONFIG)
    state["model.layers.0.self_attn.q_norm.weight"] = np.ones(CONFIG.head_dim, np.float32)
    state["model.layers.2.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"]
    directory = write_hf_directory(tmp_path / "qwen2", state, model_type="qwen2")
    with pytest.raises(ValueError, match=r"2 tensor\(s\).*does not use: 'model\.layers\.0\.self_"
                                         r"attn\.q_norm\.weight', 'model\.layers\.2\.mlp.*"
                                         r"allow_unused=True") as error:
        t2_jax.load_hf(directory)
    assert str(directory) in str(error.value)
    with pytest.warns(UserWarning, match=r"q_norm\.weight.*ignored"):
        loaded, _ = t2_jax.load_hf(directory, allow_unused=True)
    testing.assert_trees_close(loaded, params)


def test_tied_lm_head_copy_is_accepted_only_when_equal_to_the_embedding(params, tmp_path):
    config = CONFIG.replace(tie_embeddings=True)
    tied = {k: v for k, v in params.items() if k != "lm_head"}
    state = t2_jax.params_to_hf_state(tied, config)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    loaded, _ = t2_jax.load_hf(write_hf_directory(tmp_path / "copy", state, model_type="qwen2",
                                                  tie_word_embeddings=True))
    testing.assert_trees_close(loaded, tied)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="'lm_head.weight'"):
        t2_jax.load_hf(write_hf_directory(tmp_path / "other", state, model_type="qwen2",
                                          tie_word_embeddings=True))


def test_gguf_o_bias_is_loaded_and_unused_tensors_refused(params, tmp_path):
    biases = {f"blk.{i}.attn_output.bias": b for i, b in enumerate(o_biases())}
    path = testing.write_tiny_gguf(tmp_path / "bias.gguf", params, CONFIG, extra_tensors=biases)
    loaded, config = t2_jax.load_gguf(path)
    assert config.attention_output_bias
    np.testing.assert_array_equal(loaded["layers"]["attn"]["o"]["bias"], np.stack(o_biases()))
    norm = {"blk.1.attn_k_norm.weight": np.ones(CONFIG.head_dim, np.float32)}
    path = testing.write_tiny_gguf(tmp_path / "norm.gguf", params, CONFIG, extra_tensors=norm)
    with pytest.raises(ValueError, match=r"norm\.gguf holds 1 tensor\(s\).*'blk\.1\.attn_k_norm"):
        t2_jax.load_gguf(path)
    with pytest.warns(UserWarning, match="attn_k_norm"):
        loaded, _ = t2_jax.load_gguf(path, allow_unused=True)
    testing.assert_trees_close(loaded, params)


# ---- truncated or damaged files, tensors of the wrong shape ----------------------------------


def test_truncated_safetensors_names_the_file_and_tensor(params, tmp_path):
    directory = write_hf_directory(tmp_path / "cut", t2_jax.params_to_hf_state(params, CONFIG),
                                   model_type="qwen2")
    file = directory / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors \(\d+ bytes\) is truncated or "
                                         r"damaged: tensor '[\w.]+' \(shape \(\d+, \d+\), F32\) "
                                         r"occupies bytes"):
        t2_jax.load_hf(directory)
    file.write_bytes(data[:100])  # inside the JSON header
    with pytest.raises(ValueError, match=r"truncated or damaged: its header claims \d+ bytes"):
        t2_jax.read_safetensors(file)
    file.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated or damaged: it is shorter than"):
        t2_jax.read_safetensors(file)


def test_safetensors_header_disagreeing_with_its_bytes_is_damage(tmp_path):
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 40]}})
    file = tmp_path / "bad.safetensors"
    file.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(40))
    with pytest.raises(ValueError, match=r"bad\.safetensors .*damaged: tensor 'w' of shape "
                                         r"\(3, 5\) and dtype F32 needs 60 bytes, its header "
                                         r"entry gives 40"):
        t2_jax.read_safetensors(file)


def test_hf_tensor_of_the_wrong_shape_is_named(params, tmp_path):
    state = t2_jax.params_to_hf_state(params, CONFIG)
    name = "model.layers.1.self_attn.k_proj.weight"
    state[name] = state[name].T  # (32, 16) where (K*E, D) = (16, 32) belongs
    directory = write_hf_directory(tmp_path / "shape", state, model_type="qwen2")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn"
                                         r"\.k_proj\.weight' has shape \(32, 16\), config "
                                         r"'.*' expects \(16, 32\)"):
        t2_jax.load_hf(directory)


def test_truncated_gguf_names_the_file(params, tmp_path):
    path = testing.write_tiny_gguf(tmp_path / "cut.gguf", params, CONFIG)
    data = path.read_bytes()
    for keep in (len(data) - 1000, 200):
        path.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=r"GGUF file .*cut\.gguf \(\d+ bytes\) is truncated "
                                             r"or damaged"):
            t2_jax.load_gguf(path)


def test_gguf_tensor_disagreeing_with_its_metadata_is_named(params, tmp_path):
    path = testing.write_tiny_gguf(tmp_path / "meta.gguf", params, CONFIG)
    # rewrite llama.feed_forward_length (uint32 64) to 48: the FFN tensors no longer fit
    key = b"llama.feed_forward_length"
    data = path.read_bytes()
    at = data.index(key) + len(key) + 4  # the key, then its 4-byte value type
    assert int.from_bytes(data[at:at + 4], "little") == CONFIG.intermediate_size
    path.write_bytes(data[:at] + (48).to_bytes(4, "little") + data[at + 4:])
    with pytest.raises(ValueError, match=r"meta\.gguf: tensor 'blk\.0\.ffn_\w+\.weight' has shape "
                                         r"\((64, 32|32, 64)\), but the file's metadata .* "
                                         r"implies \((48, 32|32, 48)\)"):
        t2_jax.load_gguf(path)


def test_name_tables_cover_every_parameter():
    import jax

    config = CONFIG.replace(attention_output_bias=True, name="tiny-all-biases")
    shapes = t2_jax.hf_tensor_shapes(config)
    ours = jax.tree.leaves(t2_jax.param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(int(np.prod(s)) for s in ours)
    assert shapes["model.layers.1.self_attn.o_proj.bias"] == (config.hidden_size,)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 32)  # PyTorch (out, in)
    assert t2_jax.gguf_tensor_name("model.layers.1.self_attn.o_proj.bias") == (
        "blk.1.attn_output.bias")
    assert t2_jax.gguf_tensor_name("lm_head.weight") == "output.weight"
