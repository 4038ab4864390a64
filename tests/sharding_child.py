"""Multi-device checks, run in a fresh process with fake CPU devices (tests/test_sharding.py).

    python tests/sharding_child.py DEVICES CASES_JSON OUT_JSON

XLA_FLAGS must be set before jax is imported, so the device count is this script's first
argument. Each case is a dict with a "kind"; the results (one dict per case, same order) go to
OUT_JSON. An exception inside a case is recorded as its result ({"error": type, "message"}), so
one failing case does not hide the others.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

# the device count must be set before jax starts; other inherited flags (the tests' conftest) stay
os.environ["XLA_FLAGS"] = " ".join([flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                    if not flag.startswith("--xla_force_host_platform_device_count=")]
                                   + [f"--xla_force_host_platform_device_count={int(sys.argv[1])}"])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from titans_jax import models, sharding  # noqa: E402

VOCAB = 64


def tiny_config(arch: str, overrides: dict | None = None, dtype: str = "float64") -> models.ModelConfig:
    config = models.ModelConfig(arch=arch, vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=2, head_dim=16,
                                mlp_hidden=64, window=8, num_persistent=3, dtype=dtype, param_dtype=dtype)
    return config.replace({"lmm.memory.chunk_size": 4, "segment_size": 16, **(overrides or {})})


def _loss(model, params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    targets = tokens[:, 1:, None]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets, -1)[..., 0])


_REFERENCES: dict = {}


def equal_case(case: dict) -> dict:
    """Loss and gradients on a mesh against one device, float64."""
    with jax.enable_x64(True):
        config = tiny_config(case["arch"], case.get("overrides"))
        model = models.TitansLM(config)
        params = models.init_params(config, jax.random.PRNGKey(0))
        tokens = jax.random.randint(jax.random.PRNGKey(1), (case.get("batch", 4), case.get("length", 32) + 1), 0, VOCAB)
        value_and_grad = jax.value_and_grad(lambda p, t: _loss(model, p, t))
        key = (config, tokens.shape)
        if key not in _REFERENCES:
            _REFERENCES[key] = jax.jit(value_and_grad)(params, tokens)
        ref_loss, ref_grads = _REFERENCES[key]
        mesh = sharding.make_mesh(sharding.MeshConfig.parse(case["mesh"]), jax.devices()[:case.get("devices", 8)])
        with jax.set_mesh(mesh):
            placed = jax.device_put(params, sharding.param_shardings(params, mesh))
            loss, grads = jax.jit(value_and_grad)(placed, sharding.put_batch(np.asarray(tokens),
                                                                              sharding.batch_sharding(mesh)))
        specs = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(placed)})
        grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                        zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True))
        grad_scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref_grads))
        return {"loss": float(loss), "loss_diff": abs(float(loss - ref_loss)), "grad_diff": grad_diff,
                "grad_scale": grad_scale, "param_specs": specs}


def error_case(case: dict) -> dict:
    """A forward pass expected to be refused (traced only): the exception's type and message."""
    config = tiny_config(case["arch"], case.get("overrides"))
    model = models.TitansLM(config)
    tokens = jax.ShapeDtypeStruct((case.get("batch", 2), case["length"]), jnp.int32)
    mesh = sharding.make_mesh(sharding.MeshConfig.parse(case["mesh"]))
    with jax.set_mesh(mesh):
        jax.eval_shape(lambda p, t: model.apply({"params": p}, t), models.abstract_params(config), tokens)
    return {"error": None}


def restore_case(case: dict) -> dict:
    """Train a step on one mesh, checkpoint, restore on others (fewer devices, other layouts):
    the next step must give the same loss and parameters as continuing on the first mesh."""
    from titans_jax import training

    config = tiny_config(case["arch"], case.get("overrides"), dtype="float32")
    optim = training.OptimConfig(warmup_steps=1)
    batches = np.random.default_rng(0).integers(0, VOCAB, (2, 8, 33))
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        first = training.compiled_programs(config, optim, 10, 0, sharding.MeshConfig.parse(case["meshes"][0][1]),
                                   tuple(jax.devices()[:case["meshes"][0][0]]))
        state = first.init()
        state, _ = first.step(state, sharding.put_batch(batches[0], sharding.batch_sharding(first.mesh)))
        checkpointer = training.Checkpointer(directory)
        checkpointer.save(1, state, {"note": "restore test"})
        checkpointer.close()
        expected, metrics = first.step(state, sharding.put_batch(batches[1], sharding.batch_sharding(first.mesh)))
        expected_params = jax.tree.map(np.asarray, jax.device_get(expected["params"]))
        for devices, mesh_text in case["meshes"][1:]:
            programs = training.compiled_programs(config, optim, 10, 0, sharding.MeshConfig.parse(mesh_text),
                                          tuple(jax.devices()[:devices]))
            checkpointer = training.Checkpointer(directory)
            restored, meta, _ = checkpointer.restore_latest(programs.abstract_state, {})
            checkpointer.close()
            placed = {str(leaf.sharding) for leaf in jax.tree.leaves(restored["params"])}
            after, new_metrics = programs.step(restored, sharding.put_batch(batches[1],
                                                                           sharding.batch_sharding(programs.mesh)))
            diff = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(
                jax.tree.leaves(jax.device_get(after["params"])), jax.tree.leaves(expected_params), strict=True))
            results[f"{devices}:{mesh_text}"] = {
                "loss_diff": abs(float(new_metrics["loss"]) - float(metrics["loss"])), "param_diff": diff,
                "step": int(after["step"]), "devices_used": len(jax.tree.leaves(restored["params"])[0].devices()),
                "num_shardings": len(placed)}
    return {"meshes": results}


KINDS = {"equal": equal_case, "error": error_case, "restore": restore_case}


def main() -> None:
    cases = json.loads(sys.argv[2])
    results = []
    for case in cases:
        started = time.perf_counter()
        try:
            result = KINDS[case["kind"]](case)
        except Exception as error:  # noqa: BLE001 - recorded for the test to judge
            result = {"error": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - started, 1)  # what each case costs the suite
        results.append(result)
        with open(sys.argv[3], "w") as handle:  # after each case: a crash keeps what finished
            json.dump(results, handle)


if __name__ == "__main__":
    main()
