"""One process of a (possibly multi-process) training run for tests/test_distributed.py.

    python tests/distributed_child.py SPEC_JSON

SPEC: {"devices": fake CPU devices of this process, "out": run directory, "result": where this
process writes its JSON result, "coordinator": "127.0.0.1:PORT" or null (one process),
"num_processes", "process_id", "init_timeout": seconds, "signal_at": {"process": i, "step": k}
or null (process i sends itself SIGTERM while reading batch k: every process must then save and
stop after step k + 1)}.

XLA_FLAGS must be set before jax is imported, and jax.distributed initialised before anything
touches the devices: so the device count comes in the spec and the imports follow. The
coordinator is joined through the training CLI's own `init_distributed`.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import traceback
import warnings

SPEC = json.loads(sys.argv[1])
# the device count must be set before jax starts; other inherited flags (the tests' conftest) stay
os.environ["XLA_FLAGS"] = " ".join([flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                    if not flag.startswith("--xla_force_host_platform_device_count=")]
                                   + [f"--xla_force_host_platform_device_count={int(SPEC['devices'])}"])
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from experiments.train import init_distributed  # noqa: E402

if SPEC.get("coordinator"):
    init_distributed(SPEC["coordinator"], SPEC["num_processes"], SPEC["process_id"], SPEC["init_timeout"])

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

from titans_jax import models, sharding, training  # noqa: E402

VOCAB = 64
MESH = "fsdp=2,tensor=2,sequence=2"  # fsdp is the outer axis: parameters are split between the processes
# The linear memory (depth 1) compiles in half the time of the deep one on a sharded sequence.
MODEL = models.ModelConfig(arch="lmm", vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2, head_dim=16,
                           mlp_hidden=64, num_persistent=3, dtype="float32", param_dtype="float32").replace(
    {"lmm.memory.chunk_size": 4, "lmm.memory.depth": 1, "lmm.memory.residual_norm": False})
OPTIM = training.OptimConfig(learning_rate=1e-2, warmup_steps=1)
RUN = training.RunConfig(steps=4, batch_size=8, seq_len=32, log_every=1, eval_every=0, save_every=2,
                         keep_checkpoints=5, progress=True, mesh=sharding.MeshConfig.parse(MESH))


def batch(step: int) -> np.ndarray:
    return np.random.default_rng([7, step]).integers(0, VOCAB, (RUN.batch_size, RUN.seq_len + 1))


def eval_windows():
    return [np.random.default_rng([8, i]).integers(0, VOCAB, (RUN.batch_size, RUN.seq_len + 1)) for i in range(2)]


def checksum(model, params) -> str:
    """sample_fn: must get the whole parameters as plain host arrays on the process that samples."""
    return repr(float(sum(np.abs(np.asarray(leaf, np.float64)).sum() for leaf in jax.tree.leaves(params))))


def split_across_processes() -> int:
    """How many parameters this process holds only part of (their other shards live elsewhere)."""
    programs = training.compiled_programs(MODEL, OPTIM, RUN.steps, RUN.seed, RUN.mesh, tuple(jax.devices()))
    count = 0
    for leaf in jax.tree.leaves(programs.abstract_state["params"]):
        def covered(indices):
            return {tuple((s.start, s.stop) for s in index) for index in indices}

        if covered(leaf.sharding.addressable_devices_indices_map(leaf.shape).values()) != covered(
                leaf.sharding.devices_indices_map(leaf.shape).values()):
            count += 1
    return count


def main() -> None:
    signal_at = SPEC.get("signal_at") or {}

    def train_batch(step):
        if step == signal_at.get("step") and jax.process_index() == signal_at.get("process"):
            os.kill(os.getpid(), signal.SIGTERM)  # this process only: the loop must stop every process
        return batch(step)

    record = {"model_config": dataclasses.asdict(MODEL),  # what load_trained reads back
              "config": {"optim": dataclasses.asdict(OPTIM), "run": {"steps": RUN.steps}}}
    result = {"process": jax.process_index(), "process_count": jax.process_count(),
              "devices": jax.device_count(), "local_devices": jax.local_device_count()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result["split_params"] = split_across_processes()
            result["summary"] = training.train(MODEL, OPTIM, RUN, SPEC["out"], train_batch, {"random": eval_windows},
                                               meta={"tokenizer": "test"}, sample_fn=checksum, run_record=record)
        except Exception as error:  # noqa: BLE001 - reported to the test
            result["error"] = f"{type(error).__name__}: {error}"
            result["traceback"] = traceback.format_exc()[-3000:]
    result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    pathlib.Path(SPEC["result"]).write_text(json.dumps(result, default=str))
    sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
