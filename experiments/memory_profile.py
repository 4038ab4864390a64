"""Where the LMM layer's time goes: a per-op profile of its compiled forward+backward.

    python -m experiments.memory_profile                    # the memory_bench shape, 2 x 4096
    python -m experiments.memory_profile --seq 1024 --top 20
    python -m experiments.memory_profile --remat-every 0    # compare rematerialisation settings
    python -m experiments.memory_profile --json out.json

Runs the jitted value_and_grad of the layer (the same function as experiments.memory_bench)
once under jax.profiler.trace and reads the trace back with jax.profiler.ProfileData: on XLA:CPU
every executed thunk (a fusion, a dot, a copy) is one event named after its HLO instruction. Each
instruction is looked up in the compiled HLO text, and its metadata says where it came from:

  phase   forward            ops of the primal computation (jvp(...) in op_name)
          backward           ops of the transposed (VJP) computation: transpose(...) as the
                             outermost transform (the memory's inner-gradient VJP inside the
                             forward, transpose(jvp()) deeper in op_name, is forward work)
          recompute          forward ops replayed inside the backward by jax.checkpoint
                             (rematted_computation)
  region  chunk scan         inside the memory's while loop over chunks
          outside            projections, gates, convolution, norms, the loss
  kind    dot                plain dot instructions and XNNPACK/YNNPACK dot fusions
          copy               copies and transposes (layout changes)
          elementwise        loop / input fusions and everything else

Prints the step time, the time by phase x region and by kind, and the top instructions with their
calls, total time and source. The totals are thread-summed event time, so with several threads
they can exceed the wall time; compare fractions, not seconds, across thread counts.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import tempfile

import jax
import jax.numpy as jnp

from experiments.memory_bench import add_shape_arguments, best_time, layer_config, layer_functions

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+(\w[\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def instruction_table(hlo_text: str) -> dict:
    """HLO instruction name -> (shape, opcode, op_name metadata, fusion kind) of a compiled module."""
    table = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode = match.groups()
        op_name = _OP_NAME.search(line)
        fusion_kind = re.search(r'"kind":"(__\w+)"', line)
        table[name] = (shape, opcode, op_name.group(1) if op_name else "",
                       fusion_kind.group(1) if fusion_kind else "")
    return table


def classify(name: str, entry: tuple | None) -> tuple[str, str, str]:
    """(phase, region, kind) of one executed instruction."""
    shape, opcode, op_name, fusion_kind = entry or ("", "", "", "")
    transforms = op_name.split("/")
    if "rematted_computation" in op_name:
        phase = "recompute"
    elif len(transforms) > 1 and transforms[1].startswith("transpose("):
        phase = "backward"  # the outermost transform under jit; the memory's own inner-gradient
    else:                   # VJP (transpose(jvp()) deeper in the path) is forward work
        phase = "forward"
    region = "chunk scan" if "while/body" in op_name else "outside"
    if opcode == "dot" or "dot" in fusion_kind or "ynn" in fusion_kind or name.startswith(("dot", "ynn")):
        kind = "dot"
    elif opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        kind = "copy"
    else:
        kind = "elementwise"
    return phase, region, kind


def profile(fn, *args, trace_dir: str) -> dict:
    """instruction name -> [calls, total ns] over one traced call of the compiled fn."""
    with jax.profiler.trace(trace_dir):
        jax.block_until_ready(fn(*args))
    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not files:
        raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}")
    events = collections.defaultdict(lambda: [0, 0])
    for plane in jax.profiler.ProfileData.from_file(files[-1]).planes:
        if not plane.name.startswith("/host:CPU") and not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name == "python" or "PjRt" in line.name:
                continue  # Python frames and the client's wait: not the program's work
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "$", "end: ")):
                    continue  # the executor's own spans, Python frames, async completion marks
                if event.name.startswith(("while", "call", "conditional")):
                    continue  # a control-flow thunk's span encloses its body's events
                events[event.name][0] += 1
                events[event.name][1] += event.duration_ns
    return dict(events)


def summarise(events: dict, table: dict, top: int) -> dict:
    total = sum(ns for _, ns in events.values())
    by_phase_region, by_kind, rows = collections.Counter(), collections.Counter(), []
    for name, (calls, ns) in events.items():
        phase, region, kind = classify(name, table.get(name))
        by_phase_region[(phase, region)] += ns
        by_kind[kind] += ns
        shape, _, op_name, _ = table.get(name, ("?", "?", "", ""))
        rows.append({"name": name, "calls": calls, "ms": ns / 1e6, "phase": phase, "region": region,
                     "kind": kind, "shape": shape, "source": op_name.split("/", 1)[-1]})
    rows.sort(key=lambda row: -row["ms"])
    return {"total_ms": total / 1e6,
            "phase_region": {f"{p} / {r}": ns / 1e6 for (p, r), ns in by_phase_region.most_common()},
            "kind": {k: ns / 1e6 for k, ns in by_kind.most_common()},
            "top": rows[:top]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="the wall time is the best of this many calls")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args(argv)

    config = layer_config(args)
    layer, forward, forward_backward = layer_functions(config)
    fn = forward if args.forward_only else forward_backward
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.seq, args.d_model), jnp.float32)
    variables = layer.init(jax.random.PRNGKey(1), x[:, : args.chunk])
    table = instruction_table(fn.lower(variables, x).compile().as_text())
    seconds = best_time(fn, variables, x, repeats=args.repeats)
    with tempfile.TemporaryDirectory() as trace_dir:
        summary = summarise(profile(fn, variables, x, trace_dir=trace_dir), table, args.top)
    summary.update(seconds=seconds, tokens_per_s=args.batch * args.seq / seconds, args=vars(args),
                   backend=jax.default_backend(), threads_note="event time is summed over threads")

    what = "forward" if args.forward_only else "forward+backward"
    print(f"LMM layer {what}, batch {args.batch} x {args.seq}, d {args.d_model}, {args.heads} x {args.head_dim} "
          f"heads, depth {args.depth}, chunk {args.chunk}, remat_every {args.remat_every}, "
          f"surprise_gradient {args.surprise_gradient}")
    print(f"wall {seconds * 1e3:.0f} ms ({summary['tokens_per_s']:,.0f} tok/s); traced op time "
          f"{summary['total_ms']:.0f} ms (summed over threads)")
    total = summary["total_ms"] or 1.0
    print("\nby phase / region:")
    for key, ms in summary["phase_region"].items():
        print(f"  {key:28s} {ms:9.1f} ms  {100 * ms / total:5.1f}%")
    print("by kind:")
    for key, ms in summary["kind"].items():
        print(f"  {key:28s} {ms:9.1f} ms  {100 * ms / total:5.1f}%")
    print(f"\ntop {args.top} instructions:")
    print(f"  {'ms':>8s} {'%':>5s} {'calls':>6s}  {'phase':9s} {'kind':11s} {'shape':24s} source")
    for row in summary["top"]:
        print(f"  {row['ms']:8.1f} {100 * row['ms'] / total:5.1f} {row['calls']:6d}  {row['phase']:9s} "
              f"{row['kind']:11s} {row['shape'][:24]:24s} {row['source'][-70:]}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
