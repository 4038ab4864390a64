"""Checkpoint loaders: Hugging Face directories (config.json + safetensors) and GGUF files.

Both produce the parameter pytree documented in _model.py (kernels stored (in, out)). Every
tensor the config implies is loaded, and a tensor the model would not use is an error (or, with
allow_unused=True, a warning naming it): nothing in a checkpoint is dropped without a word.
"""

from __future__ import annotations

import json
import pathlib
import re
import struct
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from t2_jax._config import LlamaConfig
from t2_jax._model import Params, check_params, param_shapes
from t2_jax._svf import flatten_paths, unflatten_paths

# ---- safetensors (read directly: numpy has no bfloat16, ml_dtypes does) ----------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as numpy arrays (memory-mapped, read-only).

    A truncated or damaged file (header cut short or unparsable, a tensor whose bytes lie past
    the end of the file or do not match its shape and dtype) raises ValueError naming the file
    and the tensor.
    """
    path = pathlib.Path(path)
    size = path.stat().st_size

    def damaged(why):
        return ValueError(f"safetensors file {path} ({size} bytes) is truncated or damaged: {why}")

    if size < 8:
        raise damaged("it is shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise damaged(f"its header claims {header_len} bytes, only {size - 8} follow")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise damaged(f"its JSON header does not parse ({error})") from error
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    data_size = size - 8 - header_len
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if data_size
            else np.zeros(0, np.uint8))
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape = info["dtype"], tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise damaged(f"the header entry of tensor {name!r} is malformed: {info!r}") from None
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
        needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != needed:
            raise damaged(f"tensor {name!r} of shape {shape} and dtype {dtype_name} needs "
                          f"{needed} bytes, its header entry gives {end - begin}")
        if not 0 <= begin <= end <= data_size:
            raise damaged(f"tensor {name!r} (shape {shape}, {dtype_name}) occupies bytes "
                          f"[{begin}, {end}) of the data section, which holds {data_size}")
        tensors[name] = data[begin:end].view(dtype).reshape(shape)
    return tensors


def _hf_state_dict(directory: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, the file each came from) of a Hugging Face directory."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / shard for shard in sorted(set(weight_map.values()))]
    elif single.exists():
        files = [single]
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {directory}")
    state, origins = {}, {}
    for file in files:
        tensors = read_safetensors(file)
        state.update(tensors)
        origins.update(dict.fromkeys(tensors, str(file)))
    if index.exists():
        missing = set(weight_map) - set(state)
        if missing:
            raise ValueError(f"{index} lists tensors absent from its shards: {sorted(missing)[:5]}")
    return state, origins


def _hf_name(path: str) -> tuple[str, bool]:
    """Our leaf path (layers/attn/q/kernel) -> (Hugging Face name, with "{}" for the layer
    index, and whether the PyTorch weight is the transpose of our kernel)."""
    top = {"embed": ("model.embed_tokens.weight", False),
           "final_norm": ("model.norm.weight", False), "lm_head": ("lm_head.weight", True),
           "layers/attn_norm": ("model.layers.{}.input_layernorm.weight", False),
           "layers/mlp_norm": ("model.layers.{}.post_attention_layernorm.weight", False)}
    if path in top:
        return top[path]
    match = re.fullmatch(r"layers/(attn|mlp)/(\w+)/(kernel|bias)", path)
    if match is None:
        raise ValueError(f"no Hugging Face name for parameter {path}")
    block = "self_attn" if match[1] == "attn" else "mlp"
    kind = "weight" if match[3] == "kernel" else "bias"
    return f"model.layers.{{}}.{block}.{match[2]}_proj.{kind}", match[3] == "kernel"


def _leaf_paths(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    shapes = param_shapes(config)
    return {"/".join(str(k.key) for k in path): shape for path, shape in
            jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]}


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a Hugging Face checkpoint of `config` holds (PyTorch
    layout: weights (out, in)), in a fixed order."""
    out = {}
    for path, shape in _leaf_paths(config).items():
        name, transpose = _hf_name(path)
        if path.startswith("layers/"):
            per_layer = shape[1:][::-1] if transpose else shape[1:]
            for i in range(config.num_layers):
                out[name.format(i)] = tuple(per_layer)
        else:
            out[name] = tuple(shape[::-1] if transpose else shape)
    return out


def _list_names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _refuse_unused(unused: list[str], allow_unused: bool, source: str, what: str) -> None:
    """An error listing tensors the model would not use, or a warning with allow_unused."""
    if not unused:
        return
    message = (f"{source} holds {len(unused)} tensor(s) that {what} does not use: "
               f"{_list_names(unused)}")
    if not allow_unused:
        raise ValueError(message + "; refusing to drop them silently (pass allow_unused=True to "
                         "load anyway with a warning)")
    warnings.warn(message + "; they are ignored (allow_unused=True)", stacklevel=3)


def _ignorable(name: str, state: Mapping[str, np.ndarray], config: LlamaConfig) -> bool:
    """Tensors that carry no information of their own: RoPE inverse-frequency buffers some
    older checkpoints store, and a tied lm_head saved as a copy of the embedding."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return (name == "lm_head.weight" and config.tie_embeddings
            and "model.embed_tokens.weight" in state
            and np.array_equal(state[name], state["model.embed_tokens.weight"]))


def hf_state_to_params(state: Mapping[str, np.ndarray], config: LlamaConfig,
                       dtype: Any = jnp.float32, *, allow_unused: bool = False,
                       source: str = "checkpoint",
                       origins: Mapping[str, str] | None = None) -> Params:
    """Map Hugging Face tensor names (model.layers.{i}.self_attn.q_proj.weight, ...) to our
    stacked pytree; PyTorch (out, in) weights are transposed to (in, out) kernels.

    Every tensor the config implies must be present (hf_tensor_shapes), and a tensor the model
    does not use is refused with a ValueError listing it; allow_unused=True turns that into a
    warning. A tensor of the wrong shape is a ValueError naming it, its file and both shapes.
    `source` names the checkpoint in error messages, `origins` the file of each tensor.
    """
    expected = hf_tensor_shapes(config)
    missing = [name for name in expected if name not in state]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensor(s) required by config "
                         f"{config.name!r}: {_list_names(missing)}")
    for name, shape in expected.items():
        found = tuple(np.shape(state[name]))
        if found != shape:
            where = f"file {origins[name]}" if origins and name in origins else source
            raise ValueError(f"{where}: tensor {name!r} has shape {found}, config "
                             f"{config.name!r} expects {shape}")
    unused = sorted(n for n in state if n not in expected and not _ignorable(n, state, config))
    _refuse_unused(unused, allow_unused, source, f"config {config.name!r}")

    def get(name):
        return np.asarray(state[name], dtype=np.float32)

    def leaf(path, shape):
        name, transpose = _hf_name(path)
        if not path.startswith("layers/"):
            array = get(name)
            return jnp.asarray(array.T if transpose else array, dtype)
        arrays = [get(name.format(i)) for i in range(config.num_layers)]
        return jnp.asarray(np.stack([a.T if transpose else a for a in arrays]), dtype)

    params = unflatten_paths({path: leaf(path, shape)
                              for path, shape in _leaf_paths(config).items()})
    check_params(params, config)
    return params


def params_to_hf_state(params: Params, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Inverse of hf_state_to_params: Hugging Face tensor names, (out, in) float32 weights."""
    check_params(params, config)
    flat = flatten_paths(params)
    state = {}
    for path in _leaf_paths(config):
        name, transpose = _hf_name(path)
        array = np.asarray(flat[path], np.float32)
        if not path.startswith("layers/"):
            state[name] = array.T if transpose else array
            continue
        for i in range(config.num_layers):
            state[name.format(i)] = array[i].T if transpose else array[i]
    return state


def load_hf(directory: str | pathlib.Path, dtype: Any = jnp.float32, *,
            allow_unused: bool = False) -> tuple[Params, LlamaConfig]:
    """Load a Hugging Face model directory: config.json + model.safetensors (or a sharded
    model.safetensors.index.json). Returns (params, config).

    A tensor the config does not use (e.g. a bias the architecture has no place for) is an
    error naming it; allow_unused=True loads anyway and names it in a warning.
    """
    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: expected a Hugging Face model directory")
    config = LlamaConfig.from_hf_dict(json.loads(config_file.read_text()))
    state, origins = _hf_state_dict(directory)
    params = hf_state_to_params(state, config, dtype, allow_unused=allow_unused,
                                source=f"checkpoint {directory}", origins=origins)
    return params, config


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
        attention_output_bias="blk.0.attn_output.bias" in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 8192)),
        name=str(_field(reader, "general.name", arch)),
    )


_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
               "output_norm.weight", "lm_head.weight": "output.weight", "input_layernorm":
               "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face tensor (model.layers.3.mlp.up_proj.weight ->
    blk.3.ffn_up.weight)."""
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if match is None or match[2] not in _GGUF_NAMES:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{match[1]}.{_GGUF_NAMES[match[2]]}.{match[3]}"


def load_gguf(path: str | pathlib.Path, dtype: Any = jnp.float32, rope_layout: str = "half", *,
              allow_unused: bool = False) -> tuple[Params, LlamaConfig]:
    """Load a GGUF file (any quantisation the `gguf` package dequantises) into (params, config).

    GGUF stores Q/K rows permuted for llama.cpp's adjacent-pair RoPE. rope_layout="half"
    un-permutes them (the result equals the Hugging Face checkpoint); rope_layout="pairs" keeps
    the stored rows and rotates adjacent pairs instead. Both give the same logits.
    A tensor the model does not use is an error naming it (a warning with allow_unused=True).
    """
    from gguf.quants import dequantize

    path = pathlib.Path(path)
    reader = _open_gguf(path)
    config = config_from_gguf(reader, rope_layout)
    tensors = {t.name: t for t in reader.tensors}
    # llama.cpp permutes Q/K rows (and biases) to adjacent pairs for the llama architecture
    # only; qwen2 files keep the Hugging Face rotate-half order.
    stored_layout = "pairs" if _field(reader, "general.architecture") == "llama" else "half"

    def get(name, expected, heads=None):
        if name not in tensors:
            raise ValueError(f"GGUF file {path} lacks tensor {name!r} required by config "
                             f"{config.name!r}")
        t = tensors[name]
        # numpy order is the reverse of GGML's ne[]: (out, in) for matrices.
        shape = tuple(int(n) for n in reversed(t.shape))
        if shape != expected:
            raise ValueError(f"GGUF file {path}: tensor {name!r} has shape {shape}, but the "
                             f"file's metadata (config {config.name!r}) implies {expected}")
        try:
            array = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        except (ValueError, NotImplementedError) as error:
            raise ValueError(f"GGUF file {path}: tensor {name!r} ({t.tensor_type.name}, shape "
                             f"{shape}) does not dequantise: {error}") from error
        if heads is None or stored_layout == rope_layout:
            return array
        if stored_layout == "pairs":
            return unpermute_qk_from_gguf(array, heads)
        return permute_qk_for_gguf(array, heads)

    state = {}
    for hf_name, expected in hf_tensor_shapes(config).items():
        heads = None
        if ".self_attn.q_proj." in hf_name:
            heads = config.num_heads
        elif ".self_attn.k_proj." in hf_name:
            heads = config.num_kv_heads
        state[hf_name] = get(gguf_tensor_name(hf_name), expected, heads)
    used = {gguf_tensor_name(name) for name in state}
    _refuse_unused(sorted(set(tensors) - used), allow_unused, f"GGUF file {path}",
                   f"config {config.name!r}")
    params = hf_state_to_params(state, config, dtype, source=f"GGUF file {path}")
    return params, config


def _open_gguf(path: pathlib.Path):
    """A GGUFReader, or a ValueError naming the file when it is truncated or damaged (the
    reader itself fails with bare numpy reshape or index errors)."""
    from gguf import GGUFReader

    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        return GGUFReader(path)
    except OSError:
        raise
    except Exception as error:  # any parse failure of the third-party reader means damage
        raise ValueError(f"GGUF file {path} ({path.stat().st_size} bytes) is truncated or "
                         f"damaged: reading it failed with {type(error).__name__}: {error}"
                         ) from error


def gguf_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """Scalar/string GGUF metadata (arrays such as the vocabulary are left out)."""
    from gguf import GGUFValueType

    reader = _open_gguf(pathlib.Path(path))
    out = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > 16:
            continue
        out[key] = field.contents()
    return out
