"""Named model shapes, with every architecture matched to the same parameter count.

`preset(name, arch)` returns a ModelConfig. All architectures of a preset share the width
(d_model, heads, head dim); where the preset has a parameter target, each architecture's depth
is solved at the standard SwiGLU width (8/3 d_model, rounded to 64) and then its MLP width is
fine-tuned (a multiple of 64) so that the total lands on the target. Titans blocks carry more
parameters than a Transformer block (the memory's projections and gates, M_0, MAC's retrieval
and attention), so at equal size they get fewer layers: a 340M MAC has 13 layers where the
Transformer++ has 22. Squeezing only the MLP instead would leave MAC at 340M with an MLP of
width 64, not a model anyone would train.

The paper trains 170M / 340M / 400M / 760M models (Llama-2 tokenizer, 32K vocabulary) but does
not list their shapes in the main text; our widths are the usual ones for those sizes (768,
1024, 1024, 1536). `python -m experiments.presets_report` prints every preset's layers, MLP width
and parameter count beside the target (from jax.eval_shape: nothing is allocated).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from titans_jax import config_tree
from titans_jax.models import ARCHITECTURES, STACKED_BLOCKS, ModelConfig, abstract_params, param_count

# Shapes as ModelConfig changes (nested fields by dotted path, see titans_jax.config_tree).
_TINY = {"vocab_size": 256, "d_model": 32, "num_layers": 2, "num_heads": 2, "head_dim": 16, "mlp_hidden": 64,
         "window": 16, "segment_size": 8, "lmm.memory.chunk_size": 4, "num_persistent": 2, "attention_block": 16,
         "num_learned_queries": 4}
_SMALL = {"vocab_size": 256, "d_model": 256, "num_heads": 4, "head_dim": 64, "window": 256, "segment_size": 128,
          "lmm.memory.chunk_size": 32, "num_persistent": 4, "attention_block": 256}
_MINI = {"vocab_size": 256, "d_model": 128, "num_heads": 2, "head_dim": 64, "window": 128, "segment_size": 64,
         "lmm.memory.chunk_size": 16, "num_persistent": 4, "attention_block": 256}
_PAPER = {"vocab_size": 32000, "window": 1024, "segment_size": 512, "lmm.memory.chunk_size": 64,
          "num_persistent": 16, "attention_block": 512, "remat": "dots_no_batch"}

# name -> (shape, target parameter count or None)
PRESETS: dict[str, tuple[dict, int | None]] = {
    "tiny": (_TINY, None),
    "mini": (_MINI, 1_000_000),  # CPU experiments in minutes (the small-scale Table 1 / 5)
    "small": (_SMALL, 10_000_000),
    "170M": (dict(_PAPER, d_model=768, num_heads=12, head_dim=64), 170_000_000),
    "340M": (dict(_PAPER, d_model=1024, num_heads=16, head_dim=64), 340_000_000),
    "400M": (dict(_PAPER, d_model=1024, num_heads=16, head_dim=64), 400_000_000),
    "760M": (dict(_PAPER, d_model=1536, num_heads=16, head_dim=96), 760_000_000),
}
# Named variants of the LMM the paper compares with or ablates.
VARIANTS = {
    "ttt": {"arch": "lmm", "lmm.use_momentum": False, "lmm.use_forgetting": False},  # TTT: eta = alpha = 0
    "linear": {"arch": "lmm", "lmm.memory.depth": 1},  # linear memory, L_M = 1
}
MLP_MULTIPLE = 64


def standard_mlp_hidden(d_model: int) -> int:
    return max(MLP_MULTIPLE, MLP_MULTIPLE * round(8 * d_model / 3 / MLP_MULTIPLE))


def preset(name: str, arch: str = "mac", changes: Mapping[str, Any] | None = None, /, **fields) -> ModelConfig:
    """The `name` preset for `arch` (one of ARCHITECTURES or VARIANTS), with `changes` (a dict
    of ModelConfig fields, nested ones by dotted path: {"lmm.memory.chunk_size": 8}) and
    keyword `fields` applied first; num_layers / mlp_hidden given there are kept, the others
    are solved."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {tuple(PRESETS)}")
    if arch not in ARCHITECTURES and arch not in VARIANTS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHITECTURES + tuple(VARIANTS)}")
    overrides = {**(changes or {}), **fields}
    if "arch" in overrides:
        raise ValueError(f"preset() takes the architecture as its `arch` argument ({arch!r}), not as the change "
                         f"arch={overrides['arch']!r}")
    shape, target = PRESETS[name]
    merged = {**shape, **VARIANTS.get(arch, {"arch": arch}), **overrides}
    merged.setdefault("mlp_hidden", standard_mlp_hidden(merged["d_model"]))
    merged.setdefault("num_layers", 1)
    config = config_tree.replace(ModelConfig(), merged)
    if target is None:
        return config
    rest, block, per_unit = _size_model(config.replace(num_layers=1))
    if "num_layers" not in overrides:
        config = config.replace(num_layers=max(1, round((target - rest) / block)))
    if "mlp_hidden" not in overrides:
        hidden = ((target - rest) / config.num_layers - block) / per_unit + config.mlp_hidden
        config = config.replace(mlp_hidden=int(max(MLP_MULTIPLE, MLP_MULTIPLE * round(hidden / MLP_MULTIPLE))))
    return config


@functools.lru_cache(maxsize=None)
def _size_model(config: ModelConfig) -> tuple[int, int, int]:
    """(parameters outside the blocks, parameters of one block, parameters per MLP unit): the
    count is rest + L * (block + per_unit * (h - config.mlp_hidden)); one shape-only trace."""
    params = abstract_params(config)
    blocks = (params[STACKED_BLOCKS] if config.scan_layers  # one tree of all blocks, stacked on a layers axis
              else [params[f"block_{index}"] for index in range(config.num_layers)])
    return param_count(params) - param_count(blocks), param_count(blocks) // config.num_layers, 3 * config.d_model


def preset_param_count(name: str, arch: str, changes: Mapping[str, Any] | None = None, /, **fields) -> int:
    """Exact parameter count of a preset from shapes only (jax.eval_shape)."""
    return param_count(abstract_params(preset(name, arch, changes, **fields)))


def all_presets() -> list[tuple[str, str]]:
    return [(name, arch) for name in PRESETS for arch in ARCHITECTURES + tuple(VARIANTS)]


__all__ = ["MLP_MULTIPLE", "PRESETS", "VARIANTS", "all_presets", "preset", "preset_param_count", "standard_mlp_hidden"]
