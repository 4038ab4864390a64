"""Training Transformer² experts: SVF vectors by REINFORCE, and the LoRA baseline by next-token
prediction, on one device, through titans_jax's model-agnostic loop (orbax checkpoints that
resume exactly, metrics.jsonl / TensorBoard, progress bar, signals).

REINFORCE (Transformer² §3.1, the released settings of docs/t2.md §2 as defaults):

    loss = -(1/B) sum_b r_b log pi(y_b | x_b)  +  kl_coef * (1/B) sum_b KL(pi(.|x_b) || pi_base(.|x_b))

  multiple choice ("option policy", t2_jax._options): pi is the softmax over the options'
    normalised log-likelihoods under the adapted model; y_b ~ pi is sampled; r = +1 if y_b is
    the gold option, else -1. The KL over the options is exact.
  numeric / code: y_b is a rollout of the adapted model (greedy by default, as released), scored
    by the log-probabilities of the generated ids themselves (never re-tokenised text, the
    released code's misalignment); log pi(y|x) = sum of its token log-probs; r from
    numeric_reward / code_reward (+1 / -1). The KL term is the exact next-token KL summed over
    the rollout's positions.
  The KL direction is KL(adapted || base), the paper's notation (the released code computes the
  reverse, KL(base || adapted)).
  Adam (lr 2e-3) after a global gradient-norm clip (1e-3); one rollout per prompt; no baseline.

Selection: the validation pool is scored at step 0 and every `validate_every` steps (accuracy of
the model's answer; ties broken by the mean log pi(gold) for choice tasks); the state keeps the
best expert so far (strictly better replaces it) and that is what is saved and tested.

LoRA (rank 16, alpha 32, on the q and v projections by default): W' = W + (alpha / rank) A B
with A ~ N(0, 1/in), B = 0, trained on the gold continuation (the gold option; the worked
solution or reference code of numeric / code examples) by next-token prediction. No dropout:
the adapted kernels are composed, as SVF's are.

Every step is a pure function of (state, step): its questions come from a seeded permutation
of the training pool per epoch and its sampling key is fold_in(seed, step), so an interrupted
run resumes to the same result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from titans_jax import training as loop_lib
from t2_jax import _options
from t2_jax._config import LlamaConfig
from t2_jax._generate import _continuation_logprobs, generate
from t2_jax._model import Params
from t2_jax._rewards import code_reward, numeric_reward
from t2_jax._svf import (ATTENTION_QV_RULE, DEFAULT_RULE, ExpertMismatchError, factorise, fingerprint,
                         get_form, init_expert, save_expert, select_paths, flatten_paths, unflatten_paths)

METHODS = ("svf", "lora")
LORA_FORMAT = "t2_jax.lora_adapter"


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """One expert-training run. The defaults are the released Transformer² settings where they
    exist (lr, clip, KL 0, greedy rollouts, form, MLP-only rule, LoRA rank/alpha/targets)."""

    task: str
    method: str = "svf"
    seed: int = 0                   # expert initialisation, sampled options, batch order
    pool_seed: int = 0              # which questions go to train / validation / test
    train_size: int = 200
    validation_size: int = 100
    test_size: int = 400
    steps: int = 24
    batch_size: int = 8             # prompts per step, one rollout each
    learning_rate: float = 2e-3
    clip_norm: float = 1e-3
    validate_every: int = 8
    kl_coef: float = 0.0
    normalisation: str = "token"    # option scores: per-token mean log-likelihood
    form: str = "released"          # SVF form (t2_jax._svf.FORMS)
    rule: str = DEFAULT_RULE        # SVF: which kernels (MLP gate/up/down)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_rule: str = ATTENTION_QV_RULE
    eval_batch: int = 16
    max_new_tokens: int = 256       # numeric / code rollouts
    temperature: float = 0.0        # 0: greedy rollouts (released)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.normalisation not in _options.NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {_options.NORMALISATIONS}, got {self.normalisation!r}")
        for name in ("train_size", "validation_size", "test_size", "steps", "batch_size", "validate_every",
                     "eval_batch", "lora_rank", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ExpertConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ExpertConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.kl_coef < 0 or self.temperature < 0:
            raise ValueError("kl_coef and temperature must be >= 0")
        if self.batch_size > self.train_size:
            raise ValueError(f"batch_size {self.batch_size} exceeds train_size {self.train_size}")
        get_form(self.form)

    @property
    def selection(self) -> str:
        return (f"best validation accuracy (ties: mean log pi(gold)) over steps 0, {self.validate_every}, "
                f"{2 * self.validate_every}, ... and the last; the earliest wins a tie")


# ---- adapters: SVF and LoRA as functions trainable -> adapted params ------------------------------


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How a trainable pytree adapts the base parameters (svf: an expert; lora: A, B per kernel)."""

    method: str
    init: Callable[[jax.Array], Any]                  # key -> trainable
    adapt: Callable[[Params, Any, Any], Params]        # (params, constants, trainable) -> params
    constants: Any                                    # SVD factors (svf) or nothing (lora)
    rule: str
    form: str | None


def lora_init(params: Params, rule: str, rank: int, key: jax.Array) -> dict:
    """{path with '__' for '/': {"a": (L, in, rank) ~ N(0, 1/in), "b": (L, rank, out) = 0}}."""
    flat = flatten_paths(params)
    paths = select_paths(params, rule)
    trainable = {}
    for i, path in enumerate(paths):
        *lead, fan_in, fan_out = np.shape(flat[path])
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, fan_in, rank), jnp.float32) / math.sqrt(fan_in)
        trainable[path.replace("/", "__")] = {"a": a, "b": jnp.zeros((*lead, rank, fan_out), jnp.float32)}
    return trainable


def lora_adapt(params: Params, scale: float, trainable: dict) -> Params:
    """params with each selected kernel W replaced by W + scale * A @ B (the base is constant)."""
    flat = {p: jax.lax.stop_gradient(leaf) for p, leaf in flatten_paths(params).items()}
    for key, ab in trainable.items():
        path = key.replace("__", "/")
        if path not in flat:
            raise ExpertMismatchError(f"LoRA adapter targets {path}, which the base model does not have")
        flat[path] = (flat[path] + scale * (ab["a"] @ ab["b"])).astype(flat[path].dtype)
    return unflatten_paths(flat)


def make_adapter(params: Params, config: ExpertConfig, svd_factors=None) -> Adapter:
    if config.method == "svf":
        from t2_jax._svf import svd_cached

        factors = svd_factors if svd_factors is not None else svd_cached(params, config.rule)
        form = config.form
        return Adapter("svf", lambda key: init_expert(factors, form, key),
                       lambda p, svd, expert: factorise(p, svd, expert, form), factors, config.rule, form)
    scale = config.lora_alpha / config.lora_rank
    rule, rank = config.lora_rule, config.lora_rank
    return Adapter("lora", lambda key: lora_init(params, rule, rank, key),
                   lambda p, _, trainable: lora_adapt(p, scale, trainable), {}, rule, None)


def trainable_count(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


# ---- the objectives -----------------------------------------------------------------------------


def _choice_arrays(batch: _options.ChoiceBatch) -> dict:
    return {name: jnp.asarray(getattr(batch, name)) for name in
            ("prompt", "prompt_mask", "options", "option_mask", "valid", "chars", "gold")}


def _scores(params, model_config, arrays, normalisation):
    loglik = _options.option_loglik(params, model_config, arrays["prompt"], arrays["prompt_mask"],
                                    arrays["options"], arrays["option_mask"])
    return _options.normalise(loglik, arrays["option_mask"], arrays["valid"], arrays["chars"], normalisation)


def option_reinforce(logpi: jax.Array, gold: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """REINFORCE on the option policy: sample a ~ pi (B,), r = +1 if a == gold else -1, loss =
    -mean(r log pi(a)). Its gradient is an unbiased estimate of -grad E[r]. Returns (loss, r)."""
    action = jax.random.categorical(key, jax.lax.stop_gradient(logpi), axis=-1)
    reward = jnp.where(action == gold, 1.0, -1.0)
    chosen = jnp.take_along_axis(logpi, action[:, None], axis=-1)[:, 0]
    return -jnp.mean(reward * chosen), reward


def reinforce_choice_loss(trainable, params, constants, arrays, key, *, adapt, model_config,
                          normalisation, kl_coef, base_logpi=None):
    """The option-policy REINFORCE loss of one batch (see the module docstring) and its metrics."""
    adapted = adapt(params, constants, trainable)
    logpi = _options.option_policy(_scores(adapted, model_config, arrays, normalisation))
    loss, reward = option_reinforce(logpi, arrays["gold"], key)
    metrics = {"reward": jnp.mean(reward),
               "accuracy": jnp.mean(jnp.argmax(logpi, -1) == arrays["gold"]),
               "logpi_gold": jnp.mean(jnp.take_along_axis(logpi, arrays["gold"][:, None], -1)[:, 0])}
    if kl_coef:
        valid = arrays["valid"]  # empty slots hold -inf: keep them out of the difference (and its gradient)
        difference = jnp.where(valid, logpi, 0.0) - jnp.where(valid, base_logpi, 0.0)
        kl = jnp.sum(jnp.exp(logpi) * difference, axis=-1)
        loss = loss + kl_coef * jnp.mean(kl)
        metrics["kl"] = jnp.mean(kl)
    return loss, metrics


def reinforce_sequence_loss(trainable, params, constants, prompt, prompt_mask, rollout, rollout_mask, reward,
                            *, adapt, model_config, kl_coef, base_params=None):
    """-(1/B) sum_b r_b sum_t log pi(y_bt | x_b, y_b<t) over generated ids (+ exact per-token KL)."""
    adapted = adapt(params, constants, trainable)
    if not kl_coef:
        logprobs = _continuation_logprobs(adapted, model_config, prompt, prompt_mask, rollout, rollout_mask)
        return -jnp.mean(reward * jnp.sum(logprobs, -1)), {}
    full = _sequence_logsoftmax(adapted, model_config, prompt, prompt_mask, rollout, rollout_mask)
    base = jax.lax.stop_gradient(_sequence_logsoftmax(base_params, model_config, prompt, prompt_mask, rollout,
                                                      rollout_mask))
    picked = jnp.take_along_axis(full, rollout[..., None], -1)[..., 0]
    seq = jnp.sum(jnp.where(rollout_mask.astype(bool), picked, 0.0), -1)
    kl_tok = jnp.sum(jnp.exp(full) * (full - base), -1)
    kl = jnp.sum(jnp.where(rollout_mask.astype(bool), kl_tok, 0.0), -1)
    return -jnp.mean(reward * seq) + kl_coef * jnp.mean(kl), {"kl": jnp.mean(kl)}


def _sequence_logsoftmax(params, model_config, prompt, prompt_mask, continuation, continuation_mask):
    from t2_jax._model import apply

    T = prompt.shape[1]
    tokens = jnp.concatenate([prompt, continuation], axis=1)
    mask = jnp.concatenate([prompt_mask, continuation_mask], axis=1)
    logits, _ = apply(params, model_config, tokens, attention_mask=mask)
    return jax.nn.log_softmax(logits[:, T - 1:-1], axis=-1)


def lora_choice_loss(trainable, params, constants, arrays, key, *, adapt, model_config, **_):
    """Next-token NLL of the gold option (mean over its tokens, over the batch)."""
    del key
    adapted = adapt(params, constants, trainable)
    gold = arrays["gold"][:, None, None]
    options = jnp.take_along_axis(arrays["options"], gold, axis=1)
    option_mask = jnp.take_along_axis(arrays["option_mask"], gold, axis=1)
    loglik = _options.option_loglik(adapted, model_config, arrays["prompt"], arrays["prompt_mask"], options,
                                    option_mask)[:, 0]
    tokens = jnp.sum(option_mask[:, 0], -1)
    return -jnp.sum(loglik) / jnp.sum(tokens), {}


def lora_sequence_loss(trainable, params, constants, prompt, prompt_mask, target, target_mask, *, adapt,
                       model_config):
    adapted = adapt(params, constants, trainable)
    logprobs = _continuation_logprobs(adapted, model_config, prompt, prompt_mask, target, target_mask)
    return -jnp.sum(logprobs) / jnp.maximum(jnp.sum(target_mask), 1), {}


# ---- evaluation ---------------------------------------------------------------------------------


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of a binomial proportion."""
    if total <= 0:
        raise ValueError("wilson_interval needs at least one trial")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass
class Evaluator:
    """Scores a pool under (possibly adapted) parameters: accuracy and mean log pi(gold) for
    choice tasks (one jitted forward per `eval_batch` questions, compiled shapes shared); exact
    answers (numeric) or passed tests (code) of greedy generations otherwise."""

    model_config: LlamaConfig
    tokenizer: Any
    examples: Sequence
    eval_batch: int
    normalisation: str = "token"
    max_new_tokens: int = 256
    num_options: int | None = None
    _encoded: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.examples:
            raise ValueError("an empty evaluation pool")
        self.kind = self.examples[0].kind
        if self.kind == "choice":
            n = self.num_options or max(len(e.choices) for e in self.examples)
            for start in range(0, len(self.examples), self.eval_batch):
                chunk = list(self.examples[start:start + self.eval_batch])
                real = len(chunk)
                chunk += [chunk[0]] * (self.eval_batch - real)  # every batch eval_batch rows (lengths bucketed)
                self._encoded.append((_options.encode_choices(self.tokenizer, chunk, num_options=n,
                                                              pad_id=_pad(self.tokenizer)), real))

    def __call__(self, params: Params) -> dict:
        start = time.perf_counter()
        if self.kind == "choice":
            hits, logpi_gold = [], 0.0
            for batch, real in self._encoded:
                logpi = np.asarray(_options.option_policy(_options.option_scores(
                    params, self.model_config, batch, self.normalisation)))[:real]
                gold = batch.gold[:real]
                hits += (np.argmax(logpi, -1) == gold).astype(int).tolist()
                logpi_gold += float(np.sum(logpi[np.arange(real), gold]))
            extra = {"logpi_gold": logpi_gold / len(hits)}
            batches = len(self._encoded)
        else:
            rewards = generate_and_reward(params, self.model_config, self.tokenizer, self.examples,
                                          self.eval_batch, self.max_new_tokens)[0]
            hits, extra = (rewards > 0).astype(int).tolist(), {}
            batches = -(-len(hits) // self.eval_batch)
        seconds = time.perf_counter() - start
        correct = int(sum(hits))
        low, high = wilson_interval(correct, len(hits))
        return {"accuracy": correct / len(hits), "correct": correct, "count": len(hits), **extra,
                "ci_low": low, "ci_high": high, "seconds": seconds, "seconds_per_batch": seconds / batches,
                "per_question": hits}


def _pad(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return 0 if pad is None else int(pad)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    T = max(multiple, -(-max(map(len, rows)) // multiple) * multiple)
    tokens = np.full((len(rows), T), pad_id, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, row in enumerate(rows):
        tokens[i, T - len(row):] = row
        mask[i, T - len(row):] = 1
    return tokens, mask


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    C = max(multiple, -(-max(map(len, rows)) // multiple) * multiple)
    tokens = np.full((len(rows), C), pad_id, np.int32)
    mask = np.zeros((len(rows), C), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return tokens, mask


def reward_of(example, answer: str) -> float:
    """+1 / -1 for a generated answer to a numeric or code example."""
    if example.kind == "numeric":
        return 1.0 if numeric_reward(answer, example.answer) > 0 else -1.0
    if example.kind == "code":
        return 1.0 if code_reward(answer, example.tests, example.prefix) > 0 else -1.0
    raise ValueError(f"no generative reward for a {example.kind!r} example")


def generate_and_reward(params, model_config, tokenizer, examples, batch_size, max_new_tokens,
                        temperature=0.0, key=None):
    """Greedy (or sampled) answers to numeric / code examples and their +1 / -1 rewards.
    Returns (rewards (n,), rollouts [(prompt ids, mask, tokens, token mask)] per batch, seconds)."""
    stops = tokenizer.chat_stop_ids() if hasattr(tokenizer, "chat_stop_ids") else ()
    rewards, rollouts, start = [], [], time.perf_counter()
    for begin in range(0, len(examples), batch_size):
        chunk = examples[begin:begin + batch_size]
        prompt, mask = _left_pad([tokenizer.encode(e.prompt) for e in chunk], _pad(tokenizer))
        out = generate(params, model_config, prompt, mask, max_new_tokens=max_new_tokens,
                       key=None if key is None else jax.random.fold_in(key, begin),
                       temperature=temperature, stop_tokens=stops, pad_id=_pad(tokenizer))
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for i, example in enumerate(chunk):
            text = tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True)
            rewards.append(reward_of(example, text))
        rollouts.append((prompt, mask, tokens, np.asarray(out.mask)))
    return np.asarray(rewards, np.float32), rollouts, time.perf_counter() - start


# ---- the run --------------------------------------------------------------------------------------


def make_optimizer(config: ExpertConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adam(config.learning_rate))


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The training questions of `step`: consecutive slices of a seeded permutation per epoch
    (a batch that crosses an epoch boundary takes the rest from the next permutation)."""
    first = step * batch_size
    out = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, num_examples)
        order = np.random.default_rng([seed, epoch, 0x7E2]).permutation(num_examples)
        out.append(order[offset])
    return np.asarray(out)


def pools_for(config: ExpertConfig, examples: Sequence) -> dict[str, list]:
    from t2_jax._tasks import split_pools

    return split_pools(examples, config.pool_seed, {"train": config.train_size,
                                                    "validation": config.validation_size,
                                                    "test": config.test_size})


def train_expert(config: ExpertConfig, params: Params, model_config: LlamaConfig, tokenizer, out_dir,
                 *, examples: Sequence | None = None, base_name: str = "", progress: bool = True,
                 svd_factors=None, allow_changes: bool = False, test: bool = True) -> dict:
    """Train (or resume) one expert in out_dir; returns the loop's summary with the validation and
    test scores of the selected expert. The selected expert (svf) or adapter (lora) is written to
    out_dir/expert.safetensors with its metadata. examples: the task's examples (default
    t2_jax.load_task(config.task))."""
    from t2_jax._tasks import load_task

    out_dir = pathlib.Path(out_dir)
    examples = list(examples) if examples is not None else load_task(config.task, seed=config.pool_seed)
    pools = pools_for(config, examples)
    kind = pools["train"][0].kind
    if kind not in ("choice", "numeric", "code"):
        raise ValueError(f"unknown task kind {kind!r}")
    base_fp = fingerprint(params)
    adapter = make_adapter(params, config, svd_factors)
    optimizer = make_optimizer(config)
    num_options = max(len(e.choices) for e in examples) if kind == "choice" else None
    validator = Evaluator(model_config, tokenizer, pools["validation"], config.eval_batch, config.normalisation,
                          config.max_new_tokens, num_options)
    key = jax.random.key(config.seed)

    def adapted(trainable):
        return adapter.adapt(params, adapter.constants, trainable)

    def validate(trainable) -> tuple[float, float]:
        result = validator(adapted(trainable))
        return result["accuracy"], result.get("logpi_gold", 0.0)

    def fresh():
        trainable = adapter.init(jax.random.fold_in(key, 0x1A1))
        return {"trainable": trainable, "opt_state": optimizer.init(trainable), "step": jnp.zeros((), jnp.int32),
                "best": trainable, "best_score": jnp.zeros((2,), jnp.float32), "best_step": jnp.zeros((), jnp.int32)}

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                            jax.eval_shape(fresh))

    def init():
        state = fresh()
        return dict(state, best_score=jnp.asarray(validate(state["trainable"]), jnp.float32))

    statics = {"adapt": adapter.adapt, "model_config": model_config}
    if kind == "choice":
        loss_fn = (functools.partial(reinforce_choice_loss, normalisation=config.normalisation,
                                     kl_coef=config.kl_coef, **statics)
                   if config.method == "svf" else functools.partial(lora_choice_loss, **statics))
    else:
        loss_fn = (functools.partial(reinforce_sequence_loss, kl_coef=config.kl_coef, **statics)
                   if config.method == "svf" else functools.partial(lora_sequence_loss, **statics))
    update = _update_program(loss_fn, optimizer)
    base_scores = jax.jit(functools.partial(_scores, model_config=model_config,
                                            normalisation=config.normalisation))

    def step(state, i):
        chosen = [pools["train"][j] for j in batch_indices(len(pools["train"]), config.batch_size, config.seed, i)]
        step_key = jax.random.fold_in(key, i)
        clock = time.perf_counter()
        extra = {}
        if kind == "choice":
            arrays = _choice_arrays(_options.encode_choices(tokenizer, chosen, num_options=num_options,
                                                            pad_id=_pad(tokenizer)))
            kwargs = {}
            if config.method == "svf" and config.kl_coef:
                kwargs["base_logpi"] = _options.option_policy(base_scores(params, arrays=arrays))
            args = (arrays, step_key)
        elif config.method == "svf":
            rewards, rollouts, seconds = generate_and_reward(
                adapted(state["trainable"]), model_config, tokenizer, chosen, config.batch_size,
                config.max_new_tokens, config.temperature, step_key if config.temperature else None)
            prompt, mask, tokens, token_mask = rollouts[0]
            args = (jnp.asarray(prompt), jnp.asarray(mask), jnp.asarray(tokens), jnp.asarray(token_mask),
                    jnp.asarray(rewards))
            kwargs = {"base_params": params} if config.kl_coef else {}
            extra = {"reward": float(np.mean(rewards)), "rollout_s": seconds}
        else:
            prompt, mask = _left_pad([tokenizer.encode(e.prompt) for e in chosen], _pad(tokenizer))
            target, target_mask = _right_pad([tokenizer.encode(e.target) for e in chosen], _pad(tokenizer))
            args = tuple(map(jnp.asarray, (prompt, mask, target, target_mask)))
            kwargs = {}
        trainable, opt_state, loss, metrics, grad_norm = jax.block_until_ready(update(
            state["trainable"], state["opt_state"], params, adapter.constants, args, kwargs))
        metrics = dict(metrics, **extra, loss=loss, grad_norm=grad_norm,
                       step_s=time.perf_counter() - clock)  # rollouts + update, validation excluded
        state = dict(state, trainable=trainable, opt_state=opt_state, step=state["step"] + 1)
        done = i + 1
        if done % config.validate_every == 0 or done == config.steps:
            accuracy, tie = validate(trainable)
            metrics.update(validation_accuracy=accuracy, validation_logpi_gold=tie)
            best = tuple(np.asarray(state["best_score"]).tolist())
            if (accuracy, tie) > best:
                state.update(best=trainable, best_score=jnp.asarray([accuracy, tie], jnp.float32),
                             best_step=jnp.asarray(done, jnp.int32))
        return state, metrics

    def evaluate(state, _step):
        best = adapted(state["best"])
        results = {"validation": validator(best)}
        if test:
            tester = Evaluator(model_config, tokenizer, pools["test"], config.eval_batch, config.normalisation,
                               config.max_new_tokens, num_options)
            results["test"] = tester(best)
        results["selected"] = {"step": int(state["best_step"])}
        return results

    metadata = {"task": config.task, "method": config.method, "seed": config.seed, "pool_seed": config.pool_seed,
                "base": base_name, "selection": config.selection, "steps": config.steps}
    if config.method == "lora":  # what apply_lora needs besides the factors
        metadata.update(lora_scale=config.lora_alpha / config.lora_rank, lora_alpha=config.lora_alpha)

    def finish(state):
        path = save_adapter(out_dir / "expert.safetensors", state["best"], adapter, base_fingerprint=base_fp,
                            extra=dict(metadata, selected_step=int(state["best_step"]),
                                       validation_accuracy=float(state["best_score"][0])))
        return {"expert": str(path), "trainable_parameters": trainable_count(state["best"]),
                "selected_step": int(state["best_step"])}

    identity = {"base_fingerprint": base_fp, "task": config.task, "method": config.method, "seed": config.seed,
                "pool_seed": config.pool_seed, "train_size": config.train_size,
                "validation_size": config.validation_size, "test_size": config.test_size,
                "rule": adapter.rule, "form": adapter.form or "", "normalisation": config.normalisation,
                "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha}
    settings = {"optim": {"learning_rate": config.learning_rate, "clip_norm": config.clip_norm,
                          "kl_coef": config.kl_coef, "validate_every": config.validate_every},
                "total_steps": config.steps, "batch_size": config.batch_size}
    spec = loop_lib.LoopSpec(abstract_state=abstract, init=init, step=step, identity=identity, settings=settings,
                             evaluate=evaluate, eval_names=("validation", "test", "selected") if test
                             else ("validation", "selected"),
                             items_per_step=config.batch_size, throughput_name="prompts_per_s", finish=finish)
    loop = loop_lib.LoopConfig(steps=config.steps, log_every=1, eval_every=0, save_every=config.validate_every,
                               keep_checkpoints=2, progress=progress)
    record = {"config": dataclasses.asdict(config), "base": base_name, "base_fingerprint": base_fp,
              "trainable_parameters": trainable_count(abstract["trainable"]),
              "pools": {name: [e.id for e in pool] for name, pool in pools.items()}}
    return loop_lib.run_loop(spec, loop, out_dir, run_record=record, allow_changes=allow_changes)


def _update_program(loss_fn, optimizer):
    """One jitted update: (trainable, opt_state, params, constants, args, kwargs) -> (trainable,
    opt_state, loss, metrics, grad_norm). params and constants are arguments, never captured:
    a 135M-parameter base embedded as constants would be compiled into the program."""

    @jax.jit
    def update(trainable, opt_state, params, constants, args, kwargs):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, params, constants, *args,
                                                                         **kwargs)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, metrics, optax.tree.norm(grads)

    return update


# ---- saving adapters ------------------------------------------------------------------------------


def save_adapter(path, trainable, adapter: Adapter, *, base_fingerprint: str, extra: dict) -> pathlib.Path:
    """An SVF expert (t2_jax.save_expert's format) or a LoRA adapter, with its metadata."""
    extra = {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in extra.items()}
    if adapter.method == "svf":
        return save_expert(path, trainable, base_fingerprint=base_fingerprint, rule=adapter.rule,
                           form=adapter.form, extra=extra)
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": LORA_FORMAT, "base_fingerprint": base_fingerprint, "rule": adapter.rule, **extra}
    tensors = {f"{key}::{part}": np.ascontiguousarray(np.asarray(value, np.float32))
               for key, ab in trainable.items() for part, value in ab.items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def apply_lora(params: Params, path, *, scale: float | None = None, allow_other_base: bool = False) -> Params:
    """The base with a saved LoRA adapter applied: every selected kernel W + scale * A @ B.
    scale: alpha / rank, read from the adapter's metadata (files saved before it was recorded
    need it given)."""
    trainable, metadata = load_lora(path, params, allow_other_base=allow_other_base)
    if scale is None:
        if "lora_scale" not in metadata:
            raise ValueError(f"{path} does not record its scale alpha / rank (saved before the scale was recorded): "
                             "pass scale= (the ExpertConfig default is 32 / 16 = 2.0)")
        scale = float(metadata["lora_scale"])
    return lora_adapt(params, scale, trainable)


def load_lora(path, params: Params, *, allow_other_base: bool = False) -> tuple[dict, dict]:
    """A LoRA adapter and its metadata; refused (ExpertMismatchError) on another base model."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter file {path} not found")
    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        flat = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}
    if metadata.get("format") != LORA_FORMAT:
        raise ValueError(f"{path} is not a t2_jax LoRA adapter (metadata format {metadata.get('format')!r})")
    if metadata.get("base_fingerprint") != fingerprint(params) and not allow_other_base:
        raise ExpertMismatchError(f"adapter {path} was trained on base model "
                                  f"{str(metadata.get('base_fingerprint'))[:16]}…, not this one (pass "
                                  "allow_other_base=True to override)")
    trainable: dict = {}
    for name, value in flat.items():
        key, part = name.split("::")
        trainable.setdefault(key, {})[part] = value
    return trainable, metadata
