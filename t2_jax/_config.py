"""Configuration of a Llama-family decoder (Llama 3.x, Mistral, Qwen2.5, SmolLM2)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

RopeLayout = Literal["half", "pairs"]


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1+ frequency-dependent RoPE scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError("need 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor}, {self.high_freq_factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("original_max_position_embeddings must be > 0")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder.

    rope_layout: "half" rotates (x[i], x[i + Dh/2]) pairs (Hugging Face checkpoints);
    "pairs" rotates adjacent (x[2i], x[2i+1]) pairs (llama.cpp / GGUF layout of Q and K rows).
    attention_bias: q/k/v projections carry biases (Qwen2, and Llama's attention_bias).
    attention_output_bias: the output projection o carries a bias too (Llama's attention_bias
    biases all four projections; Qwen2's o has none). sliding_window: a key is visible
    to a query iff 0 <= query_index - key_index < sliding_window (Mistral v0.1); None = full.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rope_layout: RopeLayout = "half"
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    attention_output_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 8192
    name: str = "custom"

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                                 f"({self.num_heads}); give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be positive and even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_layout not in ("half", "pairs"):
            raise ValueError(f"rope_layout must be 'half' or 'pairs', got {self.rope_layout!r}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be None or > 0, got {self.sliding_window}")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        """Build from a Hugging Face config.json (llama, mistral, qwen2 model types)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r}; expected llama, mistral "
                             "or qwen2")
        scaling = hf.get("rope_scaling") or None
        rope_params = hf.get("rope_parameters") or None  # transformers >= 5 spelling
        theta = hf.get("rope_theta")
        if rope_params is not None:
            theta = rope_params.get("rope_theta", theta)
            if rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
        rope_scaling = None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rope_scaling = Llama3RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(
                        scaling["original_max_position_embeddings"]))
            elif kind not in (None, "default"):
                raise ValueError(f"unsupported rope scaling type {kind!r}")
        # Which projections carry biases follows transformers' modeling code: Llama's
        # attention_bias biases q, k, v and o; Qwen2 always biases q, k, v (never o); Mistral
        # has no biases (its attention ignores attention_bias).
        if model_type == "qwen2":
            attention_bias, attention_output_bias = True, False
            use_sliding = hf.get("use_sliding_window", False)
            sliding_window = hf.get("sliding_window") if use_sliding else None
        elif model_type == "mistral":
            attention_bias = attention_output_bias = False
            sliding_window = hf.get("sliding_window")
        else:
            attention_bias = attention_output_bias = bool(hf.get("attention_bias", False))
            sliding_window = None
        if hf.get("mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            attention_output_bias=attention_output_bias,
            sliding_window=sliding_window,
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            name=str(hf.get("_name_or_path") or model_type),
        )


# ---- Named presets (shapes from the published config.json files) ------------------------------

PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                        tie_embeddings=False, max_position_embeddings=256, name="tiny"),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                                rms_norm_eps=1e-5, tie_embeddings=True,
                                max_position_embeddings=8192, name="smollm2-135m"),
    "smollm2-360m": LlamaConfig(vocab_size=49152, hidden_size=960, intermediate_size=2560,
                                num_layers=32, num_heads=15, num_kv_heads=5, rope_theta=100000.0,
                                rms_norm_eps=1e-5, tie_embeddings=True,
                                max_position_embeddings=8192, name="smollm2-360m"),
    "qwen2.5-0.5b": LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, rope_theta=1000000.0,
                                rms_norm_eps=1e-6, tie_embeddings=True, attention_bias=True,
                                max_position_embeddings=32768, name="qwen2.5-0.5b"),
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                                rope_theta=500000.0,
                                rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192),
                                rms_norm_eps=1e-5, tie_embeddings=True,
                                max_position_embeddings=131072, name="llama-3.2-1b"),
    "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                              rms_norm_eps=1e-5, tie_embeddings=False,
                              max_position_embeddings=8192, name="llama-3-8b"),
    # Mistral-7B-Instruct-v0.3, the paper's model (v0.1 had vocab 32000, sliding window 4096).
    "mistral-7b": LlamaConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=1000000.0,
                              rms_norm_eps=1e-5, tie_embeddings=False,
                              max_position_embeddings=32768, name="mistral-7b"),
}


def get_config(name: str) -> LlamaConfig:
    """A named preset: one of PRESETS."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
