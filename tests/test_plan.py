"""The memory planner (titans_jax.plan, experiments.plan) on this process's devices.

Exact byte counts against a hand count, the compiled memory analysis present, and clear errors
for inputs that cannot be planned. One small compile (a 1-layer tiny transformer, the quickest to
compile); the rest is shapes.
"""

from __future__ import annotations

import json

import jax
import pytest

from experiments import plan as plan_cli
from titans_jax import memory as memory_lib
from titans_jax import models, plan, presets

# Tiny preset-like configs: the tiny preset's shape, one layer. remat "none": in this tree a
# remat policy breaks the model's parallel pass without sequence sharding (Block's remat
# static_argnums), which is the pass a one-device mesh runs.
TINY = presets.preset("tiny", "lmm", num_layers=1, remat="none")
COMPILED = presets.preset("tiny", "transformer", num_layers=1, remat="none")
BATCH, CONTEXT = 2, 32


@pytest.fixture(scope="module")
def tiny_row():
    """The LMM's plan from shapes only (no compile)."""
    return plan.plan_memory(TINY, context=CONTEXT, batch=BATCH, mesh="data=1", devices=jax.devices()[:1],
                            compile="none")


@pytest.fixture(scope="module")
def compiled_row():
    return plan.plan_memory(COMPILED, context=CONTEXT, batch=BATCH, mesh="data=1", devices=jax.devices()[:1])


def _memory_states(cache):
    return [leaf for leaf in jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, memory_lib.MemoryState))
            if isinstance(leaf, memory_lib.MemoryState)]


def _state_bytes(states) -> int:
    """Bytes of the fast weights, momentum and chunk-start weights of MemoryStates."""
    return sum(leaf.size * leaf.dtype.itemsize for state in states
               for part in (state.weights, state.momentum, state.chunk_weights) for leaf in jax.tree.leaves(part))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(axis is None or isinstance(axis, str) for axis in x)


def _abstract_cache(config, batch):
    model = models.TitansLM(config)
    params = models.abstract_params(config)
    return jax.eval_shape(lambda p: models.init_cache(model, p, batch), params)


def test_parameter_and_optimizer_bytes_equal_the_hand_count(tiny_row):
    count = models.param_count(models.abstract_params(TINY))
    assert tiny_row["model"]["parameters"] == count
    exact = tiny_row["exact"]
    assert exact["parameters"] == 4 * count  # float32, one device: everything whole
    assert exact["gradients"] == 4 * count
    # AdamW: mu and nu in float32 per parameter, plus two int32 step counts (adam's, the schedule's)
    assert exact["optimizer"] == 2 * 4 * count + 2 * 4
    ideal = {key.split(" ")[0]: value for key, value in tiny_row["hand"].items()}
    assert ideal["parameters"] == exact["parameters"] and ideal["optimizer"] == exact["optimizer"]
    assert tiny_row["not_split"] == []


def test_sharded_parameter_bytes_equal_the_hand_count():
    """fsdp = tensor = 2 on an abstract mesh (no devices needed): each parameter is split by 2 along
    its d_model side (fsdp) and by 2 along its heads / MLP / vocabulary side (tensor)."""
    from jax.sharding import AbstractMesh, AxisType

    from titans_jax import sharding, training

    mesh = AbstractMesh((1, 2, 2, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    optimizer = training.make_optimizer(training.OptimConfig(), 1000)
    state = plan.abstract_state(TINY, optimizer)
    result = plan.state_bytes(state, mesh)
    logical = sharding.param_logical_axes(state["params"])
    hand = 0
    for leaf, axes in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(logical, is_leaf=_is_axes),
                          strict=True):
        splits = 1
        for size, axis in zip(leaf.shape, axes, strict=True):
            if axis in ("embed", "heads", "qkv", "inner", "mlp", "vocab") and size % 2 == 0:
                splits *= 2
        hand += leaf.size * 4 // splits
    assert result["per_device"]["parameters"] == hand < result["global"]["parameters"]
    assert result["per_device"]["optimizer"] == 2 * hand + 2 * 4
    assert result["not_split"] == []


def test_memory_state_is_the_hand_count_and_the_cache(tiny_row):
    memory = TINY.memory_layer.memory_config
    per_head = sum(i * o for i, o in memory.layer_dims)  # (16, 64), (64, 16): no biases
    assert per_head == 2 * 16 * 64
    hand = BATCH * TINY.num_heads * TINY.num_layers * 3 * per_head * 4
    assert tiny_row["exact"]["memory state"] == hand
    states = _memory_states(_abstract_cache(TINY, BATCH))
    assert _state_bytes(states) == hand


def test_mac_memory_state_and_caches_match_the_cache_shapes():
    config = presets.preset("tiny", "mac")
    cache = _abstract_cache(config, 3)
    states = _memory_states(cache)
    assert len(states) == config.num_layers
    memory_bytes = _state_bytes(states)
    assert plan.memory_state_bytes(config, 3, config.num_heads) == memory_bytes
    others = 0
    for layer in cache["layers"]:
        mac = layer["mac"]
        for leaf in jax.tree.leaves((mac.retrieval_conv, mac.segment_weights, mac.retrieved_k, mac.retrieved_v,
                                     mac.segment_k, mac.segment_v, mac.lmm.conv)):
            others += leaf.size * leaf.dtype.itemsize
    assert sum(plan.halo_cache_bytes(config, 3, config.num_heads, 64, 2).values()) == others


def test_memory_analysis_fields_are_present_and_positive(compiled_row):
    assert "train" not in plan.plan_memory(TINY, context=CONTEXT, mesh="data=1", compile="none")
    for program in ("train", "inference"):
        entry = compiled_row[program]
        assert "error" not in entry, entry
        for field in plan.MEMORY_FIELDS:
            assert isinstance(entry[field], int) and entry[field] >= 0
        for field in ("argument", "output", "temp"):
            assert entry[field] > 0, (program, field)
        assert entry["peak"] == entry["argument"] + entry["output"] - entry["alias"] + entry["temp"]
        assert entry["method"] == "compiled"
    # the train step's arguments are the training state and the batch; the forward's the parameters
    exact = compiled_row["exact"]
    count = models.param_count(models.abstract_params(COMPILED))
    assert exact["parameters"] == 4 * count and exact["optimizer"] == 8 * count + 8
    assert compiled_row["train"]["argument"] == exact["parameters"] + exact["optimizer"] + 4 + BATCH * (CONTEXT + 1) * 4
    assert compiled_row["inference"]["argument"] == exact["parameters"] + BATCH * CONTEXT * 4
    assert compiled_row["exact"]["memory state"] == 0  # no memory in a transformer
    assert set(compiled_row["fits"]) == {"v5e", "H100"} and all(compiled_row["fits"].values())
    assert "| data=1 |" in plan.markdown_table([compiled_row])


@pytest.mark.parametrize("kwargs, message", [
    ({"mesh": "data=2", "num_devices": 1}, "needs 2 devices but only 1"),
    ({"mesh": "data=1,sequence=4", "num_devices": 4, "context": 30}, "does not split into the mesh's 4 sequence"),
    ({"mesh": "data=2", "num_devices": 2, "batch": 3}, "batch 3 does not split"),
    ({"model": "999M"}, "unknown preset '999M'"),
    ({"model": presets.preset("tiny", "mac"), "mesh": "data=1,sequence=2", "num_devices": 2, "context": 24},
     "whole segments of 8"),
])
def test_bad_requests_give_clear_errors(kwargs, message):
    arguments = {"model": TINY, "context": CONTEXT, "mesh": "data=1", "num_devices": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        plan.make_request(arguments.pop("model"), **arguments)


def test_plan_memory_refuses_a_mesh_larger_than_the_devices():
    with pytest.raises(ValueError, match=f"needs {len(jax.devices()) + 1} devices"):
        plan.plan_memory(TINY, context=CONTEXT, mesh=f"data={len(jax.devices()) + 1}", compile="none")


def test_cli_flags_match_the_library():
    assert plan_cli.PLANNING_XLA_FLAGS == plan.PLANNING_XLA_FLAGS
    assert plan_cli.COMPILE_MODES == plan.COMPILE_MODES
    flags = plan_cli.planning_flags("--xla_disable_hlo_passes=foo --xla_force_host_platform_device_count=2", 8)
    assert flags.split() == ["--xla_cpu_enable_concurrency_optimized_scheduler=false",
                             "--xla_disable_hlo_passes=foo,cse_barrier_expander",
                             "--xla_force_host_platform_device_count=8"]


def test_cli_checks_meshes_against_devices_before_importing_anything():
    with pytest.raises(SystemExit, match="needs 4 devices but --devices is 2"):
        plan_cli.main(["--preset", "tiny", "--context", "64", "--mesh", "data=1", "--mesh", "data=4", "--devices", "2"])


def test_cli_reports_an_unknown_preset(capsys):
    assert plan_cli.main(["--preset", "999M", "--context", "64", "--devices", str(len(jax.devices())),
                          "--mesh", "data=1", "--compile", "none"]) == 2
    assert "unknown preset '999M'" in capsys.readouterr().err


def test_cli_refuses_an_unknown_compile_mode():
    with pytest.raises(SystemExit, match="--compile takes full, layers, none"):
        plan_cli.main(["--preset", "tiny", "--context", "64", "--devices", "1", "--compile", "none,fast"])


def test_cli_writes_table_and_json_without_compiling(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = plan_cli.main(["--preset", "tiny", "--arch", "lmm", "--context", "64", "--batch", "2", "--mesh", "data=1",
                          "--devices", str(len(jax.devices())), "--compile", "none", "--remat", "none",
                          "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["local"] == {"batch": 2, "tokens": 64, "heads": 2}
    config = presets.preset("tiny", "lmm")
    assert rows[0]["exact"]["parameters"] == 4 * models.param_count(models.abstract_params(config))
    text = capsys.readouterr().out
    assert "| mesh | B / dev |" in text and plan.CAVEAT in text


def test_bfloat16_compute_keeps_float32_parameters():
    request = plan.make_request("tiny", arch="mac", context=64, mesh="data=1", num_devices=1, dtype="bfloat16",
                                remat="full")
    assert (request.config.dtype, request.config.param_dtype, request.config.remat) == ("bfloat16", "float32", "full")
    # the memory state stays in the parameter dtype; the segment buffers follow the compute dtype
    full = plan.halo_cache_bytes(request.config.replace(dtype="float32"), 1, 2, 64, 2)
    half = plan.halo_cache_bytes(request.config, 1, 2, 64, 2)
    assert half["segment buffers (4 x C x H x E)"] * 2 == full["segment buffers (4 x C x H x E)"]
    assert half["segment-start weights"] == full["segment-start weights"]
    assert plan.memory_state_bytes(request.config, 1, 2) == plan.memory_state_bytes(
        request.config.replace(dtype="float32"), 1, 2)
