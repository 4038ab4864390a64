"""GGUF files written here read back exactly (Q/K un-permuted, or kept with adjacent-pair RoPE);
tokenizers rebuilt from GGUF metadata; chat templates."""

import numpy as np
import pytest

import jax.numpy as jnp

import t2_jax
from t2_jax import testing

CONFIG = t2_jax.get_config("tiny")
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. In 1813 she wrote 42 letters; 7 of them survive.\n"
        "However little known the feelings or views of such a man may be...")


def tiny_bpe(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    return tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tokenizer = tiny_bpe(300)
    config = CONFIG.replace(vocab_size=tokenizer.get_vocab_size(), name="tiny-gguf")
    params = testing.tiny_params(config, seed=5)
    path = testing.write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", params, config,
                                   tokenizer=tokenizer,
                                   chat_template="{{ '<|im_start|>' }} ... SmolLM ...")
    return path, params, config, tokenizer


def test_permutation_round_trip_and_meaning():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3 * 8, 5))
    permuted = t2_jax.permute_qk_for_gguf(weight, 3)
    np.testing.assert_array_equal(t2_jax.unpermute_qk_from_gguf(permuted, 3), weight)
    # row i and row i + E/2 of head h become rows 2i and 2i+1
    np.testing.assert_array_equal(permuted[8 + 2], weight[8 + 1])
    np.testing.assert_array_equal(permuted[8 + 3], weight[8 + 1 + 4])


def test_rope_layouts_agree_under_the_permutation():
    config = CONFIG
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, config.head_dim)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 50, (2, 5)))
    order = t2_jax.permute_qk_for_gguf(np.arange(config.head_dim), 1)
    half = t2_jax.apply_rope(x, positions, config)
    pairs = t2_jax.apply_rope(x[..., order], positions, config.replace(rope_layout="pairs"))
    np.testing.assert_allclose(pairs, half[..., order], atol=1e-6)


def test_tiny_gguf_reads_back_exactly(tiny_gguf):
    path, params, config, _ = tiny_gguf
    loaded, loaded_config = t2_jax.load_gguf(path)
    assert loaded_config.replace(name=config.name, max_position_embeddings=
                                 config.max_position_embeddings) == config
    testing.assert_trees_close(loaded, params)


def test_tiny_gguf_pairs_layout_gives_same_logits(tiny_gguf):
    path, params, config, _ = tiny_gguf
    pairs, pairs_config = t2_jax.load_gguf(path, rope_layout="pairs")
    assert pairs_config.rope_layout == "pairs"
    # the stored (permuted) Q rows are kept as they are
    assert not np.array_equal(pairs["layers"]["attn"]["q"]["kernel"],
                              params["layers"]["attn"]["q"]["kernel"])
    tokens = testing.random_tokens(2, 10, config.vocab_size, seed=2)
    want, _ = t2_jax.apply(params, config, tokens)
    got, _ = t2_jax.apply(pairs, pairs_config, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_quantised_gguf_dequantises_close(tiny_gguf, tmp_path):
    _, params, config, _ = tiny_gguf
    path = testing.write_tiny_gguf(tmp_path / "q8.gguf", params, config, quantization="Q8_0")
    loaded, _ = t2_jax.load_gguf(path)
    q = loaded["layers"]["mlp"]["up"]["kernel"]
    original = params["layers"]["mlp"]["up"]["kernel"]
    error = np.abs(np.asarray(q) - np.asarray(original))
    assert 0 < error.max() < 0.01 * np.abs(np.asarray(original)).max()  # quantised, and close


def test_tokenizer_rebuilt_from_gguf_matches_the_original(tiny_gguf):
    path, _, _, tokenizer = tiny_gguf
    rebuilt = t2_jax.load_tokenizer(path)
    for text in (TEXT, "truth 2024 <|im_end|> fortune!", "  spaces\tand\nnewlines  "):
        ids = rebuilt.encode(text)
        assert ids == tokenizer.encode(text).ids
        assert rebuilt.decode(ids) == text
    assert rebuilt.chat_format == "chatml"
    assert rebuilt.encode("<|im_end|>") == [rebuilt.token_id("<|im_end|>")]


def test_tokenizer_json_directory(tmp_path):
    tokenizer = tiny_bpe(280)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"eos_token": "<|im_end|>", "chat_template": "<|im_start|>{{ x }}"}')
    loaded = t2_jax.load_tokenizer(tmp_path)
    assert loaded.encode(TEXT) == tokenizer.encode(TEXT).ids
    assert loaded.eos_id == tokenizer.token_to_id("<|im_end|>") and loaded.chat_format == "chatml"


def test_chat_templates():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "}]
    assert t2_jax.render_chat(messages, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n"
        "<|im_start|>assistant\n")
    assert t2_jax.render_chat(messages[1:], "chatml", False, default_system="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n")
    assert t2_jax.render_chat(messages, "llama3") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="bad chat message"):
        t2_jax.render_chat([{"role": "robot", "content": "x"}], "chatml")


def test_chat_templates_match_jinja_sources():
    jinja2 = pytest.importorskip("jinja2", reason="jinja2 renders the reference templates")
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
              "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
              "%}{{ '<|im_start|>assistant\n' }}{% endif %}")
    llama3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content"
              " = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
              "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set "
              "content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
              "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
              "{% endif %}")
    messages = [{"role": "user", "content": " What is 2+2? "},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    for source, fmt in ((chatml, "chatml"), (llama3, "llama3")):
        want = jinja2.Template(source).render(messages=messages, add_generation_prompt=True,
                                              bos_token="<|begin_of_text|>")
        assert t2_jax.render_chat(messages, fmt) == want


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("rope_layout", ["half", "pairs"])
def test_gguf_with_qkv_biases_and_tied_embeddings(tmp_path, arch, rope_layout):
    # qwen2 files keep rotate-half Q/K rows; llama files permute rows and biases
    config = CONFIG.replace(attention_bias=True, tie_embeddings=True, name="tiny-qwen")
    params = testing.tiny_params(config, seed=6)
    path = testing.write_tiny_gguf(tmp_path / f"{arch}.gguf", params, config, arch=arch)
    loaded, loaded_config = t2_jax.load_gguf(path, rope_layout=rope_layout)
    assert loaded_config.attention_bias and loaded_config.tie_embeddings
    assert "lm_head" not in loaded
    if rope_layout == "half":
        testing.assert_trees_close(loaded, params)
    tokens = testing.random_tokens(1, 9, config.vocab_size, seed=7)
    want, _ = t2_jax.apply(params, config, tokens)
    got, _ = t2_jax.apply(loaded, loaded_config, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_gguf_with_llama3_rope_factors_is_refused(tmp_path):
    params = testing.tiny_params(CONFIG, seed=1)
    factors = np.ones(CONFIG.head_dim // 2, np.float32)
    path = testing.write_tiny_gguf(tmp_path / "l3.gguf", params, CONFIG,
                                   extra_tensors={"rope_freqs.weight": factors})
    with pytest.raises(NotImplementedError, match="rope_freqs.weight"):
        t2_jax.load_gguf(path)
