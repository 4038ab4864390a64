"""Throughput of every architecture of one preset on this machine: forward and forward+backward
tokens/s of the whole language model, at several sequence lengths, in one run.

    python -m experiments.arch_bench --json experiments/results/arch_bench_cpu.json \\
        --out experiments/results/arch_bench_cpu.txt      # the README table (small preset, CPU)
    python -m experiments.arch_bench --quick              # smoke run (tiny preset; ~3 min on 2 cores, all compile)

Architectures (rows): transformer (Transformer++, full causal attention), swa (sliding window),
ttt and linear (LMM variants: no momentum / no forgetting, and memory depth 1), lmm, mac, mag,
mal; each from `titans_jax.presets.preset(--preset, arch)`, so all have matched parameter counts.
Inputs are random int32 token ids [--batch, T] for T in --lengths; the models run in float32.

For each (arch, T), on JAX's default backend (CPU here), times are the best of --repeats calls
of the compiled program (one call for T >= --long-from, default 16K):
  * fwd      jit of the mean next-token cross-entropy of `model.apply` (the logits are reduced
             inside the jitted function, so copying [B, T, V] logits out is not timed);
  * fwd+bwd  jit of jax.value_and_grad of that loss w.r.t. all parameters;
  * peak MiB of the compiled fwd+bwd program: XLA's memory analysis, temp + argument + output
             bytes (arguments include the parameters, outputs the gradients);
  * compile s: trace + lower + XLA compile of each program (never inside the timings);
  * fwd FLOP/s: XLA's cost-analysis FLOPs of the fwd program / fwd time, as a fraction of this
             machine's float32 matmul rate (a 2048^3 jitted matmul, measured in the same run).
             XLA counts the body of a while loop once, whatever its trip count. Every model here
             loops (attention over query blocks in a lax.map, the memory's chunk scan, MAC's
             segment scan), so for those programs the count and the fraction are LOWER BOUNDS,
             printed with a ">=" sign, and they may be far below the true numbers.
--quick (tiny preset, lengths 64,128, one repeat) also compiles with XLA's backend optimisation
level 0 (--fast-compile), which halves compile time: a smoke test, its numbers mean nothing.
A setting that fails (out of memory, compile error) prints "failed: <reason>" in its cell and
the run goes on. A program whose compiled peak exceeds the memory available is not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp

from experiments.memory_bench import compiled_stats, matmul_rate
from titans_jax import config_tree
from titans_jax.models import ModelConfig, TitansLM, init_params, param_count
from titans_jax.presets import preset

ARCHS = ("transformer", "swa", "ttt", "linear", "lmm", "mac", "mag", "mal")
LABELS = {"transformer": "transformer (Transformer++)", "ttt": "ttt (lmm, no momentum/forget)",
          "linear": "linear (lmm, depth 1)"}
DEFAULTS = dict(preset="small", lengths="1024,4096,16384", repeats=2)
QUICK = dict(preset="tiny", lengths="64,128", repeats=1)
PASSES = ("fwd", "fwd+bwd")


def next_token_loss(model: TitansLM):
    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)[:, :-1]
        targets = tokens[:, 1:]
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)

    return loss


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def has_loop(fn, *args) -> bool:
    """Whether the lowered program holds a while loop (lax.scan / lax.map / fori_loop)."""
    return "stablehlo.while" in fn.lower(*args).as_text()


def measure(fn, params, tokens, repeats: int, count_flops: bool) -> dict:
    start = time.perf_counter()
    flops, peak = compiled_stats(fn, params, tokens)  # trace + lower + compile (cached for the calls below)
    compile_s = time.perf_counter() - start
    available = available_bytes()
    if available is not None and peak > 0.9 * available:
        raise MemoryError(f"needs {peak / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")
    # The program is compiled above, so the first call is already a timed run; its output is
    # checked for finiteness (timing a model that produced NaN would measure nothing useful).
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = jax.block_until_ready(fn(params, tokens))
        times.append(time.perf_counter() - start)
    seconds = min(times)
    value = float(output[0] if isinstance(output, tuple) else output)
    if not jnp.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value}")
    batch, length = tokens.shape
    result = {"seconds": seconds, "tokens_per_s": batch * length / seconds, "compile_s": compile_s, "loss": value,
              "peak_bytes": peak, "xla_flops": flops, "xla_flops_per_s": flops / seconds}
    if count_flops:
        result["flops_lower_bound"] = has_loop(fn, params, tokens)
    return result


def short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    text = text[0] if text else ""
    reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return reason if len(reason) <= 60 else reason[:57] + "..."


def parse_changes(items: list[str]) -> dict:
    """--set KEY=VALUE items -> {dotted ModelConfig path: value of the field's type}."""
    return config_tree.parse_assignments(ModelConfig, items)


def changes_for(arch: str, changes: dict) -> dict:
    """The --set changes that apply to arch: those under lmm. only where the model has a memory."""
    has_memory = preset("tiny", arch).arch not in ("transformer", "swa")
    return {key: value for key, value in changes.items() if has_memory or not key.startswith("lmm.")}


def bench_arch(arch: str, args, lengths: list[int], log) -> dict:
    config = preset(args.preset, arch, changes_for(arch, args.changes))
    model = TitansLM(config)
    options = {"xla_backend_optimization_level": 0} if args.fast_compile else None
    # jitted: eager Flax init dispatches (and compiles) op by op, ~15 s for MAC even at the tiny preset
    params = jax.jit(init_params, static_argnums=0, compiler_options=options)(config, jax.random.PRNGKey(0))
    loss = next_token_loss(model)
    programs = {"fwd": jax.jit(loss, compiler_options=options),
                "fwd+bwd": jax.jit(jax.value_and_grad(loss), compiler_options=options)}
    row = {"params": param_count(params), "config": dataclasses.asdict(config), "lengths": {}}
    for length in lengths:
        tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, length), 0, config.vocab_size, jnp.int32)
        cell = {}
        for name in PASSES:
            log(f"[arch_bench] {arch} T={length} {name} ...")
            try:
                repeats = args.repeats if length < args.long_from else 1
                cell[name] = measure(programs[name], params, tokens, repeats, count_flops=name == "fwd")
                log(f"[arch_bench]   {cell[name]['tokens_per_s']:.0f} tok/s, compile {cell[name]['compile_s']:.1f} s, "
                    f"peak {cell[name]['peak_bytes'] / 2**20:.0f} MiB")
            except Exception as err:  # noqa: BLE001 -- one failing cell must not stop the run
                cell[name] = {"error": short_reason(err)}
                log(f"[arch_bench]   failed: {cell[name]['error']}")
        row["lengths"][str(length)] = cell
    jax.clear_caches()
    return row


def length_label(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows]


def cell_text(entry: dict | None, value, reason: bool = False) -> str:
    """value(entry), or for a failed measurement "failed: <reason>" (just "failed" where reason=False:
    the tokens/s table gives the reasons)."""
    if entry is None:
        return ""
    if "error" in entry:
        return f"failed: {entry['error']}" if reason else "failed"
    return value(entry)


def tables(results: dict, lengths: list[int], rate: float) -> list[str]:
    archs = list(results)
    labels = [LABELS.get(arch, arch) for arch in archs]
    cells = lambda arch, length: results[arch]["lengths"][str(length)]  # noqa: E731
    lines = []

    lines.append("tokens/s (batch x T / best time; higher is better)")
    header = ["arch", "params"] + [f"{length_label(n)} {p}" for n in lengths for p in PASSES]
    rows = [[label, f"{results[arch]['params'] / 1e6:.2f}M"]
            + [cell_text(cells(arch, n).get(p), lambda e: f"{e['tokens_per_s']:,.0f}", True) for n in lengths for p in PASSES]
            for arch, label in zip(archs, labels)]
    lines += markdown(header, rows)

    lines.append("")
    lines.append("peak memory of the compiled fwd+bwd, MiB (XLA memory analysis: temp + arguments + outputs)")
    header = ["arch"] + [length_label(n) for n in lengths]
    rows = [[label] + [cell_text(cells(arch, n).get("fwd+bwd"), lambda e: f"{e['peak_bytes'] / 2**20:,.0f}")
                       for n in lengths] for arch, label in zip(archs, labels)]
    lines += markdown(header, rows)

    lines.append("")
    lines.append("compile time, s (trace + lower + XLA compile; fwd / fwd+bwd)")
    both = lambda c: " / ".join(cell_text(c.get(p), lambda e: f"{e['compile_s']:.1f}") for p in PASSES)  # noqa: E731
    rows = [[label] + [both(cells(arch, n)) for n in lengths] for arch, label in zip(archs, labels)]
    lines += markdown(header, rows)

    lines.append("")
    lines.append(f"fwd: XLA-counted GFLOP/s and its fraction of the f32 matmul rate ({rate / 1e9:.1f} GFLOP/s)")
    lines.append("  '>=': the program loops (attention blocks / memory chunks / MAC segments) and XLA's cost")
    lines.append("  analysis counts a loop body once, so the FLOPs, and the fraction, are lower bounds only")
    lines.append("  (possibly far below the truth); they are not comparable between architectures.")

    def flops(entry):
        sign = ">=" if entry.get("flops_lower_bound", True) else ""
        return f"{sign}{entry['xla_flops_per_s'] / 1e9:.1f} ({sign}{entry['xla_flops_per_s'] / rate:.1%})"

    rows = [[label] + [cell_text(cells(arch, n).get("fwd"), flops) for n in lengths] for arch, label in zip(archs, labels)]
    lines += markdown(header, rows)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma list of {', '.join(ARCHS)}")
    parser.add_argument("--lengths", help=f"comma list of sequence lengths (default {DEFAULTS['lengths']})")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, help=f"timed calls per measurement, best kept (default {DEFAULTS['repeats']})")
    parser.add_argument("--long-from", type=int, default=16384,
                        help="lengths from this one on are timed once (a 16K Transformer++ fwd+bwd takes minutes)")
    parser.add_argument("--preset", help=f"a titans_jax.presets name (default {DEFAULTS['preset']})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: preset {QUICK['preset']}, lengths {QUICK['lengths']}, repeats {QUICK['repeats']}")
    parser.add_argument("--fast-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile with XLA backend optimisation level 0 (about half the compile time, "
                             "slower code; default: on with --quick only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a ModelConfig change for every arch, e.g. lmm.memory.impl=fused (lmm.* only where "
                             "the model has a memory)")
    parser.add_argument("--json", help="write all numbers to this file")
    parser.add_argument("--out", help="also write the printed tables to this file")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        args.changes = parse_changes(args.set)
    except ValueError as err:
        parser.error(str(err))
    if args.fast_compile is None:
        args.fast_compile = args.quick
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown arch(s) {unknown}; choose from {ARCHS}")
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    if args.batch < 1 or args.repeats < 1 or not lengths or min(lengths) < 2:
        parser.error("--batch and --repeats must be >= 1 and every length >= 2")
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    command = shlex.join(["python", "-m", "experiments.arch_bench"] + argv)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = (f"{platform.processor() or platform.machine()}, {cpus} usable CPUs, "
               f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})")
    rate = matmul_rate(args.repeats)
    lines = [f"command: {command}", f"date: {date}", f"jax {jax.__version__}; machine: {machine}",
             f"float32 matmul rate (2048^3, jit, best of {max(args.repeats, 5)}): {rate / 1e9:.1f} GFLOP/s",
             f"preset {args.preset!r}, batch {args.batch}, float32, best of {args.repeats} calls (1 from T={args.long_from}); "
             f"loss = mean next-token cross-entropy", ""]
    if args.fast_compile:
        lines.insert(-1, "NOTE: compiled with xla_backend_optimization_level=0 (--fast-compile): smoke-test numbers, "
                         "not representative")
    print("\n".join(lines), flush=True)

    results = {}
    for arch in archs:
        results[arch] = bench_arch(arch, args, lengths, log)
    table = tables(results, lengths, rate)
    print("\n".join(table), flush=True)
    lines += table

    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": command, "date": date, "jax_version": jax.__version__, "machine": machine,
                       "args": vars(args), "matmul_flops_per_s": rate, "results": results}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
