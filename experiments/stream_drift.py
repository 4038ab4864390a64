"""How far apart do two window sizes leave a model's memory? The float32 scale of streaming. ([C2])

    python -m experiments.stream_drift --run runs/lc_niah_mag_scratch_long16k/mag/seed1 \
        --length 262144 --windows 4096,2048 --every 65536

Streaming is exact in exact arithmetic: any split of a prompt into calls gives the same memory
state (titans_jax.memory's contract, tested in float64). In float32 each split rounds
differently, and a memory whose dynamics amplify small differences carries them to the end.
This streams S-NIAH prompts (RULER's passkey, depth 0.5, evaluation seeds from --seed) with each
window size and prints, every --every tokens, the relative Frobenius distance between the two
streams' memory weights per memory layer: the scale below which a replay of the memory outside
the model (experiments.needle_write's replay_gap) cannot be told from the model itself.

With --norms it also streams each prompt once more (the first window size) and prints, per
memory layer and stretch between reports, what the residual LayerNorm hypothesis is about: the
memory's weight norm |W| at the stretch's end, the median step size theta, the median norm |u|
of a token's inner gradient (gate_trace.surprise_norms: at its chunk's start, before any
surprise_clip) and the median relative step theta * |u| / |W| (|u| capped at surprise_clip where
the model has one). With
M(x) = x + LN(f(x)) and f's last layer linear, scaling that layer by c leaves the read unchanged
and scales its gradient by 1 / c, so a gate that shrinks the weights raises the relative step
like 1 / c^2 (the "effective learning rate" of scale-invariant weights under weight decay).
A second table splits this by layer of the memory's MLP (f(x) = W_2 act(W_1 x) at depth 2):
|W_l| and the median relative step theta |u_l| / |W_l| of each, and the median standard
deviation of f(k) over features, what the LayerNorm divides by. Where W_1 k is small the
activation is nearly linear, f nearly homogeneous in W_1, and the first layer nearly scale-free
too: a gate that shrinks it raises its relative step, and the read's gain 1 / std f, as the last
layer's (MemoryConfig.last_layer_floor holds only the last).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from experiments import needle_gates


def memory_weights(cache) -> list[np.ndarray]:
    """Every memory layer's weights in a model cache, flattened (float64)."""
    return [np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                            for leaf in jax.tree.leaves(layer["memory"].memory.weights)])
            for layer in cache["layers"] if "memory" in layer]


def drift(model, params, ids: np.ndarray, windows: tuple[int, int], every: int) -> list[tuple[int, list[float]]]:
    """[(tokens, [relative distance per memory layer])] every `every` tokens and at the end."""
    marks = tuple(range(every, ids.size, every))
    states = []
    for window in windows:
        stream = needle_gates.GateStream(model, params, window)
        states.append({stop: memory_weights(cache) for stop, cache, _ in stream.stream(ids, cuts=marks)
                       if stop in marks or stop == ids.size})
    return [(stop, [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(states[0][stop], states[1][stop])])
            for stop in sorted(states[0])]


def norms(model, params, memory_config, ids: np.ndarray, window: int, every: int) -> list[tuple[int, list[dict]]]:
    """[(tokens, [figures per memory layer])] before the prompt (0 tokens: the weight norms only,
    the others None), every `every` tokens and at the end. Figures: "weights", |W| there (all
    the MLP's layers, mean over heads), and the medians of "theta", "surprise" |u| and "step"
    theta * |u| / |W| over the stretch's tokens and heads; by layer l of the memory's MLP,
    "layer_weights" |W_l| there and "layer_steps", the medians of theta * |u_l| / |W_l| (u_l
    scaled as u by any surprise_clip); "norm_input", the median standard deviation of f(k), the
    MLP's output before the residual LayerNorm (gate_trace.inner_figures), at each token's
    chunk-start weights."""
    from experiments.gate_trace import inner_figures

    def weight_norms(cache, index: int) -> np.ndarray:  # [L + 1]: all layers, then each, mean over heads
        layers = [sum(np.sum(np.square(np.asarray(leaf[0], np.float64)).reshape(leaf.shape[1], -1), axis=1)
                      for leaf in jax.tree.leaves(layer)) for layer in cache["layers"][index]["memory"].memory.weights]
        return np.array([np.mean(np.sqrt(sum(layers)))] + [np.mean(np.sqrt(squares)) for squares in layers])

    def weight_figures(cache, index: int) -> dict:
        every_layer, *by_layer = weight_norms(cache, index)
        return {"weights": float(every_layer), "layer_weights": [float(x) for x in by_layer]}

    marks = tuple(range(every, ids.size, every))
    stream = needle_gates.GateStream(model, params, window)
    before, stretch = stream.empty, {}
    indices = [index for index, layer in enumerate(before["layers"]) if "memory" in layer]
    empty = dict.fromkeys(("theta", "surprise", "step", "layer_steps", "norm_input"))
    rows = [(0, [{**weight_figures(before, index), **empty} for index in indices])]
    for stop, cache, layers in stream.stream(ids, cuts=marks):
        for path, inputs in layers:
            index = int(path.split("/")[0].removeprefix("block_"))
            block, name = path.split("/")
            batched = tuple(None if x is None else x[None] for x in inputs)
            figures = inner_figures(params[block][name]["memory"], batched, memory_config,
                                    before["layers"][index]["memory"].memory)
            by_layer = figures["surprise"][0].astype(np.float64)  # [H, n, L]
            surprise = np.sqrt(np.sum(np.square(by_layer), axis=-1))
            scale = np.sqrt(np.sum(np.square(figures["weights"][0].astype(np.float64)), axis=-1))
            clip = memory_config.surprise_clip
            cap = 1.0 if clip is None else np.minimum(1.0, clip / np.maximum(surprise, np.finfo(np.float64).tiny))
            theta = np.asarray(inputs[3])
            layer_steps = (theta * cap)[..., None] * by_layer / figures["weights"][0]
            stretch.setdefault(index, []).append((theta, surprise, theta * cap * surprise / scale,
                                                  figures["norm_input"][0], *np.moveaxis(layer_steps, -1, 0)))
        before = cache
        if stop in marks or stop == ids.size:
            def figures_at(index):
                theta, surprise, step, norm_input, *steps = (float(np.median(np.concatenate(parts, axis=-1)))
                                                             for parts in zip(*stretch[index]))
                return {**weight_figures(cache, index), "theta": theta, "surprise": surprise, "step": step,
                        "layer_steps": steps, "norm_input": norm_input}

            rows.append((stop, [figures_at(index) for index in indices]))
            stretch = {}
    return rows


def main(argv=None) -> list[tuple[int, int, list[float]]]:
    from experiments.configs import add_model_changes_argument, parse_model_changes
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.long_context import make_examples

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run's directory (<out>/<variant>/seed<k>)")
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--windows", default="4096,2048", help="the two window sizes")
    parser.add_argument("--every", type=int, default=16384, help="tokens between reports")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation seed of the first prompt")
    parser.add_argument("--prompts", type=int, default=1, help="prompts (evaluation seeds from --seed)")
    parser.add_argument("--norms", action="store_true",
                        help="also |W|, theta, the inner gradient's norm and the relative step per layer (the docstring)")
    add_model_changes_argument(parser)
    args = parser.parse_args(argv)
    windows = tuple(int(w) for w in args.windows.split(","))
    if len(windows) != 2 or windows[0] == windows[1]:
        parser.error(f"--windows takes two different window sizes, got {args.windows}")
    changes = parse_model_changes(parser, args.set)
    config, params, _, model = needle_gates.load_streamable(args.run, changes)
    memory_config = config.memory_layer.resolve().memory_config
    rows, norm_rows = [], []
    for example in make_examples("niah_single_1", [args.length], (0.5,), args.prompts, args.seed, ByteTokenizer()):
        ids = ByteTokenizer().encode(example.prompt)
        rows += [(example.seed, stop, gaps) for stop, gaps in drift(model, params, ids, windows, args.every)]
        if args.norms:
            norm_rows += [(example.seed, stop, layers)
                          for stop, layers in norms(model, params, memory_config, ids, windows[0], args.every)]
    changed = f" (with {', '.join(args.set)})" if args.set else ""
    print(f"{args.run}{changed}: memory weights streamed in windows of {windows[0]} and {windows[1]} tokens, "
          "relative distance")
    print("\n| prompt | tokens | " + " | ".join(f"memory layer {i}" for i in range(len(rows[0][2]))) + " |")
    print("|---|---|" + "---|" * len(rows[0][2]))
    for seed, stop, gaps in rows:
        print(f"| {seed} | {stop:,} | " + " | ".join(f"{gap:.1e}" for gap in gaps) + " |")
    if norm_rows:
        print(f"\nstreamed in windows of {windows[0]}: per memory layer |W| at the stretch's end, the medians of theta, "
              "|u| and theta |u| / |W| over it (0 tokens: |W| before the prompt)")
        print("\n| prompt | tokens | " + " | ".join(f"layer {i}: abs W, theta, abs u, step"
                                                   for i in range(len(norm_rows[0][2]))) + " |")
        print("|---|---|" + "---|" * len(norm_rows[0][2]))
        for seed, stop, layers in norm_rows:
            print(f"| {seed} | {stop:,} | " + " | ".join(
                f"{layer['weights']:.3g}, -, -, -" if layer["step"] is None else
                f"{layer['weights']:.3g}, {layer['theta']:.2e}, {layer['surprise']:.3g}, {layer['step']:.2e}"
                for layer in layers) + " |")
        print("\nby layer of the memory's MLP (W_1 first): |W_l| at the stretch's end and the median of "
              "theta |u_l| / |W_l| over it, and the median standard deviation of f(k), the MLP's output "
              "before the residual LayerNorm (what that norm divides by)")
        depth = len(norm_rows[0][2][0]["layer_weights"])
        print("\n| prompt | tokens | " + " | ".join(
            f"layer {i}: " + ", ".join(f"abs W_{l + 1}" for l in range(depth)) + ", "
            + ", ".join(f"step_{l + 1}" for l in range(depth)) + ", std f" for i in range(len(norm_rows[0][2]))) + " |")
        print("|---|---|" + "---|" * len(norm_rows[0][2]))
        for seed, stop, layers in norm_rows:
            print(f"| {seed} | {stop:,} | " + " | ".join(
                ", ".join(f"{x:.3g}" for x in layer["layer_weights"]) + ", "
                + (", ".join(["-"] * (depth + 1)) if layer["step"] is None else
                   ", ".join(f"{x:.2e}" for x in layer["layer_steps"]) + f", {layer['norm_input']:.3g}")
                for layer in layers) + " |")
    return rows


if __name__ == "__main__":
    main()
