"""Memory per device of a model at a context length on a mesh -- planned on fake CPU devices,
nothing runs (titans_jax.plan: jax.eval_shape, shardings, and the compiled programs' XLA memory
analysis).

    python -m experiments.plan --preset 760M --arch mac --context 2097152 --batch 1 \\
        --mesh data=1,sequence=256 --mesh data=1,tensor=16,sequence=16 --devices 256
    python -m experiments.plan --preset 170M --context 65536 --mesh sequence=8 --devices 8 \\
        --compile layers,full --check-layers --programs train    # the extrapolation against a full compile
    python -m experiments.plan ... --json plan.json --out plan.md

--devices makes that many fake CPU devices (XLA_FLAGS is set before jax is imported; when jax
is already imported the command runs again in a fresh process). Every --mesh must fit in them.
XLA_FLAGS also gets titans_jax.plan.PLANNING_XLA_FLAGS, without which XLA:CPU's memory analysis
ignores rematerialisation (--xla-cpu-as-is leaves them out, to see the difference).
--compile layers compiles 2- and 3-layer models and extrapolates linearly in the layers (labelled
as such); --check-layers also compiles 4 layers and prints the prediction error. Several modes
(--compile layers,full) give one row each per mesh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

DEVICE_FLAG = "--xla_force_host_platform_device_count"
# titans_jax.plan.PLANNING_XLA_FLAGS (kept here so that jax is not imported before they are set):
# XLA:CPU then keeps jax.checkpoint's optimization barriers and schedules for memory, so that its
# memory analysis reflects rematerialisation as an accelerator's compiler would.
PLANNING_XLA_FLAGS = ("--xla_disable_hlo_passes=cse_barrier_expander",
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")
COMPILE_MODES = ("full", "layers", "none")  # titans_jax.plan.COMPILE_MODES
_CHILD = "TITANS_PLAN_CHILD"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="760M", help="a preset name (titans_jax.presets.PRESETS)")
    parser.add_argument("--arch", default="mac")
    parser.add_argument("--context", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--batch", default="auto",
                        help="sequences per step, or 'auto': one per data x fsdp shard (the default)")
    parser.add_argument("--mesh", action="append", help="mesh axis sizes, e.g. data=1,sequence=256 (repeatable)")
    parser.add_argument("--devices", type=int, default=None,
                        help="fake CPU devices to make (default: the largest mesh)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (bfloat16: activations in bf16, parameters and optimizer in float32)")
    parser.add_argument("--remat", default="full", help="the model's remat policy (titans_jax.models.REMAT_POLICIES)")
    parser.add_argument("--hbm-gib", type=float, action="append",
                        help="HBM sizes (GiB) to check the training peak against (repeatable; default 16 (v5e) and "
                             "80 (H100))")
    parser.add_argument("--compile", default="full",
                        help="full: compile the whole model; layers: compile 2 and 3 layers and extrapolate; none: "
                             "shapes only; several, comma-separated, give a row each")
    parser.add_argument("--check-layers", action="store_true",
                        help="with --compile layers: also compile the train step with 4 layers and report the "
                             "extrapolation error")
    parser.add_argument("--xla-cpu-as-is", action="store_true",
                        help="leave XLA:CPU's defaults (its memory analysis then ignores remat; see titans_jax.plan)")
    parser.add_argument("--same-process", action="store_true",
                        help="when jax is already imported with the right device count, plan in this process even "
                             "if XLA_FLAGS lacks the planning flags")
    parser.add_argument("--programs", default="train,inference", help="which programs to compile")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--out", help="write the markdown report here too")
    return parser


def _mesh_size(text: str) -> int:
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        _, _, value = item.partition("=")
        try:
            sizes.append(int(value))
        except ValueError:
            raise SystemExit(f"error: mesh entries look like 'data=2,sequence=4', got {item!r}") from None
    if any(size == -1 for size in sizes):
        return 0  # takes the rest of the devices
    return math.prod(sizes) if sizes else 1


def check_devices(args) -> int:
    """The fake device count: --devices, or the largest mesh; a clear error when a mesh needs more."""
    meshes = args.mesh or ["data=1"]
    largest = max(_mesh_size(mesh) for mesh in meshes)
    devices = args.devices if args.devices is not None else max(largest, 1)
    if devices <= 0:
        raise SystemExit(f"error: --devices must be positive, got {devices}")
    for mesh in meshes:
        if _mesh_size(mesh) > devices:
            raise SystemExit(f"error: mesh {mesh} needs {_mesh_size(mesh)} devices but --devices is {devices}; give "
                             f"--devices {_mesh_size(mesh)} or more")
    return devices


def planning_flags(flags: str, devices: int, cpu_as_is: bool = False) -> str:
    """XLA_FLAGS with the fake device count and (unless cpu_as_is) PLANNING_XLA_FLAGS merged in."""
    parts = [part for part in flags.split() if not part.startswith(f"{DEVICE_FLAG}=")]
    if not cpu_as_is:
        disabled = [part for part in parts if part.startswith("--xla_disable_hlo_passes=")]
        parts = [part for part in parts if part not in disabled
                 and not part.startswith("--xla_cpu_enable_concurrency_optimized_scheduler=")]
        passes = [name for part in disabled for name in part.split("=", 1)[1].split(",") if name]
        for flag in PLANNING_XLA_FLAGS:
            if flag.startswith("--xla_disable_hlo_passes="):
                passes += [name for name in flag.split("=", 1)[1].split(",") if name not in passes]
            else:
                parts.append(flag)
        parts.append("--xla_disable_hlo_passes=" + ",".join(passes))
    return " ".join(parts + [f"{DEVICE_FLAG}={devices}"])


def compile_modes(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    if not modes or any(mode not in COMPILE_MODES for mode in modes):
        raise SystemExit(f"error: --compile takes {', '.join(COMPILE_MODES)} (comma-separated), got {text!r}")
    return modes


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    devices = check_devices(args)
    compiles = compile_modes(args.compile) != ["none"]
    flags = planning_flags(os.environ.get("XLA_FLAGS", ""), devices, args.xla_cpu_as_is)
    if "jax" in sys.modules:
        import jax

        # too late for XLA_FLAGS here: run again in a fresh process (unless nothing would change)
        if len(jax.devices()) != devices or (
                os.environ.get("XLA_FLAGS", "") != flags and compiles
                and not args.same_process):
            if os.environ.get(_CHILD):
                raise SystemExit(f"error: jax was imported before XLA_FLAGS could be set ({len(jax.devices())} "
                                 f"devices, {devices} wanted)")
            env = dict(os.environ, XLA_FLAGS=flags, **{_CHILD: "1"})
            return subprocess.run([sys.executable, "-m", "experiments.plan", *argv], env=env).returncode
    else:
        os.environ["XLA_FLAGS"] = flags
    return run(args, argv, devices)


def run(args, argv: list[str], devices: int) -> int:
    import jax

    from titans_jax import plan

    batch = None if args.batch == "auto" else int(args.batch)
    meshes = args.mesh or ["data=1"]
    modes = compile_modes(args.compile)
    # every configuration is checked before the first (slow) compile
    try:
        for mesh in meshes:
            plan.make_request(args.preset, context=args.context, mesh=mesh, arch=args.arch, batch=batch,
                              num_devices=devices, dtype=args.dtype, remat=args.remat)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = []
    started = time.perf_counter()
    for mesh in meshes:
        for mode in modes:
            print(f"planning mesh {mesh} (compile {mode}) ...", file=sys.stderr, flush=True)
            row = plan.plan_memory(args.preset, context=args.context, mesh=mesh, arch=args.arch, batch=batch,
                                   devices=jax.devices()[:devices], dtype=args.dtype, remat=args.remat,
                                   compile=mode, programs=tuple(args.programs.split(",")),
                                   check_layers=args.check_layers, hbm_gib=args.hbm_gib)
            rows.append(row)
            print(plan.details(row), file=sys.stderr, flush=True)
    model = rows[0]["model"]
    lines = [f"$ python -m experiments.plan {' '.join(argv)}", "",
             f"jax {jax.__version__}, {devices} fake CPU devices; preset {model['name']} {model['arch']} "
             f"({model['parameters'] / 1e6:.1f}M parameters, {model['layers']} layers, d {model['d_model']}, "
             f"{model['heads']} heads x {model['head_dim']}), context {args.context} tokens, compute "
             f"{model['dtype']}, parameters {model['param_dtype']}, remat {model['remat']}; XLA:CPU planning flags "
             f"{'on' if rows[0]['planning_flags'] else 'OFF (remat not reflected)'}; "
             f"{time.perf_counter() - started:.0f} s in all", "",
             "GiB per device. params / optimizer / grads: exact from the shardings; memory state and halo / caches: "
             "exact from the config; train and infer: the compiled programs' XLA memory analysis (peak = arguments "
             "+ outputs - aliased + temporaries; train = forward + backward + AdamW, infer = one forward pass with "
             "logits_at='last'); fits: the train peak against each HBM size.", "",
             plan.markdown_table(rows), "", "Hand count beside the exact and compiled numbers (GiB per device):", "",
             plan.hand_table(rows), "", plan.CAVEAT, ""]
    for row in rows:
        lines += [plan.details(row), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
