"""SVF on a Titans model: the Transformer² expert, mixing and two-pass machinery applied to a
trained titans_jax language model (beyond the paper), so that test-time memory and
self-adaptation combine.

    svd = t2_jax.compute_svd(params, RULES["mlp"])                # any titans_jax LM's params
    expert = train_titans_expert(config, model_config, params, svd, train_batch, out_dir, ...)
    adapted = t2_jax.compose(params, svd, expert, "released")    # W' rebuilt: the Flax model runs as is

An expert here is trained by next-token prediction on a corpus (the Titans LMs are not
instruction models: a language-modelling objective is their reward), through titans_jax's
run_loop like every other loop. `per_window_choice` is the two-pass adaptation for a language
model: the first pass scores a window's first `prefix` targets under each candidate (base and
experts), the second predicts the rest with the candidate whose prefix loss was lowest. A
causal model's predictions of the rest do not depend on how the prefix was scored, so the
second pass is read from the same forward (no leakage: the choice uses the prefix only).

RULES selects which matrices an expert rescales: the MLP kernels ("mlp", the released choice),
also every qkv / out projection including the memory's outer projections ("projections"), or
only the long-term memory's outer projections ("memory").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from titans_jax import training as loop_lib
from titans_jax.models import TitansLM
from t2_jax._svf import compose, fingerprint, init_expert, save_expert

RULES = {"mlp": r".*mlp/(gate|up|down)/kernel",
         "projections": r".*/(mlp/(gate|up|down)|[a-z_]+/(qkv|out))/kernel",
         "memory": r".*memory/(qkv|out)/kernel"}


@dataclasses.dataclass(frozen=True)
class TitansExpertConfig:
    name: str                        # e.g. "code"
    rule: str = "mlp"                # a key of RULES
    form: str = "released"
    steps: int = 60
    learning_rate: float = 2e-3
    clip_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {sorted(RULES)}, got {self.rule!r}")
        if self.steps <= 0 or not self.learning_rate > 0:
            raise ValueError("steps and learning_rate must be positive")


def nll_per_target(model: TitansLM, params, tokens) -> jax.Array:
    """Next-token NLL (nats) of every target of windows [B, T + 1]: [B, T]."""
    logits = model.apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
    targets = tokens[:, 1:]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@functools.lru_cache(maxsize=8)
def _expert_update(model_config, form: str, learning_rate: float, clip_norm: float):
    """(optimizer, jitted update step) of an SVF expert, shared by every expert trained in a
    process with the same model and settings (one compilation, not one per expert)."""
    model = TitansLM(model_config)
    optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))

    def loss_fn(expert, params, svd, tokens):
        return jnp.mean(nll_per_target(model, compose(params, svd, expert, form), tokens))

    @jax.jit
    def update(state, params, svd, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(state["expert"], params, svd, tokens)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["expert"])
        return ({"expert": optax.apply_updates(state["expert"], updates), "opt_state": opt_state,
                 "step": state["step"] + 1}, {"loss": loss, "grad_norm": optax.tree.norm(grads)})

    return optimizer, update


def train_titans_expert(config: TitansExpertConfig, model_config, params, svd, train_batch: Callable[[int], np.ndarray],
                        out_dir, *, eval_sets: dict | None = None, byte_lengths: np.ndarray | None = None,
                        progress: bool = False) -> dict:
    """Train (or resume) an SVF expert of a Titans LM by next-token prediction on train_batch(step)
    windows [B, T + 1]; the expert is saved to out_dir/expert.safetensors with its metadata.
    eval_sets {name: () -> batches} are scored (bits per byte with byte_lengths) at the end."""
    model = TitansLM(model_config)
    out_dir = pathlib.Path(out_dir)
    optimizer, update = _expert_update(model_config, config.form, config.learning_rate, config.clip_norm)
    key = jax.random.key(config.seed)
    base_fp = fingerprint(params)

    def fresh():
        expert = init_expert(svd, config.form, key)
        return {"expert": expert, "opt_state": optimizer.init(expert), "step": jnp.zeros((), jnp.int32)}

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                            jax.eval_shape(fresh))

    eval_fn = loop_lib.make_eval_fn(model)

    def evaluate(state, _step):
        adapted = compose(params, svd, state["expert"], config.form)
        return {name: loop_lib.evaluate(eval_fn, adapted, batches(), byte_lengths)
                for name, batches in (eval_sets or {}).items()}

    def finish(state):
        path = save_expert(out_dir / "expert.safetensors", state["expert"], base_fingerprint=base_fp,
                           rule=RULES[config.rule], form=config.form,
                           extra={"name": config.name, "model": "titans_jax", "steps": config.steps})
        return {"expert": str(path)}

    first = np.asarray(train_batch(0))
    spec = loop_lib.LoopSpec(
        abstract_state=abstract, init=fresh, step=lambda state, i: update(state, params, svd, jnp.asarray(train_batch(i))),
        identity={"base_fingerprint": base_fp, "name": config.name, "rule": config.rule, "form": config.form,
                  "seed": config.seed},
        settings={"optim": {"learning_rate": config.learning_rate, "clip_norm": config.clip_norm},
                  "total_steps": config.steps, "batch_size": int(first.shape[0])},
        evaluate=evaluate, eval_names=tuple(eval_sets or {}), items_per_step=int(first.shape[0] * (first.shape[1] - 1)),
        finish=finish)
    loop = loop_lib.LoopConfig(steps=config.steps, log_every=5, eval_every=config.eval_every,
                               save_every=max(1, config.steps // 2), progress=progress)
    return loop_lib.run_loop(spec, loop, out_dir, run_record={"config": dataclasses.asdict(config),
                                                             "base_fingerprint": base_fp})


def per_window_choice(model: TitansLM, candidates: dict, batches, prefix: int,
                      byte_lengths: np.ndarray | None = None) -> dict:
    """Two passes per window: choose the candidate ({name: params}) with the lowest NLL on the first
    `prefix` targets, predict the remaining targets with it. Returns bits per byte (per target
    without byte_lengths) of the remaining targets for each fixed candidate, the adaptive choice
    and the oracle (the best candidate per window, in hindsight), and how often each was chosen."""
    names = list(candidates)
    if not names:
        raise ValueError("per_window_choice needs at least one candidate")
    score = jax.jit(lambda p, tokens: nll_per_target(model, p, tokens))
    totals = {name: 0.0 for name in names + ["adaptive", "oracle"]}
    chosen = {name: 0 for name in names}
    units = 0.0
    for batch in batches:
        tokens, mask = (batch.tokens, batch.mask) if hasattr(batch, "tokens") else batch
        tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
        if prefix >= tokens.shape[1] - 1:
            raise ValueError(f"prefix {prefix} leaves no target in windows of {tokens.shape[1] - 1}")
        nll = np.stack([np.asarray(score(candidates[n], jnp.asarray(tokens))) for n in names])  # [C, B, T]
        first, rest = mask.copy(), mask.copy()
        first[:, prefix:] = False
        rest[:, :prefix] = False
        weights = (byte_lengths[tokens[:, 1:]] if byte_lengths is not None else np.ones(mask.shape)) * rest
        keep = rest.any(1) & first.any(1)
        prefix_loss = (nll * first).sum(-1)                     # [C, B]
        rest_loss = (nll * rest).sum(-1)                        # [C, B]
        pick = np.argmin(prefix_loss, 0)
        for c, name in enumerate(names):
            totals[name] += float(rest_loss[c][keep].sum())
            chosen[name] += int(np.sum((pick == c) & keep))
        totals["adaptive"] += float(rest_loss[pick, np.arange(len(pick))][keep].sum())
        totals["oracle"] += float(rest_loss.min(0)[keep].sum())
        units += float(weights[keep].sum())
    if units == 0:
        raise ValueError("no window had targets after the prefix")
    scale = 1 / (units * math.log(2))
    return {"bits": {name: total * scale for name, total in totals.items()}, "chosen": chosen,
            "unit": "bits per byte" if byte_lengths is not None else "bits per target", "prefix": prefix}
