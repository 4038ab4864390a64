"""Our Llama / Qwen2 / Mistral against Hugging Face transformers (PyTorch, CPU, float32) on tiny
random checkpoints written by transformers itself and read back by our safetensors loader."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity needs the `hf` extra (torch)")
transformers = pytest.importorskip("transformers", reason="HF parity needs the `hf` extra")

import jax.numpy as jnp  # noqa: E402

import t2_jax  # noqa: E402
from t2_jax import testing  # noqa: E402

pytestmark = pytest.mark.peer

FAMILIES = ["llama", "llama-bias", "qwen2", "mistral"]
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    directory = testing.write_tiny_hf_checkpoint(tmp_path_factory.mktemp(request.param),
                                                 request.param)
    params, config = t2_jax.load_hf(directory)
    return request.param, params, config, testing.load_hf_torch_model(directory)


def test_loader_reads_config_and_all_tensors(checkpoint):
    family, params, config, model = checkpoint
    assert config.attention_bias == (family in ("qwen2", "llama-bias"))
    assert config.attention_output_bias == (family == "llama-bias")
    assert config.tie_embeddings == (family == "qwen2")
    assert config.sliding_window == (4 if family == "mistral" else None)
    assert (config.rope_scaling is not None) == family.startswith("llama")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q"]["kernel"][1]),
                                  state["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["down"]["kernel"][0]),
                                  state["model.layers.0.mlp.down_proj.weight"].T)
    if config.attention_bias:
        np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["k"]["bias"][0]),
                                      state["model.layers.0.self_attn.k_proj.bias"])
    if config.attention_output_bias:
        np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["o"]["bias"][1]),
                                      state["model.layers.1.self_attn.o_proj.bias"])
    # every tensor transformers holds was read (nothing dropped)
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    assert set(state) - tied == set(t2_jax.params_to_hf_state(params, config))


def test_logits_match(checkpoint):
    # 24 tokens: beyond the llama3-scaling original context (16) and Mistral's window (4).
    family, params, config, model = checkpoint
    tokens = testing.random_tokens(2, 24, config.vocab_size, seed=1)
    with torch.no_grad():
        reference = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours, _ = t2_jax.apply(params, config, jnp.asarray(tokens))
    assert np.abs(reference).max() > 1.0  # the check is sensitive
    np.testing.assert_allclose(np.asarray(ours), reference, atol=TOL, rtol=0)


def test_logits_match_with_left_padding(checkpoint):
    family, params, config, model = checkpoint
    tokens = testing.random_tokens(2, 12, config.vocab_size, seed=2)
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        reference = model(torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    ours, _ = t2_jax.apply(params, config, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], reference[real], atol=TOL, rtol=0)


def test_greedy_generation_matches(checkpoint):
    family, params, config, model = checkpoint
    tokens = testing.random_tokens(2, 7, config.vocab_size, seed=3)
    new = 10
    with torch.no_grad():
        reference = model.generate(torch.tensor(tokens, dtype=torch.long),
                                   attention_mask=torch.ones(tokens.shape, dtype=torch.long),
                                   max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    reference = reference[:, tokens.shape[1]:].numpy()
    ours = t2_jax.generate(params, config, tokens, max_new_tokens=new)
    np.testing.assert_array_equal(np.asarray(ours.tokens), reference)


def test_continuation_logprobs_match(checkpoint):
    family, params, config, model = checkpoint
    prompt = testing.random_tokens(1, 6, config.vocab_size, seed=4)
    continuation = testing.random_tokens(1, 5, config.vocab_size, seed=5)
    full = np.concatenate([prompt, continuation], axis=1)
    with torch.no_grad():
        logits = model(torch.tensor(full, dtype=torch.long)).logits
        logprobs = torch.log_softmax(logits, -1)[0, 5:-1].numpy()
    reference = logprobs[np.arange(5), continuation[0]]
    ours = t2_jax.continuation_logprobs(params, config, prompt, None, continuation)
    np.testing.assert_allclose(np.asarray(ours)[0], reference, atol=TOL, rtol=0)


def test_hf_model_built_from_our_params_matches():
    # the route the benchmark takes: our parameters -> a transformers model
    config = t2_jax.get_config("tiny")
    params = testing.tiny_params(config, seed=8)
    model = testing.hf_model_from_params(params, config, attn_implementation="eager")
    tokens = testing.random_tokens(2, 10, config.vocab_size, seed=9)
    with torch.no_grad():
        reference = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours, _ = t2_jax.apply(params, config, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), reference, atol=TOL, rtol=0)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    single = testing.write_tiny_hf_checkpoint(tmp_path / "single", "qwen2", seed=4)
    sharded = testing.write_tiny_hf_checkpoint(tmp_path / "sharded", "qwen2", seed=4,
                                               max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, config_a = t2_jax.load_hf(single)
    b, config_b = t2_jax.load_hf(sharded)
    assert config_a == config_b
    testing.assert_trees_close(b, a)


def test_safetensors_reader_handles_bfloat16(tmp_path):
    from safetensors.torch import save_file

    tensors = {"w": torch.randn(3, 5).to(torch.bfloat16), "i": torch.arange(4, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    read = t2_jax.read_safetensors(tmp_path / "x.safetensors")
    assert str(read["w"].dtype) == "bfloat16"
    np.testing.assert_array_equal(read["w"].astype(np.float32), tensors["w"].float().numpy())
    np.testing.assert_array_equal(read["i"], np.arange(4))


@pytest.mark.parametrize("family", testing.GOLDEN_FAMILIES)
def test_committed_golden_fixtures_are_current(family, tmp_path):
    # the fixtures test_t2_golden.py checks without torch equal what this transformers computes
    import pathlib

    committed = pathlib.Path(__file__).parent / "golden" / family
    fresh = testing.write_golden_fixture(tmp_path / family, family)
    assert (fresh / "model.safetensors").read_bytes() == (committed / "model.safetensors"
                                                          ).read_bytes()
    with np.load(fresh / "golden.npz") as new, np.load(committed / "golden.npz") as old:
        for key in ("tokens", "padded_tokens", "padded_mask", "prompt", "generated"):
            np.testing.assert_array_equal(new[key], old[key], err_msg=key)
        for key in ("logits", "padded_logits"):
            np.testing.assert_allclose(new[key], old[key], atol=TOL, rtol=0, err_msg=key)
