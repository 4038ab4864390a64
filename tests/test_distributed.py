"""Training with several processes on one machine: two processes x 4 fake CPU devices (8 global)
joined by jax.distributed, a mesh whose fsdp axis spans the processes (parameters split between
them) and whose sequence and tensor axes are used too.

- A run stopped by a signal to ONE process (all stop after the same step and save), whose newest
  checkpoint is then damaged (its recorded digest altered), resumed by a second launch of two
  processes: the damaged step is set aside once, the run falls back to the step before and
  finishes; its losses, evaluation and final parameters equal a one-process run over the same
  steps (8 fake devices, same mesh), and only process 0 wrote metrics, TensorBoard events,
  config.json, summary.json and the progress bar. Slow (three launches, each compiles the step:
  ~2 min on 2 idle cores, more when they are busy).
- A missing peer: the training CLI started as process 0 of 2 (and, separately, as process 1 of
  2 with no coordinator) exits with status 1 and one clear line after its --init-timeout.

Each process runs tests/distributed_child.py (or the CLI) in a fresh interpreter: XLA_FLAGS and
jax.distributed must be set up before jax touches a device.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from titans_jax.training import load_trained, read_metrics

CHILD = pathlib.Path(__file__).with_name("distributed_child.py")
ROOT = CHILD.parents[1]
LAUNCH_TIMEOUT = 900  # seconds for one launch (compiling on 2 busy cores); the test never hangs
PARAM_ATOL = 1e-5  # float32; parameters are O(1-10), measured differences ~6e-8 (collective order)
LOSS_RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # the child sets its own device count and keeps the other flags (conftest's)
    return env


def launch(tmp_path: pathlib.Path, tag: str, out: pathlib.Path, processes: int, signal_at=None) -> list[dict]:
    """Run `processes` children (0: one process with all 8 devices, no coordinator) and return
    their results in process order; kills them all and fails with their logs past the timeout."""
    coordinator = f"127.0.0.1:{free_port()}" if processes else None
    children = []
    for index in range(max(processes, 1)):
        spec = {"devices": 4 if processes else 8, "out": str(out), "result": str(tmp_path / f"{tag}-{index}.json"),
                "coordinator": coordinator, "num_processes": processes, "process_id": index, "init_timeout": 120,
                "signal_at": signal_at}
        log = open(tmp_path / f"{tag}-{index}.log", "w")
        children.append((subprocess.Popen([sys.executable, str(CHILD), json.dumps(spec)], stdout=log,
                                          stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT), log))
    deadline = time.time() + LAUNCH_TIMEOUT
    try:
        for child, _ in children:
            child.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for child, log in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            log.close()
    logs = [(tmp_path / f"{tag}-{index}.log").read_text() for index in range(len(children))]
    results = []
    for index, (child, _) in enumerate(children):
        path = tmp_path / f"{tag}-{index}.json"
        if child.returncode != 0 or not path.exists():
            raise AssertionError(f"{tag}: process {index} ended with status {child.returncode}:\n"
                                 + "\n".join(f"--- process {i} ---\n{_tail(text)}" for i, text in enumerate(logs)))
        results.append(dict(json.loads(path.read_text()), log=logs[index]))
    return results


def _tail(text: str) -> str:
    lines = [line for line in text.splitlines() if "Involuntary full rematerialization" not in line]
    return "\n".join(lines)[-4000:]


def _loss_rows(run_dir: pathlib.Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_two_processes_stop_resume_after_damage_and_match_one_process(tmp_path):
    reference_dir, run_dir = tmp_path / "one-process", tmp_path / "two-processes"
    [reference] = launch(tmp_path, "reference", reference_dir, processes=0)
    assert reference["process_count"] == 1 and reference["summary"]["completed"]

    # 1. SIGTERM reaches process 1 only, while it reads the batch of step 3: both save step 3 and stop
    first = launch(tmp_path, "first", run_dir, processes=2, signal_at={"process": 1, "step": 2})
    for result in first:
        assert (result["process_count"], result["devices"], result["local_devices"]) == (2, 8, 4)
        assert result["split_params"] > 0  # the fsdp axis spans the processes: each holds part of them
        assert result["summary"]["stopped_by_signal"] == signal.SIGTERM and result["summary"]["step"] == 3
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [2, 3]  # save_every=2, + the stop

    # 2. the newest checkpoint restores but no longer matches its digest
    meta_path = run_dir / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    meta["state_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))

    # 3. a second launch sets it aside (on one process; both report it) and resumes from step 2
    second = launch(tmp_path, "second", run_dir, processes=2)
    [aside] = list((run_dir / "damaged-checkpoints").iterdir())
    assert aside.name.startswith("3-")
    for result in second:
        summary = result["summary"]
        assert summary["resumed_from"] == 2 and summary["step"] == 4 and summary["completed"]
        assert any("checkpoint step 3" in w and "does not match the digest" in w and str(aside) in w
                   for w in result["warnings"]), result["warnings"]
    assert "sample" in second[0]["summary"] and "sample" not in second[1]["summary"]  # sampled on process 0
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [2, 4]

    # only process 0 wrote: one metrics row per step (step 3 rewritten by the resumed run), one
    # TensorBoard file per launch, its summary, one progress bar
    rows = _loss_rows(run_dir)
    assert [step for step, _ in rows] == [1, 2, 3, 4]
    assert len([r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/random/nll" in r]) == 1
    assert len(list((run_dir / "tensorboard").iterdir())) == 2
    assert json.loads((run_dir / "summary.json").read_text()) == second[0]["summary"]
    assert json.loads((run_dir / "config.json").read_text())["changes"] == []
    assert "step/s" in second[0]["log"] and "step/s" not in second[1]["log"]

    # the same numbers as one process over the same steps
    np.testing.assert_allclose([loss for _, loss in rows], [loss for _, loss in _loss_rows(reference_dir)],
                               rtol=LOSS_RTOL)
    for name in ("nll", "tokens"):
        assert second[0]["summary"]["eval"]["random"][name] == pytest.approx(
            reference["summary"]["eval"]["random"][name], rel=LOSS_RTOL)
    assert float(second[0]["summary"]["sample"]) == pytest.approx(float(reference["summary"]["sample"]), rel=1e-6)
    _, params, meta = load_trained(run_dir)
    _, reference_params, reference_meta = load_trained(reference_dir)
    assert meta["step"] == reference_meta["step"] == 4
    differences = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), params,
                               reference_params)
    assert max(jax.tree.leaves(differences)) <= PARAM_ATOL, differences


def test_a_missing_peer_ends_with_a_clear_error_in_bounded_time(tmp_path):
    """Process 0 of 2 with nobody else, and process 1 of 2 with no coordinator: each gives up after
    its --init-timeout (4 s) with one line and status 1, instead of waiting or aborting in XLA."""
    started, children = time.time(), []
    for process_id in (0, 1):
        args = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", str(process_id),
                "--init-timeout", "4", "--out", str(tmp_path / f"run-{process_id}"), "--no-progress"]
        children.append(subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                                         env=dict(child_env(), XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                                                           "--xla_force_host_platform_device_count=4"),
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    elapsed = time.time() - started
    for process_id, (child, (stdout, stderr)) in enumerate(zip(children, outputs)):
        assert child.returncode == 1, (child.returncode, stderr[-3000:])
        assert (f"error: process {process_id}: not all 2 processes joined the coordinator at 127.0.0.1:"
                in stderr), stderr[-3000:]
        assert "within 4 s" in stderr and "Check failure" not in stderr
        assert not (tmp_path / f"run-{process_id}").exists()  # nothing written
    assert elapsed < 60, elapsed
    # the three options go together
    incomplete = subprocess.run([sys.executable, "-m", "experiments.train", "--coordinator", "127.0.0.1:1"],
                                cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert incomplete.returncode == 2 and "go together" in incomplete.stderr
