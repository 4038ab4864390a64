"""Parameter counts of every preset and architecture beside the paper's nominal sizes, from
shapes only (jax.eval_shape: nothing is allocated, so the 760M models cost nothing to check).

    python -m experiments.presets_report [--out experiments/results/presets.txt]
    python -m experiments.presets_report --memory 170M --length 4096   # + compiled train-step memory

With --memory, one train step (forward + backward of the mean next-token cross-entropy, batch 1)
of that preset is lowered and compiled for this machine from abstract shapes, and XLA's
memory analysis gives the bytes it would need (arguments, outputs, temporaries); nothing runs.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from titans_jax.models import ARCHITECTURES, TitansLM, abstract_params, param_count
from titans_jax.presets import PRESETS, VARIANTS, preset

ARCHS = ("transformer", "swa", "ttt", "linear", "lmm", "mac", "mag", "mal")
assert set(ARCHS) == set(ARCHITECTURES) | set(VARIANTS)


def train_step_memory(name: str, arch: str, length: int) -> dict:
    config = preset(name, arch)
    model = TitansLM(config)
    params = abstract_params(config)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    stats = compiled.memory_analysis()
    return {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "temporaries": stats.temp_size_in_bytes, "compile_s": time.perf_counter() - start}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the printout to this file")
    parser.add_argument("--memory", help="a preset whose compiled train-step memory to report")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--archs", default=",".join(ARCHS), help="architectures for --memory")
    args = parser.parse_args(argv)
    lines = [f"$ python -m experiments.presets_report {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"jax {jax.__version__}; counts from jax.eval_shape; each cell: parameters (layers x MLP width),",
             "layers solved per arch at the standard MLP width, then the MLP width fine-tuned to the target", ""]
    header = "| preset | target | " + " | ".join(ARCHS) + " |"
    lines += [header, "|" + "---|" * (len(ARCHS) + 2)]
    for name, (shape, target) in PRESETS.items():
        cells = []
        for arch in ARCHS:
            config = preset(name, arch)
            count = param_count(abstract_params(config))
            cells.append(f"{count / 1e6:.2f}M ({config.num_layers} x {config.mlp_hidden})")
        nominal = f"{target / 1e6:.0f}M" if target else "-"
        lines.append(f"| {name} (d {shape['d_model']}) | {nominal} | " + " | ".join(cells) + " |")
    if args.memory:
        lines += ["", f"compiled train step, preset {args.memory}, batch 1 x {args.length} tokens, float32 (GiB):", "",
                  "| arch | arguments | outputs | temporaries | compile s |", "|---|---|---|---|---|"]
        for arch in args.archs.split(","):
            try:
                stats = train_step_memory(args.memory, arch, args.length)
                lines.append(f"| {arch} | {stats['arguments'] / 2**30:.2f} | {stats['outputs'] / 2**30:.2f} | "
                             f"{stats['temporaries'] / 2**30:.2f} | {stats['compile_s']:.0f} |")
            except Exception as error:  # noqa: BLE001 - report and go on
                lines.append(f"| {arch} | failed: {type(error).__name__}: {str(error)[:80]} | | | |")
            print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
