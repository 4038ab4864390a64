"""ModelConfig.scan_layers: one nn.scan over the stacked blocks is the same model as the
unrolled blocks block_0 .. block_{L-1}. In float64, given the same parameters (converted by
stack_layer_params / unstack_layer_params): the parallel logits and the gradients agree, streaming
calls over the stacked cache give the parallel logits, and the lowered program does not grow
with depth."""

import dataclasses
import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax import sharding
from titans_jax.decoding import generate
from titans_jax.models import (TitansLM, abstract_params, check_cache, full_attention_capacity, init_cache,
                               param_count, stack_layer_params, unstack_layer_params)
from titans_jax.presets import preset
from titans_jax.testing import max_absolute_difference
from titans_jax.training import decay_mask, mismatches, model_identity

from tiny_lm import arch_params, tiny_config

LENGTH = 16  # two MAC segments of 8
SPLIT = 8  # two streaming calls of one shape (one compile); with the prefix of 2, the second starts mid-chunk
ALL_ARCHS = ["mac", "mag", "swa", "lmm", "mal", "transformer"]
# Each float64 program of a model with a memory compiles for 5 - 30 s on 2 cores. mag's blocks hold
# lmm's memory and swa's attention, so lmm runs in the slow tier only.
SLOW = {"lmm", "mal", "transformer"}
# The gradient through the scan does not depend on the block; swa's compiles in seconds.
GRADIENT_SLOW = set(ALL_ARCHS) - {"swa"}
# These tests compare math, not speed: XLA skips LLVM's optimisation of the CPU code (compiles in
# about half the time; experiments/arch_bench.py --fast-compile does the same).
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


class Scanned:
    """A float64 tiny model with scan_layers=True, its parameters and parallel logits (from one
    init_with_output), the same model unrolled, and the unrolled model's gradients."""

    def __init__(self, name: str):
        self.config = tiny_config(name, scan_layers=True)
        self.model = TitansLM(self.config)
        self.unrolled = TitansLM(self.config.replace(scan_layers=False))
        self.tokens = jax.random.randint(jax.random.PRNGKey(1), (2, LENGTH), 0, self.config.vocab_size)
        self.logits, variables = fast_jit(self.model.init_with_output)(jax.random.PRNGKey(0), self.tokens)
        self.params = variables["params"]

    def gradients(self, model):
        """(gradients of the next-token loss, logits) of `model`, scanned or not, at these parameters."""
        params = self.params if model.config.scan_layers else unstack_layer_params(self.params)
        return fast_jit(jax.grad(functools.partial(loss_and_logits, model), has_aux=True))(params, self.tokens)

    @functools.cached_property
    def unrolled_gradients(self):
        """The unrolled model's gradients, stacked."""
        return stack_layer_params(self.gradients(self.unrolled)[0])


@pytest.fixture(scope="module")
def scanned_models():
    with jax.enable_x64(True):
        built = {}

        def get(name):
            if name not in built:
                built[name] = Scanned(name)
            return built[name]

        yield get


def loss_and_logits(model, params, tokens):
    logits = model.apply({"params": params}, tokens)
    log_probabilities = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(log_probabilities, tokens[:, 1:, None], axis=-1)), logits


@pytest.mark.parametrize("name", arch_params(ALL_ARCHS, SLOW))
def test_scanned_parallel_logits_equal_the_unrolled_model(scanned_models, name):
    """The blocks' parameters are stacked on a leading axis of num_layers, each layer initialised
    with its own key; unstacked, they give the unrolled model the same logits."""
    with jax.enable_x64(True):
        scanned = scanned_models(name)
        blocks = scanned.params["blocks"]
        assert {leaf.shape[0] for leaf in jax.tree.leaves(blocks)} == {scanned.config.num_layers}
        assert float(jnp.max(jnp.abs(blocks["mlp"]["up"]["kernel"][0] - blocks["mlp"]["up"]["kernel"][1]))) > 0
        unrolled = fast_jit(lambda p, t: scanned.unrolled.apply({"params": p}, t))(
            unstack_layer_params(scanned.params), scanned.tokens)
        assert unrolled.shape == (2, LENGTH, scanned.config.vocab_size)
        assert max_absolute_difference(scanned.logits, unrolled) <= 1e-12


@pytest.mark.parametrize("name", arch_params(ALL_ARCHS, GRADIENT_SLOW))
def test_scanned_gradients_equal_the_unrolled_model(scanned_models, name):
    with jax.enable_x64(True):
        scanned = scanned_models(name)
        grads, logits = scanned.gradients(scanned.model)
        assert max_absolute_difference(logits, scanned.logits) <= 1e-12
        assert jax.tree.structure(grads) == jax.tree.structure(scanned.params)
        assert max_absolute_difference(grads, scanned.unrolled_gradients) <= 1e-12
        assert min(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(grads)) > 0


@pytest.mark.parametrize("name", arch_params(ALL_ARCHS, SLOW))
def test_scanned_streaming_equals_its_parallel_pass(scanned_models, name):
    """init_cache (the persistent prefix runs through the scanned blocks) and two calls over the
    stacked cache, whose every per-layer leaf has a leading layers axis."""
    with jax.enable_x64(True):
        scanned = scanned_models(name)
        config = scanned.config
        call = fast_jit(lambda p, t, c: scanned.model.apply({"params": p}, t, c))
        cache = fast_jit(lambda p: init_cache(scanned.model, p, 2, LENGTH))(scanned.params)
        assert isinstance(cache["layers"], dict)
        assert {leaf.shape[0] for leaf in jax.tree.leaves(cache["layers"])} == {config.num_layers}
        first, cache = call(scanned.params, scanned.tokens[:, :SPLIT], cache)
        second, cache = call(scanned.params, scanned.tokens[:, SPLIT:], cache)
        assert max_absolute_difference(jnp.concatenate([first, second], axis=1), scanned.logits) <= 1e-10
        assert int(cache["position"]) == config.prefix_length + LENGTH
        check_cache(config, cache, 2)
        assert full_attention_capacity(config, cache) == (LENGTH if name == "transformer" else None)


def test_generation_runs_over_the_stacked_cache(scanned_models):
    """generate's prefill and lax.scan of one-token calls carry the stacked cache; the greedy
    tokens and their logits are those of one parallel pass."""
    with jax.enable_x64(True):
        scanned = scanned_models("swa")
        prompt = scanned.tokens[:, :5]
        new, step_logits = generate(scanned.model, scanned.params, prompt, 4)
        full = fast_jit(lambda p, t: scanned.model.apply({"params": p}, t))(
            scanned.params, jnp.concatenate([prompt, new], axis=1))
        np.testing.assert_array_equal(new, jnp.argmax(full[:, 4:8], axis=-1))
        assert max_absolute_difference(step_logits, full[:, 5:9]) <= 1e-10


def test_stacking_and_unstacking_invert_each_other(scanned_models):
    with jax.enable_x64(True):
        params = scanned_models("mag").params
    unrolled = unstack_layer_params(params)
    assert sorted(unrolled) == sorted(["block_0", "block_1"] + [key for key in params if key != "blocks"])
    np.testing.assert_array_equal(unrolled["block_1"]["mix_norm"]["scale"], params["blocks"]["mix_norm"]["scale"][1])
    again = stack_layer_params(unrolled)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert max_absolute_difference(unstack_layer_params(again), unrolled) == 0


def test_trees_of_another_layout_or_model_are_refused(scanned_models):
    with jax.enable_x64(True):
        params = scanned_models("swa").params
    unrolled = unstack_layer_params(params)
    with pytest.raises(ValueError, match="already stacked"):
        stack_layer_params(params)
    with pytest.raises(ValueError, match="not stacked"):
        unstack_layer_params(unrolled)
    for bad in ({"layers": ()}, [1, 2], {"embed": {}}):
        with pytest.raises(ValueError, match="not the parameters of a TitansLM"):
            stack_layer_params(bad)
        with pytest.raises(ValueError, match="not the parameters of a TitansLM"):
            unstack_layer_params(bad)
    with pytest.raises(ValueError, match="block_0 .. block_1"):
        stack_layer_params({**{k: v for k, v in unrolled.items() if k != "block_1"}, "block_2": unrolled["block_1"]})
    with pytest.raises(ValueError, match="another structure"):
        stack_layer_params({**unrolled, "block_1": {"mlp": unrolled["block_1"]["mlp"]}})
    with pytest.raises(ValueError, match="leading layers axis"):
        unstack_layer_params({**params, "blocks": {**params["blocks"], "mlp_norm": {"scale": jnp.ones((3, 32))}}})


def test_caches_of_the_other_layout_are_refused():
    """check_cache and full_attention_capacity read both layouts (shapes only); a cache of the
    other layout is refused by name."""
    for name in ("swa", "transformer"):
        scanned, unrolled = (tiny_config(name, scan_layers=scan, dtype="float32", param_dtype="float32")
                             for scan in (True, False))
        caches = {config.scan_layers: jax.eval_shape(lambda p, model=TitansLM(config): init_cache(model, p, 2, 9),
                                                     abstract_params(config))
                  for config in (scanned, unrolled)}
        with pytest.raises(ValueError, match="scan_layers=True"):
            check_cache(unrolled, caches[True], 2)
        with pytest.raises(ValueError, match="scan_layers=False"):
            check_cache(scanned, caches[False], 2)
        check_cache(scanned, caches[True], 2)
        stacked_k = caches[True]["layers"]["attention"].k
        assert stacked_k.shape == (scanned.num_layers,) + caches[False]["layers"][0]["attention"].k.shape
        assert full_attention_capacity(scanned, caches[True]) == full_attention_capacity(unrolled, caches[False]) == (
            9 if name == "transformer" else None)


def test_the_remat_policy_applies_inside_the_scan(scanned_models):
    """Each scanned block is rematerialised with the config's policy (no CSE barrier needed in a
    scan), and the gradients stay those of the unrolled model without remat."""
    with jax.enable_x64(True):
        scanned = scanned_models("swa")
        remat = TitansLM(scanned.config.replace(remat="full"))
        program = str(jax.make_jaxpr(lambda p: remat.apply({"params": p}, scanned.tokens))(scanned.params))
        assert "scan[" in program and program.index("scan[") < program.index("remat2[")
        assert "policy=<function nothing_saveable" in program and "prevent_cse=False" in program
        grads, _ = scanned.gradients(remat)
        assert max_absolute_difference(grads, scanned.unrolled_gradients) <= 1e-12


def count_dot_generals(config) -> int:
    model = TitansLM(config)
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    text = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(abstract_params(config), tokens).as_text()
    return len(re.findall(r"\bdot_general\b", text))


def test_the_scanned_program_does_not_grow_with_depth():
    """The lowered parallel pass holds one block's matmuls whatever num_layers is; unrolled it
    holds one copy per block (swa: lowering mag's six unrolled blocks alone takes seconds)."""
    counts = {(scan, layers): count_dot_generals(tiny_config("swa", dtype="float32", param_dtype="float32",
                                                            num_layers=layers, scan_layers=scan))
              for scan in (True, False) for layers in (2, 6)}
    assert counts[True, 2] == counts[True, 6] > 0
    assert counts[False, 6] > counts[False, 2] > counts[True, 2]


def test_presets_optimiser_and_checkpoints_know_the_stacked_layout():
    """A preset solves the same shape with either layout; weight decay skips the stacked
    vectors as it skips the unrolled ones; a checkpoint recorded before scan_layers existed
    matches scan_layers=False and is refused for scan_layers=True."""
    unrolled, scanned = preset("small", "mag"), preset("small", "mag", scan_layers=True)
    assert (scanned.num_layers, scanned.mlp_hidden) == (unrolled.num_layers, unrolled.mlp_hidden)
    stacked_params, unrolled_params = abstract_params(scanned), abstract_params(unrolled)
    assert param_count(stacked_params) == param_count(unrolled_params)
    stacked_mask, unrolled_mask = decay_mask(stacked_params), decay_mask(unrolled_params)
    assert stacked_mask["blocks"] == unrolled_mask["block_0"] == unrolled_mask["block_1"]
    assert stacked_mask["blocks"]["mlp"]["up"]["kernel"] and not stacked_mask["blocks"]["mlp_norm"]["scale"]
    older = json.loads(json.dumps(dataclasses.asdict(unrolled)))  # what checkpoints recorded before the fields
    del older["scan_layers"]
    del older["lmm"]["memory"]["surprise_clip"]  # nested fields added later
    del older["lmm"]["memory"]["last_layer_floor"]
    del older["lmm"]["memory"]["every_layer_floor"]
    assert mismatches({"model_config": older}, {"model_config": model_identity(unrolled)}, ["model_config"]) == []
    assert mismatches({"model_config": older}, {"model_config": model_identity(scanned)}, ["model_config"]) == [
        "model_config.scan_layers: (absent) -> True"]
    with pytest.raises(ValueError, match="scan_layers must be a bool"):
        tiny_config("mag", scan_layers=1)
    clipped = unrolled.replace({"lmm.memory.surprise_clip": 10.0})
    assert mismatches({"model_config": older}, {"model_config": model_identity(clipped)}, ["model_config"]) == [
        "model_config.lmm.memory.surprise_clip: (absent) -> 10.0"]
    floored = unrolled.replace({"lmm.memory.last_layer_floor": True})
    assert mismatches({"model_config": older}, {"model_config": model_identity(floored)}, ["model_config"]) == [
        "model_config.lmm.memory.last_layer_floor: (absent) -> True"]
    every = unrolled.replace({"lmm.memory.every_layer_floor": True})
    assert mismatches({"model_config": older}, {"model_config": model_identity(every)}, ["model_config"]) == [
        "model_config.lmm.memory.every_layer_floor: (absent) -> True"]


def test_the_stacked_parameters_shard_like_the_unrolled_ones_with_a_layers_axis():
    """The sharding table gives every stacked leaf the unrolled block's logical axes behind a
    leading "layers" axis, which stays whole by default."""
    scanned = tiny_config("mag", scan_layers=True, dtype="float32", param_dtype="float32")
    stacked_params = abstract_params(scanned)
    stacked = sharding.param_logical_axes(stacked_params)["blocks"]
    unrolled = sharding.param_logical_axes(abstract_params(scanned.replace(scan_layers=False)))["block_0"]
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    assert {axes[0] for axes in jax.tree.leaves(stacked, is_leaf=is_axes)} == {"layers"}
    assert jax.tree.map(lambda axes: axes[1:], stacked, is_leaf=is_axes) == unrolled
    mesh = jax.sharding.AbstractMesh((2, 2, 2, 1), sharding.MESH_AXES)
    rows = [row for row in sharding.describe_shardings(stacked_params, mesh) if row["path"].startswith("blocks/")]
    assert rows and all(len(row["spec"]) == 0 or row["spec"][0] is None for row in rows)
    assert any(row["spec"] != jax.sharding.PartitionSpec() for row in rows)


SHARDING_CHILD = pathlib.Path(__file__).with_name("sharding_child.py")


@pytest.mark.slow
def test_scanned_layers_on_a_mesh_match_one_device(tmp_path):
    """On 8 fake devices (tests/sharding_child.py, a fresh process): loss and gradients of the
    scanned model under FSDP / tensor / sequence parallelism (the sequence-parallel mixers run
    inside the layer scan, remat too) equal one device's, and a scanned training state restores
    onto other meshes."""
    scan = {"scan_layers": True}
    cases = [{"kind": "equal", "arch": "mag", "overrides": scan, "mesh": "fsdp=2,tensor=2,sequence=2", "length": 32},
             {"kind": "equal", "arch": "mac", "overrides": scan, "mesh": "data=2,sequence=4", "length": 64},
             {"kind": "equal", "arch": "lmm", "overrides": {**scan, "remat": "full"}, "mesh": "data=2,sequence=4",
              "length": 32},
             {"kind": "restore", "arch": "mag", "overrides": scan,
              "meshes": [(8, "data=2,fsdp=2,tensor=2"), (4, "fsdp=2,sequence=2"), (1, "data=1")]}]
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SHARDING_CHILD.parent.parent),
                                                                    os.environ.get("PYTHONPATH")])))
    process = subprocess.run([sys.executable, str(SHARDING_CHILD), "8", json.dumps(cases), str(out)], env=env,
                             capture_output=True, text=True, timeout=3000)
    assert out.exists(), process.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == len(cases), process.stderr[-3000:]
    for case, result in zip(cases[:3], results[:3], strict=True):
        assert "error" not in result, result.get("traceback", result)
        assert result["loss_diff"] <= 1e-12, (case, result)
        assert result["grad_diff"] <= 1e-12 * max(1.0, result["grad_scale"]), (case, result)
    assert "P(None, 'fsdp', 'tensor')" in results[0]["param_specs"]  # a stacked matrix: layers whole, then split
    restored = results[3]
    assert "error" not in restored, restored.get("traceback", restored)
    for where, result in restored.items():
        assert result["step"] == 2 and result["loss_diff"] <= 1e-5 and result["param_diff"] <= 1e-5, (where, result)
