"""Nested configs: one source of defaults, dotted-path changes, typed parsing, JSON round trips,
and the test helpers that compare trees (they must be able to fail)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax import LMMConfig, MemoryConfig, ModelConfig, config_tree, preset
from titans_jax.memory import NORM_EPS
from titans_jax.testing import max_absolute_difference, max_relative_difference


def test_memory_fields_are_defined_once_and_reach_the_memory():
    config = ModelConfig(arch="lmm", d_model=32, num_heads=2, head_dim=16, norm_eps=1e-3)
    layer = config.memory_layer
    # the model's dims, norm epsilon and dtypes reach the layer and, through it, the memory core
    assert (layer.d_model, layer.num_heads, layer.head_dim) == (32, 2, 16)
    assert layer.norm_eps == 1e-3 and layer.memory_config.norm_eps == 1e-3
    assert (layer.memory_config.key_dim, layer.memory_config.value_dim) == (16, 16)
    # the defaults of a model's memory are the memory's own (no second copy of them)
    assert config.lmm.memory == MemoryConfig() and layer.memory_config.chunk_size == MemoryConfig().chunk_size
    # every memory setting can be set from a model config, by dotted path or nested dict
    changed = config.replace({"lmm.memory.impl": "reference", "lmm.memory.use_bias": True, "lmm.memory.loss_scale": 1.0,
                              "lmm.qk_l2_norm": False, "lmm.theta_bias_init": -3.0},
                             lmm={"memory": {"norm_eps": 1e-4}})
    memory = changed.memory_layer.memory_config
    assert (memory.impl, memory.use_bias, memory.loss_scale, memory.norm_eps) == ("reference", True, 1.0, 1e-4)
    assert not changed.memory_layer.qk_l2_norm and changed.memory_layer.theta_bias_init == -3.0
    assert changed.lmm.memory.chunk_size == config.lmm.memory.chunk_size  # untouched fields are kept
    # a standalone layer and memory get the same defaults
    assert LMMConfig(d_model=8, num_heads=2, head_dim=4).resolve().norm_eps == NORM_EPS
    assert MemoryConfig(key_dim=4, value_dim=4).layer_norm_eps == NORM_EPS


def test_dtype_changes_of_the_model_reach_its_memory():
    config = preset("tiny", "mag")
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    assert bf16.memory_layer.dtype == "bfloat16" and bf16.memory_layer.param_dtype == "float32"


def test_conflicting_and_unknown_nested_fields_are_refused():
    with pytest.raises(ValueError, match="conflicts with the model's head_dim"):
        ModelConfig(arch="lmm", head_dim=16).replace({"lmm.head_dim": 8})
    with pytest.raises(ValueError, match="conflicts with the enclosing layer"):
        LMMConfig(d_model=8, num_heads=2, head_dim=4, memory=MemoryConfig(key_dim=8)).memory_config
    with pytest.raises(ValueError, match="LMMConfig has no field 'chunk_size'"):
        ModelConfig().replace({"lmm.chunk_size": 8})
    with pytest.raises(ValueError, match="is not a nested config"):
        ModelConfig().replace({"d_model": {"x": 1}})
    with pytest.raises(ValueError, match="unset"):
        LMMConfig().resolve()
    with pytest.raises(ValueError, match="key_dim / value_dim are unset"):
        MemoryConfig().layer_dims
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelConfig(dtype="int32")


def test_typed_parsing_names_the_key_and_the_type():
    depth = config_tree.annotation_at(ModelConfig, "lmm.memory.depth")
    assert config_tree.parse_value("3", depth, "model.lmm.memory.depth") == 3
    assert config_tree.parse_value("None", config_tree.annotation_at(ModelConfig, "lmm.norm_eps"), "k") is None
    assert config_tree.parse_value("1e-5", config_tree.annotation_at(ModelConfig, "lmm.norm_eps"), "k") == 1e-5
    with pytest.raises(ValueError, match=r"model.d_model='1.5': expected an integer"):
        config_tree.parse_value("1.5", int, "model.d_model")
    with pytest.raises(ValueError, match=r"x='yes please': expected a boolean"):
        config_tree.parse_value("yes please", bool, "x")
    with pytest.raises(ValueError, match="no field 'nope'"):
        config_tree.annotation_at(ModelConfig, "lmm.nope")


def test_json_round_trip_and_diff():
    config = preset("tiny", "ttt").replace({"lmm.memory.impl": "associative"})
    data = json.loads(json.dumps(dataclasses.asdict(config)))
    assert config_tree.from_dict(ModelConfig, data) == config
    data["lmm"]["memory"]["chunk_sz"] = 3
    with pytest.raises(ValueError, match=r"lmm.memory.chunk_sz"):
        config_tree.from_dict(ModelConfig, data)
    other = config.replace({"lmm.memory.chunk_size": 2}, d_model=48)
    assert config_tree.diff(config, other) == ["d_model: 32 -> 48", "lmm.memory.chunk_size: 4 -> 2"]
    assert config_tree.diff(config, config) == []


def test_tree_comparisons_fail_on_mismatched_empty_or_nan_trees():
    """The old helpers zipped leaves without strict and started from 0.0: each of these compared
    'equal' (difference 0.0) before."""
    a = {"x": jnp.ones(3), "y": jnp.zeros(2)}
    assert max_relative_difference(a, a) == 0.0 and max_absolute_difference(a, a) == 0.0
    assert max_absolute_difference(a, {"x": jnp.ones(3), "y": jnp.full(2, 0.5)}) == 0.5
    with pytest.raises(ValueError, match="structure"):
        max_relative_difference(a, {"x": jnp.ones(3)})
    with pytest.raises(ValueError, match="structure"):
        max_absolute_difference([jnp.ones(2)], [jnp.ones(2), jnp.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        max_relative_difference([jnp.ones(2)], [jnp.ones(3)])
    with pytest.raises(ValueError, match="nothing to compare"):
        max_relative_difference({}, {})
    with pytest.raises(ValueError, match="nothing to compare"):
        max_relative_difference([np.zeros((0, 3))], [np.zeros((0, 3))])
    assert max_relative_difference([jnp.array([1.0, jnp.nan])], [jnp.array([1.0, jnp.nan])]) == float("inf")


def test_parse_assignments_types_values_and_names_the_bad_item():
    assert config_tree.parse_assignments(ModelConfig, ["lmm.memory.depth=3", "lmm.memory.impl=fused"]) == {
        "lmm.memory.depth": 3, "lmm.memory.impl": "fused"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        config_tree.parse_assignments(ModelConfig, ["lmm.memory.depth"])
    with pytest.raises(ValueError, match="'lmm.memory.depth=deep'.*expected an integer"):
        config_tree.parse_assignments(ModelConfig, ["lmm.memory.depth=deep"])
