"""Sequence parallelism on fake CPU devices: per-device memory and time of a training step as
the `sequence` mesh axis grows, the compiled per-device memory of a 2M-token step, and the
longest sequence that actually trains here.

    python -m experiments.sequence_bench                        # the committed table
    python -m experiments.sequence_bench --length 16384 --arch lmm --shards 1 2   # quicker

Every row is one real training step (forward, backward, AdamW) of the `mini` preset (~1M
parameters) through titans_jax.training's sharded programs, batch 1: the per-device peak is
XLA's compiled memory analysis of the per-device program (arguments + outputs + temporaries,
what one accelerator would hold); the time is the step's wall time, measured after a warm-up
call. The fake devices share this machine's cores and memory, so time does not fall with more
shards (a real mesh runs the shards at once) and only the per-device memory is the point.
`--longest` then trains with the sequence axis at 8 at doubling lengths while a step fits the
time budget and the machine's memory.

XLA_FLAGS gets experiments.plan's planning flags (unless --xla-cpu-as-is): without them XLA:CPU
merges the recomputation that remat asks for back into the forward pass and starts every
layer's loop buffers early, so its memory (and what actually runs here) is that of a model
without remat -- not what a TPU or GPU compiler does with the same program.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.plan import planning_flags  # noqa: E402 - imports no jax

DEVICES = 8
CPU_AS_IS = "--xla-cpu-as-is" in sys.argv
if "jax" not in sys.modules:  # fake devices and flags must be set before jax starts
    os.environ["XLA_FLAGS"] = planning_flags(os.environ.get("XLA_FLAGS", ""), DEVICES, CPU_AS_IS)

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from titans_jax import sharding  # noqa: E402
from titans_jax.presets import preset  # noqa: E402
from titans_jax.training import OptimConfig, compiled_programs  # noqa: E402

GIB = 1024**3


def model_config(arch: str, remat: str):
    return preset("mini", arch, {"remat": remat})


def machine_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def step_figures(arch: str, length: int, shards: int, remat: str, run: bool = True) -> dict:
    """Per-device compiled memory (and, with run, the wall time) of one training step. A step
    whose devices together would need more than this machine's memory is compiled, not run
    (row["not_run"] says why): the fake devices share the host's RAM, and the kernel's OOM
    killer, not an exception, is what would end the attempt."""
    config = model_config(arch, remat)
    mesh_config = sharding.MeshConfig(data=1, sequence=shards)
    programs = compiled_programs(config, OptimConfig(warmup_steps=1), 10, 0, mesh_config, tuple(jax.devices()[:shards]))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, length + 1))
    batch = sharding.put_batch(tokens, sharding.batch_sharding(programs.mesh))
    state = programs.init()
    started = time.perf_counter()
    compiled = programs.step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    row = {"arch": arch, "length": length, "shards": shards, "tokens_per_shard": length // shards,
           "compile_s": round(compile_seconds, 1),
           "peak_per_device_gib": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                   + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / GIB,
           "temp_per_device_gib": memory.temp_size_in_bytes / GIB}
    needed = row["peak_per_device_gib"] * shards
    if run and needed > 0.9 * machine_memory_gib():
        row["not_run"] = (f"{shards} devices x {row['peak_per_device_gib']:.2f} GiB = {needed:.1f} GiB > 90% of this "
                          f"machine's {machine_memory_gib():.1f} GiB")
        run = False
    if run:
        state, metrics = programs.step(state, batch)  # warm-up (the compiled program is cached)
        jax.block_until_ready(metrics)
        started = time.perf_counter()
        state, metrics = programs.step(state, batch)
        loss = float(metrics["loss"])
        seconds = time.perf_counter() - started
        row.update(step_s=round(seconds, 2), tokens_per_s=round(length / seconds), loss=round(loss, 4),
                   process_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["lmm", "swa", "mag"])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--remat", default="full", help="the model's per-block remat policy")
    parser.add_argument("--compile-only-length", type=int, default=2**21,
                        help="a length whose step is only compiled (memory analysis), at --shards' largest value")
    parser.add_argument("--compile-only", action="store_true",
                        help="only compile (per-device memory), do not run the steps")
    parser.add_argument("--longest", action="store_true", help="also train at doubling lengths with 8 shards")
    parser.add_argument("--longest-arch", default="lmm")
    parser.add_argument("--budget-s", type=float, default=600, help="stop doubling once a step takes longer")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--xla-cpu-as-is", action="store_true",
                        help="leave XLA:CPU's remat-defeating passes on (see the module docstring)")
    args = parser.parse_args(argv)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {len(jax.devices())} fake "
          f"{jax.devices()[0].platform} devices, jax {jax.__version__}; preset mini, batch 1, remat {args.remat}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows = []
    header = "| arch | tokens | shards | tokens/shard | peak/device GiB | temp/device GiB | step s | compile s |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")

    def show(row):
        rows.append(row)
        if args.json:  # after every row: a long search that is stopped keeps what it measured
            with open(args.json, "w") as handle:
                json.dump(rows, handle, indent=1)
        print(f"| {row['arch']} | {row['length']:,} | {row['shards']} | {row['tokens_per_shard']:,} | "
              f"{row['peak_per_device_gib']:.3f} | {row['temp_per_device_gib']:.3f} | {row.get('step_s', '-')} | "
              f"{row['compile_s']} |", flush=True)

    for arch in args.arch:
        for shards in args.shards:
            show(step_figures(arch, args.length, shards, args.remat, run=not args.compile_only))
    if args.compile_only_length:
        for arch in args.arch:
            show(step_figures(arch, args.compile_only_length, max(args.shards), args.remat, run=False))
    if args.longest:
        length = args.length
        while True:
            try:
                row = step_figures(args.longest_arch, length, DEVICES, args.remat)
            except Exception as error:  # noqa: BLE001 - out of memory ends the search, reported
                print(f"# {length:,} tokens failed: {type(error).__name__}: {str(error)[:200]}")
                break
            show(row)
            if "not_run" in row:
                print(f"# {length:,} tokens: compiled, not run: {row['not_run']}")
                break
            if row["step_s"] * 2.2 > args.budget_s:
                print(f"# stopped doubling: the next step would take about {row['step_s'] * 2:.0f} s")
                break
            length *= 2


if __name__ == "__main__":
    main()
