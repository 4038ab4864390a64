"""titans_jax: Titans (arXiv 2501.00663) neural long-term memory in JAX/Flax.

Public API:
  MemoryConfig, MemoryState, init_memory_params, init_memory_state, memory_apply  (pure core)
  LMMConfig, LMMLayer, LMMState                                                   (Flax layer)
"""

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

__all__ = [
    "IMPLEMENTATIONS", "LMMConfig", "LMMLayer", "LMMState", "MemoryConfig", "MemoryState",
    "causal_depthwise_conv", "chunk_coefficients", "init_memory_params", "init_memory_state",
    "inner_loss", "memory_apply", "memory_mlp",
]
