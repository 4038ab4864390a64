"""Meshes, the logical-axis table and sequence parallelism.

The multi-device checks run in ONE fresh process with 8 fake CPU devices (XLA_FLAGS must be set
before jax is imported): tests/sharding_child.py runs every case of a tier and the tests here
judge its results. Every layout must reproduce one device's loss and gradients in float64.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from titans_jax import models, sharding
from titans_jax.training import OptimConfig, RunConfig, init_train_state, make_optimizer

CHILD = pathlib.Path(__file__).with_name("sharding_child.py")
LINEAR = {"lmm.memory.depth": 1, "lmm.memory.residual_norm": False}  # the affine (exact length-parallel) memory

ONE_LAYER = {"num_layers": 1}
TNT = {"lmm.memory.chunk_size": 8, "lmm.local_period": 8, "lmm.local_chunk_size": 4}  # periods cross shard starts
# (id, arch, model overrides, mesh, tokens): the default tier covers every mixer's sequence-parallel
# path -- MAG has the SWA halo, the conv halo and the pipelined deep memory, on fsdp x tensor x
# sequence with two layers (the persistent prefix handed through both); then the affine linear
# memory and MAC's pipeline with the data axis -- with one layer where one suffices, to keep
# compilation short; the slow tier adds TNT's local memory (40 s of the child's ~200 s) and the
# other architecture x layout pairs.
EQUAL_CASES = [
    ("mag-fsdp-tensor-seq", "mag", None, "fsdp=2,tensor=2,sequence=2", 32),
    ("lmm-linear-seq8", "lmm", {**LINEAR, **ONE_LAYER}, "sequence=8", 32),
    ("mac-data-seq4", "mac", ONE_LAYER, "data=2,sequence=4", 64),
]
SLOW_EQUAL_CASES = [
    ("lmm-tnt-data-seq4", "lmm", {**TNT, **ONE_LAYER}, "data=2,sequence=4", 64),
    ("lmm-deep-data-seq4", "lmm", None, "data=2,sequence=4", 32),
    ("swa-data-tensor-seq", "swa", None, "data=2,tensor=2,sequence=2", 32),
    ("lmm-deep-seq8", "lmm", None, "sequence=8", 32),
    ("lmm-fsdp-tensor-data", "lmm", None, "data=2,fsdp=2,tensor=2", 32),
    ("mal-tensor-seq4", "mal", None, "tensor=2,sequence=4", 32),
    ("transformer-data-seq2", "transformer", None, "data=4,sequence=2", 32),
    ("lmm-linear-data-fsdp-seq2", "lmm", LINEAR, "data=2,fsdp=2,sequence=2", 32),
    ("mac-tensor-seq2", "mac", None, "data=2,tensor=2,sequence=2", 64),
    ("swa-seq8", "swa", None, "sequence=8", 64),
    ("mag-seq8", "mag", None, "sequence=8", 64),
    ("mal-fsdp-data", "mal", None, "data=4,fsdp=2", 32),
    ("mag-remat-seq2", "mag", {"remat": "full"}, "data=4,sequence=2", 32),
]
# (id, case, expected message fragment)
ERROR_CASES = [
    ("length-not-divisible", {"arch": "swa", "mesh": "sequence=8", "length": 60}, "does not split into 8"),
    ("shard-shorter-than-window", {"arch": "swa", "mesh": "sequence=8", "length": 32}, "shorter than 8"),
    ("mac-segment-across-shards", {"arch": "mac", "mesh": "data=2,sequence=4", "length": 32}, "whole segments of 16"),
    ("conv-halo", {"arch": "lmm", "mesh": "sequence=8", "length": 16}, "shorter than 3"),
]
# Restoring is orbax's resharding of whatever tree the state is: SWA's parameters split over every
# axis here (heads over tensor, embeddings over fsdp) and compile 5x faster than MAG's, whose own
# parameter shardings test_parameters_are_really_split checks.
RESTORE_CASE = {"kind": "restore", "arch": "swa", "overrides": ONE_LAYER,
                "meshes": [(8, "data=2,fsdp=2,tensor=2"), (4, "fsdp=2,sequence=2"), (1, "data=1")]}


def _run_child(cases: list[dict], out: pathlib.Path, timeout: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(CHILD.parent.parent),
                                                                    os.environ.get("PYTHONPATH")])))
    process = subprocess.run([sys.executable, str(CHILD), "8", json.dumps(cases), str(out)], env=env,
                             capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise AssertionError(f"the multi-device child wrote no results (exit {process.returncode}):\n"
                             f"{process.stderr[-3000:]}")
    results = json.loads(out.read_text())
    if len(results) != len(cases):
        raise AssertionError(f"the child stopped after {len(results)} of {len(cases)} cases (exit "
                             f"{process.returncode}):\n{process.stderr[-3000:]}")
    return results


def _batch_for(mesh: str) -> int:
    """4 rows, or as many as the mesh's batch axes (data x fsdp) split the batch into."""
    sizes = dict(item.split("=") for item in mesh.split(","))
    return max(4, int(sizes.get("data", 1)) * int(sizes.get("fsdp", 1)))


def _cases(equal_cases):
    return [{"kind": "equal", "arch": arch, "overrides": overrides, "mesh": mesh, "length": length,
             "batch": _batch_for(mesh)} for _, arch, overrides, mesh, length in equal_cases]


@pytest.fixture(scope="module")
def default_results(tmp_path_factory):
    cases = _cases(EQUAL_CASES) + [dict(case, kind="error") for _, case, _ in ERROR_CASES] + [RESTORE_CASE]
    results = _run_child(cases, tmp_path_factory.mktemp("sharding") / "results.json", timeout=1500)
    names = [name for name, *_ in EQUAL_CASES] + [name for name, *_ in ERROR_CASES] + ["restore"]
    return dict(zip(names, results, strict=True))


def _check_equal(result: dict) -> None:
    assert "error" not in result, result.get("traceback", result)
    # float64: a layout reorders sums, nothing else; 1e-12 relative to the gradients' scale
    assert result["loss_diff"] <= 1e-12, result
    assert result["grad_diff"] <= 1e-12 * max(1.0, result["grad_scale"]), result


@pytest.mark.parametrize("name", [name for name, *_ in EQUAL_CASES])
def test_layout_matches_one_device(default_results, name):
    _check_equal(default_results[name])


def test_parameters_are_really_split(default_results):
    specs = set(default_results["mag-fsdp-tensor-seq"]["param_specs"])
    assert "P('fsdp', 'tensor')" in specs and "P('tensor',)" in specs, specs


@pytest.mark.parametrize("name,fragment", [(name, fragment) for name, _, fragment in ERROR_CASES])
def test_bad_mesh_gives_a_clear_error(default_results, name, fragment):
    result = default_results[name]
    assert result["error"] == "ValueError", result
    assert fragment in result["message"], result["message"]


def test_checkpoint_restores_onto_other_meshes(default_results):
    result = default_results["restore"]
    assert "error" not in result, result.get("traceback", result)
    results = result["meshes"]
    assert set(results) == {"4:fsdp=2,sequence=2", "1:data=1"}
    for where, result in results.items():
        assert result["step"] == 2, (where, result)
        # float32 training: the same step on another layout differs by summation order only
        assert result["loss_diff"] <= 1e-5 and result["param_diff"] <= 1e-5, (where, result)
    assert results["4:fsdp=2,sequence=2"]["devices_used"] == 4
    assert results["1:data=1"]["devices_used"] == 1


@pytest.mark.slow
def test_more_layouts_match_one_device(tmp_path):
    results = _run_child(_cases(SLOW_EQUAL_CASES), tmp_path / "results.json", timeout=3000)
    for (name, *_), result in zip(SLOW_EQUAL_CASES, results, strict=True):
        try:
            _check_equal(result)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


# ----------------------------------------------------------------------------------------------
# One device: the mesh description and the rules table


def test_mesh_config_resolves_the_rest_and_refuses_what_does_not_fit():
    assert sharding.MeshConfig().sizes(8) == {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}
    assert sharding.MeshConfig(sequence=-1, data=2).sizes(8)["sequence"] == 4
    assert sharding.MeshConfig.parse("data=2,sequence=4").sizes(8) == {"data": 2, "fsdp": 1, "tensor": 1,
                                                                       "sequence": 4}
    with pytest.raises(ValueError, match="needs 6 devices, 8 are available"):
        sharding.MeshConfig.parse("data=2,tensor=3").sizes(8)
    with pytest.raises(ValueError, match="multiple of 3"):
        sharding.MeshConfig(tensor=3).sizes(8)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.MeshConfig(data=-1, sequence=-1)
    with pytest.raises(ValueError, match="positive integer or -1"):
        sharding.MeshConfig(tensor=0)
    with pytest.raises(ValueError, match="axes look like|mesh entries look like"):
        sharding.MeshConfig.parse("pipeline=2")


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_every_parameter_of_every_architecture_has_a_rule(arch):
    variants = [{}, {"tie_embeddings": True}, {"mac_retrieval": "learned"},
                {"lmm.memory.use_bias": True, "lmm.conv_width": 0, **LINEAR}]
    mesh = jax.sharding.AbstractMesh((2, 2, 2, 1), sharding.MESH_AXES)
    for variant in variants:
        params = models.abstract_params(models.ModelConfig(arch=arch, segment_size=64).replace(variant))
        rows = sharding.describe_shardings(params, mesh)
        assert len(rows) == len(jax.tree.leaves(params))
        split = [row for row in rows if row["spec"] != jax.sharding.PartitionSpec()]
        assert split, "nothing is split on a data x fsdp x tensor mesh"
        assert not [row for row in rows if row["not_split"]], "the tiny model's dims all divide by 2"


def test_a_parameter_without_a_rule_is_an_error():
    with pytest.raises(ValueError, match="no sharding rule for parameter block/new_thing"):
        sharding.param_logical_axes({"block": {"new_thing": jax.ShapeDtypeStruct((4, 4), "float32")}})


def test_dimensions_that_do_not_divide_stay_whole():
    mesh = jax.sharding.AbstractMesh((1, 2, 4, 1), sharding.MESH_AXES)
    spec = sharding.logical_to_spec(("embed", "heads"), (6, 6), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp")  # 6 % 4 != 0: heads not split
    assert sharding.logical_to_spec(("batch", "sequence"), (8, 16), mesh) == jax.sharding.PartitionSpec("fsdp")


def test_optimizer_moments_follow_their_parameters():
    config = models.ModelConfig(arch="mag")
    optimizer = make_optimizer(OptimConfig(warmup_steps=1), 10)
    state = jax.eval_shape(lambda: init_train_state(config, optimizer, 0))
    mesh = jax.sharding.AbstractMesh((1, 2, 2, 1), sharding.MESH_AXES)
    shardings = sharding.state_shardings(state, mesh)
    params = jax.tree.leaves(shardings["params"])
    moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(shardings["opt_state"])[0]
               if "mu" in jax.tree_util.keystr(path) or "nu" in jax.tree_util.keystr(path)]
    assert [m.spec for m in moments] == [p.spec for p in params] * 2
    assert shardings["step"].spec == jax.sharding.PartitionSpec()


def test_run_config_refuses_a_batch_or_length_the_mesh_cannot_split():
    mesh = jax.sharding.AbstractMesh((2, 2, 1, 2), sharding.MESH_AXES)
    with pytest.raises(ValueError, match="batch_size 6 does not split over the mesh's data x fsdp = 4"):
        RunConfig(batch_size=6, seq_len=64).check_mesh(mesh)
    with pytest.raises(ValueError, match="seq_len 63 does not split into the mesh's 2 sequence shards"):
        RunConfig(batch_size=8, seq_len=63).check_mesh(mesh)
