"""How open MAG's output gate is on a prompt, with the memory's test-time writes and without ([C2]).

    python -m experiments.mag_gate --run runs/lc_niah_mag_qa1_scratch_stage2/mag/seed0 --task qa1 \
        --length 1024 --per-cell 16

MAG mixes its two branches as gate(y, m) = RMSNorm(y) * sigmoid(RMSNorm(m)) (titans_jax.models):
the memory's retrieval m only scales the attention's output y, channel by channel. Holding the
memory at its initial weights (`--set model.lmm.write=false`, LMMConfig.write) is a way to ask
what the memory's writes carry, but only if the gate does not simply close or open: this prints,
per MAG layer, over the prompts' last --last tokens (the question, where the answer is read):

- gate: the mean of sigmoid(RMSNorm(m)) with the writes, and with the memory held at M_0;
- change: the mean |gate with writes - gate without| over tokens and channels (what the writes move);
- output: the root mean square of the gated output RMSNorm(y) * gate, both ways.

The prompts are the evaluation's (experiments.long_context's set: the same stories as
experiments.qa_choice with --depths none), each run as one call over its tokens (no streaming: a
prompt of --length tokens at once).
"""

from __future__ import annotations

import argparse

import numpy as np


def gate_figures(model, params, ids: np.ndarray, last: int) -> list[dict]:
    """Per MAG layer of `model` on the token rows `ids` [B, T]: the gate's mean and the gated
    output's root mean square over the last `last` tokens, and the gate itself there."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def intermediates(p, tokens):
        _, state = model.apply({"params": p}, tokens, logits_at="none", capture_intermediates=True,
                               mutable=["intermediates"])
        return state["intermediates"]

    captured = intermediates(params, jnp.asarray(ids))
    layers = sorted((name for name in captured if name.startswith("block_")), key=lambda n: int(n.split("_")[1]))
    if not layers or "gate" not in captured[layers[0]]:
        raise SystemExit("mag_gate reads MAG's output gate: this model has none (a mag run is needed)")
    out = []
    for name in layers:
        gate = np.asarray(jax.nn.sigmoid(captured[name]["gate"]["norm_m"]["__call__"][0]))[:, -last:]
        gated = np.asarray(captured[name]["gate"]["__call__"][0])[:, -last:]
        out.append({"layer": name, "gate": gate, "mean": float(gate.mean()),
                    "output_rms": float(np.sqrt(np.mean(gated.astype(np.float64) ** 2)))})
    return out


def compare(run_dir: str, task: str, length: int, per_cell: int, seed: int, last: int) -> list[dict]:
    """Per layer: the gate's mean and the output's RMS with the writes and without, and the mean
    absolute change of the gate between the two."""
    from titans_jax.data.tokenizers import ByteTokenizer
    from titans_jax.long_context.eval_sets import EvalSetSpec, load_eval_set
    from titans_jax.models import TitansLM
    from titans_jax.training import load_trained

    tokenizer = ByteTokenizer()
    spec = EvalSetSpec(tasks=(task,), lengths=(length,), depths=(None,), num_per_cell=per_cell, seed=seed,
                       name="harness")
    source = load_eval_set(spec, tokenizer)
    prompts = [tokenizer.encode(source[i]["prompt"].decode("utf-8")) for i in range(len(source))]
    if len({len(p) for p in prompts}) != 1:
        raise SystemExit(f"prompts of {sorted({len(p) for p in prompts})} tokens: one call needs one length")
    ids = np.asarray(prompts, np.int32)
    figures = {}
    for label, changes in (("writes", {}), ("held", {"lmm.write": False})):
        config, params, _ = load_trained(run_dir, changes)
        if config.arch != "mag":
            raise SystemExit(f"{run_dir} is a {config.arch} run: mag_gate reads MAG's output gate")
        figures[label] = gate_figures(TitansLM(config), params, ids, last)
    return [{"layer": w["layer"], "gate_writes": w["mean"], "gate_held": h["mean"],
             "change": float(np.mean(np.abs(w["gate"] - h["gate"]))),
             "output_rms_writes": w["output_rms"], "output_rms_held": h["output_rms"]}
            for w, h in zip(figures["writes"], figures["held"])]


def report(rows: list[dict]) -> str:
    lines = ["| layer | gate, writes / held at M_0 | mean abs change | gated output rms, writes / held |",
             "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['layer']} | {row['gate_writes']:.3f} / {row['gate_held']:.3f} | {row['change']:.3f} | "
                     f"{row['output_rms_writes']:.3f} / {row['output_rms_held']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained MAG run (its newest good checkpoint)")
    parser.add_argument("--task", default="qa1")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--per-cell", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the first evaluation seed")
    parser.add_argument("--last", type=int, default=32, help="the prompt's last tokens the figures are over")
    args = parser.parse_args(argv)
    if args.per_cell < 1 or args.last < 1 or args.last > args.length:
        parser.error(f"--per-cell >= 1 and 1 <= --last <= --length, got {args.per_cell}, {args.last}")
    text = (f"{args.run}, {args.task} at {args.length:,} tokens, {args.per_cell} prompts, their last "
            f"{args.last} tokens\n\n" + report(compare(args.run, args.task, args.length, args.per_cell, args.seed,
                                                      args.last)))
    print(text)
    return text


if __name__ == "__main__":
    main()
