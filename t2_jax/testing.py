"""Tiny models for tests: random JAX parameters, tiny Hugging Face checkpoints written by
transformers (needs the optional `hf` extra: torch + transformers), and a tree comparison that
cannot pass on mismatched trees."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from t2_jax._config import PRESETS, LlamaConfig
from t2_jax._model import param_shapes
from t2_jax._svf import flatten_paths

TINY = PRESETS["tiny"]


def assert_trees_close(actual, desired, *, atol: float = 0.0, rtol: float = 0.0,
                       check_dtype: bool = True) -> None:
    """Assert that two pytrees have the same leaf paths (in the same order), shapes, dtypes and
    values within atol + rtol * |desired| (exact with the defaults; NaNs compare equal).

    Raises AssertionError on any difference in structure and when `desired` has no leaves: a
    comparison that can pass on mismatched or empty trees is a test that cannot fail.
    """
    flat_actual, flat_desired = flatten_paths(actual), flatten_paths(desired)
    if not flat_desired:
        raise AssertionError("assert_trees_close: the expected tree has no leaves, so the "
                             "comparison would pass vacuously")
    if list(flat_actual) != list(flat_desired):
        missing = sorted(set(flat_desired) - set(flat_actual))
        unexpected = sorted(set(flat_actual) - set(flat_desired))
        raise AssertionError(f"trees differ in structure: missing {missing}, unexpected "
                             f"{unexpected}" + ("" if missing or unexpected else
                                                " (same paths in another order)"))
    for (path, a), b in zip(flat_actual.items(), flat_desired.values(), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise AssertionError(f"leaf {path}: shape {a.shape} != expected {b.shape}")
        if check_dtype and a.dtype != b.dtype:
            raise AssertionError(f"leaf {path}: dtype {a.dtype} != expected {b.dtype}")
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), atol=atol,
                                   rtol=rtol, err_msg=f"leaf {path}")


def tiny_params(config: LlamaConfig = TINY, seed: int = 0, std: float = 0.2):
    """Random parameters of a tiny model (numpy RNG, no compilation): N(0, std^2) matrices and
    norm scales 1 + N(0, 0.01), so that logits are O(1) and tests can fail."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        noise = rng.standard_normal(shape).astype(np.float32)
        if "norm" in jax.tree_util.keystr(path):
            return jnp.asarray(1.0 + 0.1 * noise)
        return jnp.asarray(std * noise)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config),
                                            is_leaf=lambda x: isinstance(x, tuple))


def write_tiny_hf_checkpoint(directory: str | pathlib.Path, family: str, seed: int = 0,
                             std: float = 0.2, max_shard_size: str | None = None,
                             **overrides) -> pathlib.Path:
    """Write a tiny random checkpoint with transformers' own save_pretrained (safetensors).

    family: "llama" (separate embeddings, llama3 RoPE scaling), "llama-bias" (the same with
    attention_bias: q, k, v and o biases), "qwen2" (q/k/v biases, tied embeddings) or
    "mistral" (sliding window 4). Weights are redrawn with a larger std than transformers' init
    so that logits are O(1) and parity tests are sensitive.
    """
    import torch
    import transformers

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
    if family in ("llama", "llama-bias"):
        common.update(tie_word_embeddings=False, attention_bias=family == "llama-bias",
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
        cls_config, cls_model = transformers.LlamaConfig, transformers.LlamaForCausalLM
    elif family == "qwen2":
        common.update(tie_word_embeddings=True, rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0})
        cls_config, cls_model = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    elif family == "mistral":
        common.update(tie_word_embeddings=False, sliding_window=4, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0})
        cls_config, cls_model = transformers.MistralConfig, transformers.MistralForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    common.update(overrides)
    hf_config = cls_config(**common)
    torch.manual_seed(seed)
    model = cls_model(hf_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)
    directory = pathlib.Path(directory)
    if max_shard_size is None:
        model.save_pretrained(directory)
    else:  # several model-0000k-of-0000n.safetensors files + model.safetensors.index.json
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def load_hf_torch_model(directory: str | pathlib.Path):
    """The transformers model for a directory, float32, eager attention, eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


# ---- golden fixtures: transformers' outputs stored for a parity test without torch ------------

GOLDEN_FAMILIES = ("llama", "llama-bias", "qwen2", "mistral")
# smaller than the live parity test's checkpoints (vocab 96, MLP 48) to keep the committed
# files small: about 70 KB of float32 weights and 20 KB of logits per family
GOLDEN_SIZES = dict(vocab_size=64, intermediate_size=32)
GOLDEN_NEW_TOKENS = 10


def write_golden_fixture(directory: str | pathlib.Path, family: str) -> pathlib.Path:
    """A tiny random checkpoint written by transformers (config.json + model.safetensors) and,
    in golden.npz, what transformers computes from it (float32, eager attention):

      tokens (2, 24) -> logits (2, 24, V)            past llama3's original context 16 and
                                                     Mistral's window 4
      padded_tokens, padded_mask (2, 12), row 0 left-padded by 5 -> padded_logits (2, 12, V)
      prompt (2, 7) -> generated (2, 10)             greedy, no stop token
      versions                                       transformers and torch versions

    Needs the `hf` extra (torch + transformers). experiments/make_t2_golden.py writes the
    committed fixtures; tests/t2/test_t2_golden.py compares our loader + model with them.
    """
    import torch
    import transformers

    directory = pathlib.Path(directory)
    write_tiny_hf_checkpoint(directory, family, **GOLDEN_SIZES)
    (directory / "generation_config.json").unlink(missing_ok=True)  # not needed to load
    model = load_hf_torch_model(directory)
    vocab = model.config.vocab_size
    tokens = random_tokens(2, 24, vocab, seed=1)
    padded_tokens = random_tokens(2, 12, vocab, seed=2)
    padded_mask = np.ones_like(padded_tokens)
    padded_mask[0, :5] = 0
    positions = np.clip(np.cumsum(padded_mask, axis=1) - 1, 0, None)
    prompt = random_tokens(2, 7, vocab, seed=3)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        logits = model(as_long(tokens)).logits.numpy()
        padded_logits = model(as_long(padded_tokens), attention_mask=as_long(padded_mask),
                              position_ids=as_long(positions)).logits.numpy()
        generated = model.generate(as_long(prompt), attention_mask=torch.ones_like(as_long(prompt)),
                                   max_new_tokens=GOLDEN_NEW_TOKENS,
                                   min_new_tokens=GOLDEN_NEW_TOKENS, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    np.savez(directory / "golden.npz", tokens=tokens, logits=logits.astype(np.float32),
             padded_tokens=padded_tokens, padded_mask=padded_mask.astype(np.int32),
             padded_logits=padded_logits.astype(np.float32), prompt=prompt,
             generated=generated[:, prompt.shape[1]:].numpy().astype(np.int32),
             versions=np.asarray(versions))
    return directory


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


def write_tiny_gguf(path: str | pathlib.Path, params, config: LlamaConfig, tokenizer=None,
                    chat_template: str | None = None, quantization: str | None = None,
                    arch: str = "llama", extra_tensors=None) -> pathlib.Path:
    """Write params as a GGUF file the way llama.cpp's converter does: Q/K rows permuted to
    adjacent-pair RoPE order for arch "llama" (qwen2 keeps rotate-half order), F32 tensors, or
    matrices quantised with gguf.quants ("Q8_0") when asked. tokenizer: a byte-level BPE
    `tokenizers.Tokenizer` whose vocab/merges go into tokenizer.ggml.* ("smollm" pre-tokenizer)."""
    import gguf

    from t2_jax._loaders import gguf_tensor_name, params_to_hf_state, permute_qk_for_gguf

    if config.rope_layout != "half":
        raise ValueError("write_tiny_gguf expects rotate-half (Hugging Face) parameters")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_name("tiny-test")
    if tokenizer is not None:
        model = json.loads(tokenizer.to_str())["model"]
        tokens = sorted(model["vocab"], key=model["vocab"].get)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in special else 1 for t in tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    state = params_to_hf_state(params, config)
    permute = arch == "llama"

    def put(name, array):
        array = np.ascontiguousarray(array, np.float32)
        if quantization and array.ndim == 2:
            qtype = getattr(gguf.GGMLQuantizationType, quantization)
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)

    for name, array in state.items():  # Q/K weights and biases permuted for "pairs" RoPE
        heads = (config.num_heads if ".q_proj." in name else
                 config.num_kv_heads if ".k_proj." in name else None)
        if permute and heads is not None:
            array = permute_qk_for_gguf(array, heads)
        put(gguf_tensor_name(name), array)
    for name, array in (extra_tensors or {}).items():
        put(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(path)


def hf_model_from_params(params, config: LlamaConfig, attn_implementation: str = "sdpa"):
    """A transformers model (float32, eval mode) holding our parameters: LlamaForCausalLM
    (with attention_bias=True when config.attention_output_bias), Qwen2ForCausalLM when
    config.attention_bias only, MistralForCausalLM with a sliding window.
    Used by the benchmark (same weights on both sides) and the parity tests."""
    import torch
    import transformers

    if config.rope_layout != "half":
        raise ValueError("Hugging Face models use rotate-half RoPE; load with rope_layout='half'")
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                  num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                  rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_embeddings,
                  max_position_embeddings=config.max_position_embeddings, rope_parameters=rope)
    if config.attention_output_bias:  # Llama's attention_bias: q, k, v and o biases
        if not config.attention_bias or config.sliding_window is not None:
            raise ValueError("transformers has an o_proj bias only with q/k/v biases and no "
                             "sliding window (LlamaConfig(attention_bias=True))")
        hf_config = transformers.LlamaConfig(attention_bias=True, **common)
        model_class = transformers.LlamaForCausalLM
    elif config.attention_bias:
        hf_config = transformers.Qwen2Config(**common)
        model_class = transformers.Qwen2ForCausalLM
    elif config.sliding_window is not None:
        hf_config = transformers.MistralConfig(sliding_window=config.sliding_window, **common)
        model_class = transformers.MistralForCausalLM
    else:
        hf_config = transformers.LlamaConfig(**common)
        model_class = transformers.LlamaForCausalLM
    hf_config._attn_implementation = attn_implementation
    model = model_class(hf_config).eval()
    from t2_jax._loaders import params_to_hf_state

    state = {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in
             params_to_hf_state(params, config).items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


class ByteTokenizer:
    """A tokenizer for tiny models: one id per character (its code point modulo vocab_size, 0
    reserved for padding). Enough for the expert trainer's tests and its --quick runs."""

    def __init__(self, vocab_size: int = TINY.vocab_size):
        self.vocab_size = vocab_size
        self.pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % (self.vocab_size - 1) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(int(i) - 1) for i in np.asarray(ids).reshape(-1) if int(i) > 0)

    def chat_stop_ids(self) -> tuple[int, ...]:
        return (self.encode("\n")[0],)


def synthetic_task(kind: str = "choice", n: int = 64, seed: int = 0, num_options: int = 4):
    """Small addition questions as TaskExamples ("choice": "3 + 4 =" with numeric options, one
    gold; "numeric": the same questions answered by a number). For tests and --quick runs."""
    from t2_jax._tasks import TaskExample

    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        prompt = f"{a} + {b} ="
        if kind == "choice":
            wrong = [x for x in rng.permutation(19).tolist() if x != a + b][:num_options - 1 - i % 2]
            choices = wrong + [a + b]
            order = rng.permutation(len(choices))
            choices = tuple(str(choices[j]) for j in order)
            examples.append(TaskExample(task="synthetic_choice", id=f"s{i}", kind="choice", question=prompt,
                                        prompt=prompt, choices=choices, gold=int(np.argmax(order == len(order) - 1)),
                                        target=str(a + b), content_key=f"{i}"))
        elif kind == "numeric":
            examples.append(TaskExample(task="synthetic_numeric", id=f"s{i}", kind="numeric", question=prompt,
                                        prompt=prompt, answer=str(a + b), target=f" {a + b}\n",
                                        content_key=f"{i}"))
        else:
            raise ValueError(f"synthetic_task: kind must be 'choice' or 'numeric', got {kind!r}")
    return examples
