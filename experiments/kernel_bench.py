"""The fused Pallas kernel of the linear memory (titans_jax.pallas_memory) beside XLA's chunk scan.

    python -m experiments.kernel_bench            # a GPU: batch 2, 8 heads x 64, chunk 64, T 4096 and 65536
    python -m experiments.kernel_bench --quick    # any machine: tiny shapes (on CPU the kernel is interpreted)

The memory alone (memory.memory_apply, depth 1 with the residual LayerNorm, momentum and
forgetting: the "linear" preset's memory), on random unit-norm keys and gates in the layer's
ranges. Prints per length, in one run:
  * forward and forward+backward tokens/s and compiled peak memory of XLA's chunked path (at the
    default float32 matmul precision, which lets XLA use TF32 on a GPU, and at "highest") and of
    fused_memory_apply (precision "tf32", "tf32x3" and "highest", default launch settings, its
    reverse chunk-scan backward kernel; "tf32x3" also with backward="xla", jax.vjp of the XLA
    chunked path; then the forward under other warps x stages);
  * the kernel's model FLOP rate as a fraction of this machine's float32 matmul rate (a 2048^3
    jitted matmul in the same run; at default precision, so on a GPU the TF32 rate). Model FLOPs
    per token and head: 10 K V + 2 C (K + V) (the seven products of a chunk, elementwise work not
    counted); XLA's cost analysis does not see inside a Pallas call;
  * errors of float32 outputs (max |a - b| / max |b|) of every path against the float64 chunked
    path, at the first length.
On CPU the kernel runs in Pallas' interpret mode: those times say nothing about the kernel.
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp

from experiments.memory_bench import best_time, matmul_rate
from titans_jax import memory as mem
from titans_jax import pallas_memory as pm
from titans_jax.testing import max_absolute_difference, random_memory_inputs, random_memory_params

PATHS = (("xla, default precision", "xla", None, None), ("xla, highest", "xla", "highest", None),
         ("fused, tf32", "fused", "tf32", "fused"), ("fused, tf32x3", "fused", "tf32x3", "fused"),
         ("fused, tf32x3, xla backward", "fused", "tf32x3", "xla"), ("fused, highest", "fused", "highest", "fused"))


def make_case(args, length: int, dtype):
    config = mem.MemoryConfig(key_dim=args.head_dim, value_dim=args.head_dim, depth=1, chunk_size=args.chunk)
    params = random_memory_params(config, heads=args.heads, seed=7, dtype=dtype)
    inputs = random_memory_inputs(0, length, batch=args.batch, heads=args.heads, key_dim=args.head_dim, dtype=dtype)
    return config, params, inputs


def path_functions(kind: str, precision: str | None, config, interpret: bool, num_warps=None, num_stages=2,
                   backward: str | None = "fused"):
    """Jitted forward (outputs) and forward+backward (mean square of the outputs, gradients
    w.r.t. M_0, the norm, keys, values, queries and the three gates)."""
    if kind == "xla":
        def apply(params, *inputs):
            return mem.memory_apply(params, *inputs, config)[0]
    else:
        def apply(params, *inputs):
            return pm.fused_memory_apply(params, *inputs, config, interpret=interpret, precision=precision,
                                         num_warps=num_warps, num_stages=num_stages, backward=backward)[0]

    def loss(params, *inputs):
        return jnp.mean(apply(params, *inputs) ** 2)

    return jax.jit(apply), jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7))))


def timed(fn, args, batch: int, length: int, repeats: int) -> dict:
    """Compile once; compiled peak memory (temp + arguments + outputs) and the best of `repeats` calls."""
    compiled = fn.lower(*args).compile()
    memory = compiled.memory_analysis()
    peak = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    seconds = best_time(compiled, *args, repeats=repeats)
    return {"seconds": seconds, "tokens_per_s": batch * length / seconds, "peak_bytes": int(peak)}


def relative_error(a, b) -> float:
    return max_absolute_difference(a, b) / float(jnp.max(jnp.abs(b)))


def measure(args, length: int, rate: float, interpret: bool) -> dict:
    config, params, inputs = make_case(args, length, jnp.float32)
    model_flops = 2 * (5 * args.head_dim**2 + args.chunk * 2 * args.head_dim) * args.batch * args.heads * length
    result = {"length": length, "model_flops_fwd": model_flops, "paths": {}}
    outputs = {}
    args_list = (params, *inputs)
    for label, kind, precision, backward in PATHS:
        forward, forward_backward = path_functions(kind, precision, config, interpret, backward=backward)
        # XLA's matmuls (all of the xla path, the fused path's backward) at the path's precision
        with jax.default_matmul_precision("default" if precision in (None, "tf32") else "highest"):
            entry = {name: timed(fn, args_list, args.batch, length, args.repeats)
                     for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward))[:1 if args.no_backward else 2]}
            outputs[label] = forward(*args_list)
        if kind == "fused":
            entry["fwd"]["model_flops_fraction"] = model_flops / entry["fwd"]["seconds"] / rate
        result["paths"][label] = entry
        print(f"[kernel_bench] T={length} {label}: fwd {entry['fwd']['tokens_per_s']:.0f} tok/s", flush=True)
    for precision, warps, stages in args.variants:  # forward only: other Triton launch settings
        forward, _ = path_functions("fused", precision, config, interpret, warps, stages)
        entry = {"fwd": timed(forward, args_list, args.batch, length, args.repeats)}
        entry["fwd"]["model_flops_fraction"] = model_flops / entry["fwd"]["seconds"] / rate
        result["paths"][f"fused, {precision}, {warps} warps, {stages} stages"] = entry
        print(f"[kernel_bench] T={length} fused {precision} {warps} warps {stages} stages: fwd "
              f"{entry['fwd']['tokens_per_s']:.0f} tok/s", flush=True)
    if args.check_float64:
        with jax.enable_x64(True):
            params64, inputs64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), (params, inputs))
            exact = jax.jit(lambda p, *x: mem.memory_apply(p, *x, config)[0])(params64, *inputs64)
            result["errors_vs_float64"] = {label: relative_error(jnp.asarray(out, jnp.float64), exact)
                                           for label, out in outputs.items()}
    return result


def table(results: list[dict], rate: float) -> list[str]:
    lines = ["| T | path | fwd tok/s | fwd MiB | fwd+bwd tok/s | f+b MiB | kernel model FLOP/s |",
             "|---|------|-----------|---------|---------------|---------|---------------------|"]
    for result in results:
        for label, entry in result["paths"].items():
            fraction = entry["fwd"].get("model_flops_fraction")
            both = entry.get("fwd+bwd")
            both_cells = f"{both['tokens_per_s']:.0f} | {both['peak_bytes'] / 2**20:.0f}" if both else "- | -"
            lines.append(
                f"| {result['length']} | {label} | {entry['fwd']['tokens_per_s']:.0f} | "
                f"{entry['fwd']['peak_bytes'] / 2**20:.0f} | {both_cells} | "
                f"{'' if fraction is None else f'{fraction:.1%} of matmul'} |")
    for result in results:
        if "errors_vs_float64" in result:
            errors = ", ".join(f"{label} {error:.1e}" for label, error in result["errors_vs_float64"].items())
            lines.append(f"\nT={result['length']}: max |out - out_float64| / max |out_float64|: {errors}")
    return lines


def parse_variant(text: str, parser: argparse.ArgumentParser) -> tuple[str, int, int]:
    """'tf32x3:4x2' -> ('tf32x3', 4, 2)."""
    precision, _, launch = text.partition(":")
    warps, _, stages = launch.partition("x")
    if precision not in pm.PRECISIONS or not (warps.isdigit() and stages.isdigit()):
        parser.error(f"--variants: expected PRECISION:WARPSxSTAGES with PRECISION in {pm.PRECISIONS}, got {text!r}")
    return precision, int(warps), int(stages)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--lengths", default="4096,65536", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="tf32x3:8x2,tf32:4x2,tf32:8x1",
                        help="extra forward-only runs of the kernel, PRECISION:WARPSxSTAGES comma list ('' for none)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: a smoke run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.heads, args.head_dim, args.chunk, args.lengths, args.repeats = 1, 2, 16, 16, "48", 1
        args.variants = "tf32:4x1"
    args.variants = [parse_variant(v, parser) for v in args.variants.split(",") if v]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    interpret = jax.default_backend() != "gpu"
    args.check_float64 = True
    devices = jax.devices()
    print(f"machine: {platform.machine()}, {devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
          f"{'; kernel in INTERPRET mode (no GPU): times say nothing about it' if interpret else ''}")
    rate = matmul_rate(args.repeats)
    print(f"float32 matmul rate (2048^3, jit, default precision): {rate / 1e9:.1f} GFLOP/s")
    print(f"shape: batch {args.batch}, {args.heads} heads x {args.head_dim}, linear memory (depth 1, residual "
          f"LayerNorm), chunk {args.chunk}, float32")
    results = []
    for index, length in enumerate(lengths):
        args.check_float64 = index == 0
        results.append(measure(args, length, rate, interpret))
    print("\n".join(table(results, rate)))
    if args.json:
        payload = {"machine": devices[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
                   "interpret": interpret, "matmul_rate": rate, "args": {k: v for k, v in vars(args).items()},
                   "results": results}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=float)


if __name__ == "__main__":
    main()
