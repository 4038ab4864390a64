"""titans_jax: Titans (arXiv 2501.00663) in JAX/Flax — the neural long-term memory, the MAC /
MAG / MAL / LMM language models and their baselines.

Public API:
  MemoryConfig, MemoryState, init_memory_params, init_memory_state, memory_apply  (pure core)
  LMMConfig, LMMLayer, LMMState                                                   (Flax layer)
  ModelConfig, TitansLM, init_cache, preset, generate                             (models)
"""

from titans_jax.decoding import generate
from titans_jax.lmm import LMMConfig, LMMLayer, LMMState, causal_depthwise_conv
from titans_jax.memory import (
    IMPLEMENTATIONS,
    MemoryConfig,
    MemoryState,
    chunk_coefficients,
    init_memory_params,
    init_memory_state,
    inner_loss,
    memory_apply,
    memory_mlp,
)
from titans_jax.models import ARCHITECTURES, ModelConfig, TitansLM, init_cache, init_params, param_count
from titans_jax.presets import PRESETS, preset

__all__ = [
    "ARCHITECTURES", "IMPLEMENTATIONS", "LMMConfig", "LMMLayer", "LMMState", "MemoryConfig", "MemoryState",
    "ModelConfig", "PRESETS", "TitansLM", "causal_depthwise_conv", "chunk_coefficients", "generate",
    "init_cache", "init_memory_params", "init_memory_state", "init_params", "inner_loss", "memory_apply", "memory_mlp",
    "param_count", "preset",
]
