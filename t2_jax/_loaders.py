"""Checkpoint loaders: Hugging Face directories (config.json + safetensors) and GGUF files.

Both produce the parameter pytree documented in _model.py (kernels stored (in, out)).
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from t2_jax._config import LlamaConfig
from t2_jax._model import Params, check_params

# ---- safetensors (read directly: numpy has no bfloat16, ml_dtypes does) ----------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as numpy arrays (memory-mapped, read-only)."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = data[begin:end].view(dtype).reshape(info["shape"])
    return tensors


def _hf_state_dict(directory: pathlib.Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(directory / shard))
        missing = set(weight_map) - set(state)
        if missing:
            raise ValueError(f"{index} lists tensors absent from its shards: {sorted(missing)[:5]}")
        return state
    if single.exists():
        return read_safetensors(single)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    state = {}
    for file in files:
        state.update(read_safetensors(file))
    return state


def hf_state_to_params(state: Mapping[str, np.ndarray], config: LlamaConfig,
                       dtype: Any = jnp.float32) -> Params:
    """Map Hugging Face tensor names (model.layers.{i}.self_attn.q_proj.weight, ...) to our
    stacked pytree; PyTorch (out, in) weights are transposed to (in, out) kernels."""
    L = config.num_layers

    def get(name):
        if name not in state:
            raise ValueError(f"checkpoint lacks tensor {name!r} required by config {config.name!r}")
        return np.asarray(state[name], dtype=np.float32)

    def stack(fmt, transpose=False):
        arrays = [get(fmt.format(i)) for i in range(L)]
        arrays = [a.T if transpose else a for a in arrays]
        return jnp.asarray(np.stack(arrays), dtype)

    p = "model.layers.{}."
    attn = {}
    for short in ("q", "k", "v", "o"):
        attn[short] = {"kernel": stack(p + f"self_attn.{short}_proj.weight", transpose=True)}
        if config.attention_bias and short != "o":
            attn[short]["bias"] = stack(p + f"self_attn.{short}_proj.bias")
    params = {
        "embed": jnp.asarray(get("model.embed_tokens.weight"), dtype),
        "layers": {
            "attn_norm": stack(p + "input_layernorm.weight"),
            "attn": attn,
            "mlp_norm": stack(p + "post_attention_layernorm.weight"),
            "mlp": {name: {"kernel": stack(p + f"mlp.{name}_proj.weight", transpose=True)}
                    for name in ("gate", "up", "down")},
        },
        "final_norm": jnp.asarray(get("model.norm.weight"), dtype),
    }
    if not config.tie_embeddings:
        params["lm_head"] = jnp.asarray(get("lm_head.weight").T, dtype)
    check_params(params, config)
    return params


def params_to_hf_state(params: Params, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Inverse of hf_state_to_params: Hugging Face tensor names, (out, in) float32 weights."""
    check_params(params, config)
    state = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
             "model.norm.weight": np.asarray(params["final_norm"], np.float32)}
    if not config.tie_embeddings:
        state["lm_head.weight"] = np.asarray(params["lm_head"], np.float32).T
    layers = params["layers"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = np.asarray(layers["attn_norm"][i], np.float32)
        state[p + "post_attention_layernorm.weight"] = np.asarray(layers["mlp_norm"][i], np.float32)
        for short, leaf in layers["attn"].items():
            kernel = np.asarray(leaf["kernel"][i], np.float32)
            state[p + f"self_attn.{short}_proj.weight"] = kernel.T
            if "bias" in leaf:
                state[p + f"self_attn.{short}_proj.bias"] = np.asarray(leaf["bias"][i], np.float32)
        for name, leaf in layers["mlp"].items():
            state[p + f"mlp.{name}_proj.weight"] = np.asarray(leaf["kernel"][i], np.float32).T
    return state


def load_hf(directory: str | pathlib.Path, dtype: Any = jnp.float32) -> tuple[Params, LlamaConfig]:
    """Load a Hugging Face model directory: config.json + model.safetensors (or a sharded
    model.safetensors.index.json). Returns (params, config)."""
    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: expected a Hugging Face model directory")
    config = LlamaConfig.from_hf_dict(json.loads(config_file.read_text()))
    return hf_state_to_params(_hf_state_dict(directory), config, dtype), config


# ---- GGUF -------------------------------------------------------------------------------------


def permute_qk_for_gguf(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's reordering of Q/K rows (out, in): within each head, rows (i, i + E/2) become
    adjacent (2i, 2i+1), so "pairs" RoPE on the result equals "half" RoPE on the input."""
    out = weight.shape[0]
    return (weight.reshape(num_heads, 2, out // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_qk_from_gguf(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of permute_qk_for_gguf."""
    out = weight.shape[0]
    return (weight.reshape(num_heads, out // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return field.contents()


def _float32_value(value) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; recover the shortest decimal."""
    return float(str(np.float32(value)))


def config_from_gguf(reader, rope_layout: str = "half") -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}; expected llama or qwen2")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise NotImplementedError("this GGUF carries llama3 RoPE frequency factors "
                                  "(rope_freqs.weight), which load_gguf does not read yet; load "
                                  "the Hugging Face checkpoint with load_hf instead")
    scaling = reader.fields.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling.contents() not in ("none", ""):
        raise NotImplementedError(f"GGUF RoPE scaling {scaling.contents()!r} is not supported")
    vocab = reader.fields.get(f"{arch}.vocab_size")
    vocab_size = int(vocab.contents()) if vocab is not None else len(
        _field(reader, "tokenizer.ggml.tokens"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=_float32_value(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_layout=rope_layout,
        rms_norm_eps=_float32_value(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 8192)),
        name=str(_field(reader, "general.name", arch)),
    )


def load_gguf(path: str | pathlib.Path, dtype: Any = jnp.float32,
              rope_layout: str = "half") -> tuple[Params, LlamaConfig]:
    """Load a GGUF file (any quantisation the `gguf` package dequantises) into (params, config).

    GGUF stores Q/K rows permuted for llama.cpp's adjacent-pair RoPE. rope_layout="half"
    un-permutes them (the result equals the Hugging Face checkpoint); rope_layout="pairs" keeps
    the stored rows and rotates adjacent pairs instead. Both give the same logits.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} not found")
    reader = GGUFReader(path)
    config = config_from_gguf(reader, rope_layout)
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        if name not in tensors:
            raise ValueError(f"{path.name} lacks tensor {name!r}")
        t = tensors[name]
        array = dequantize(t.data, t.tensor_type).astype(np.float32)
        # numpy order is the reverse of GGML's ne[]: (out, in) for matrices.
        return array.reshape(tuple(int(n) for n in reversed(t.shape)))

    # llama.cpp permutes Q/K rows (and biases) to adjacent pairs for the llama architecture
    # only; qwen2 files keep the Hugging Face rotate-half order.
    stored_layout = "pairs" if _field(reader, "general.architecture") == "llama" else "half"

    def qk(name, heads):
        weight = get(name)
        if stored_layout == rope_layout:
            return weight
        if stored_layout == "pairs":
            return unpermute_qk_from_gguf(weight, heads)
        return permute_qk_for_gguf(weight, heads)

    state = {"model.embed_tokens.weight": get("token_embd.weight"),
             "model.norm.weight": get("output_norm.weight")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = get("output.weight")
    for i in range(config.num_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = get(b + "attn_norm.weight")
        state[p + "post_attention_layernorm.weight"] = get(b + "ffn_norm.weight")
        state[p + "self_attn.q_proj.weight"] = qk(b + "attn_q.weight", config.num_heads)
        state[p + "self_attn.k_proj.weight"] = qk(b + "attn_k.weight", config.num_kv_heads)
        state[p + "self_attn.v_proj.weight"] = get(b + "attn_v.weight")
        state[p + "self_attn.o_proj.weight"] = get(b + "attn_output.weight")
        if config.attention_bias:
            state[p + "self_attn.q_proj.bias"] = qk(b + "attn_q.bias", config.num_heads)
            state[p + "self_attn.k_proj.bias"] = qk(b + "attn_k.bias", config.num_kv_heads)
            state[p + "self_attn.v_proj.bias"] = get(b + "attn_v.bias")
        for name, short in (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
            state[p + f"mlp.{name}_proj.weight"] = get(b + f"{short}.weight")
    return hf_state_to_params(state, config, dtype), config


def gguf_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """Scalar/string GGUF metadata (arrays such as the vocabulary are left out)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > 16:
            continue
        out[key] = field.contents()
    return out
