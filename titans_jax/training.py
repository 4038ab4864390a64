"""Training language models: optax AdamW with warmup + cosine, one jitted step, orbax
checkpoints that resume exactly, metrics to JSONL and TensorBoard, evaluation in bits per byte.

The trainer does not know where batches come from: it takes `train_batch(step) -> [B, T + 1]`
token ids, a pure function of the step (titans_jax.data.pipeline.WindowDataset.batch is one), so
the data position is the step and a resumed run reads exactly the batches an uninterrupted run
would have read. Everything that determines the continuation — parameters, optimiser state,
step, the data seed, the model and tokenizer fingerprints — is in the checkpoint.

Checkpoints (orbax CheckpointManager, async, keep the last N):
  - saved every `save_every` steps, at the end, and when SIGTERM / SIGINT arrive (the signal
    sets a flag; the loop saves after the current step and returns);
  - every save records a sha256 of the parameters' bytes; on resume the newest step that
    restores *and* matches its digest wins, and each skipped one is reported with a warning
    (orbax itself raises on most damage, but a damaged or empty step still counts as its
    latest_step, and bit flips can restore silently);
  - a checkpoint of another model config, tokenizer or data seed is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import signal
import time
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from titans_jax.models import ModelConfig, TitansLM, init_params

Array = jax.Array
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip_norm: float = 1.0
    compute_dtype: str = "float32"  # "bfloat16": activations in bf16, parameters and optimiser in f32

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay; global-norm clipping; no decay on vectors
    (norm scales, biases, gates' biases) — only matrices and embeddings are decayed."""
    if total_steps <= config.warmup_steps:
        raise ValueError(f"total steps ({total_steps}) must exceed warmup_steps ({config.warmup_steps})")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=total_steps, end_value=config.learning_rate * config.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda leaf: leaf.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay, mask=decay_mask),
    )


def init_train_state(model_config: ModelConfig, optimizer: optax.GradientTransformation, seed: int) -> dict:
    params = init_params(model_config, jax.random.PRNGKey(seed))
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def next_token_nll(model: TitansLM, params, tokens: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """(summed NLL in nats, number of predicted tokens) for windows [B, T + 1]; `mask` [B, T]
    marks the real targets (padding of the last evaluation window is excluded)."""
    logits = model.apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
    targets = tokens[:, 1:]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if mask is None:
        return jnp.sum(nll), jnp.asarray(targets.size, jnp.float32)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def make_train_step(model: TitansLM, optimizer: optax.GradientTransformation):
    """One jitted step: loss, gradients, clipping, AdamW; returns (state, metrics)."""

    def loss_fn(params, tokens):
        total, count = next_token_nll(model, params, tokens)
        return total / count

    @jax.jit
    def step(state: dict, tokens: Array):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], tokens)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def make_eval_fn(model: TitansLM):
    return jax.jit(lambda params, tokens, mask: next_token_nll(model, params, tokens, mask))


def evaluate(eval_fn, params, batches: Iterable, byte_lengths: np.ndarray | None = None) -> dict:
    """NLL (nats per token), bits per token and, given the UTF-8 byte length of every token id,
    bits per byte over evaluation batches: (tokens [B, T + 1], mask [B, T]) pairs or plain
    token arrays (all targets real)."""
    total, count, num_bytes = 0.0, 0.0, 0
    for item in batches:
        tokens, mask = (item, np.ones((item.shape[0], item.shape[1] - 1), bool)) if isinstance(item, np.ndarray) else item
        nll, n = eval_fn(params, jnp.asarray(tokens), jnp.asarray(mask))
        total += float(nll)
        count += float(n)
        if byte_lengths is not None:
            num_bytes += int((byte_lengths[np.asarray(tokens)[:, 1:]] * np.asarray(mask)).sum())
    if count == 0:
        raise ValueError("evaluation got no windows")
    result = {"nll": total / count, "bits_per_token": total / count / LN2, "tokens": count}
    if byte_lengths is not None:
        result.update(bits_per_byte=total / num_bytes / LN2, bytes=num_bytes)
    return result


@functools.lru_cache(maxsize=8)
def _programs(model_config: ModelConfig, optim_config: OptimConfig, total_steps: int):
    """(model, optimizer, jitted step, jitted eval) — cached, so that several runs of one
    configuration in a process (a resumed run, tests) reuse the compiled programs."""
    model = TitansLM(model_config)
    optimizer = make_optimizer(optim_config, total_steps)
    return model, optimizer, make_train_step(model, optimizer), make_eval_fn(model)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def params_digest(params) -> str:
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()


class Checkpointer:
    """orbax CheckpointManager with verification on restore and fallback to older steps."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: dict, meta: dict) -> None:
        meta = dict(meta, step=int(step), params_sha256=params_digest(state["params"]))
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state), meta=self._ocp.args.JsonSave(meta))
        self.manager.save(int(step), args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: dict, expect: dict) -> tuple[dict, dict] | None:
        """The newest checkpoint that restores and verifies, or None if there is none. `expect`
        holds metadata that must match (model config, tokenizer, data seed)."""
        for step in reversed(self.steps()):
            ocp = self._ocp
            try:  # the metadata first: a checkpoint of another run is refused, never "repaired"
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as error:  # noqa: BLE001 - unreadable metadata: damaged
                meta, damage = None, error
            if meta is not None:
                for key, value in expect.items():
                    if meta.get(key) != value:
                        raise ValueError(f"checkpoint step {step} in {self.directory} was written with {key}="
                                         f"{meta.get(key)!r}, this run has {value!r}; use another checkpoint directory")
                try:
                    state = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state)))["state"]
                    if params_digest(state["params"]) != meta.get("params_sha256"):
                        raise ValueError("parameter digest does not match the one recorded at save time")
                    return state, meta
                except Exception as error:  # noqa: BLE001 - any damage: warn, set aside, fall back
                    damage = error
            aside = self._set_aside(step)
            warnings.warn(f"checkpoint step {step} in {self.directory} is damaged ({type(damage).__name__}: "
                          f"{str(damage)[:200]}); moved to {aside}, falling back to the previous one",
                          RuntimeWarning, stacklevel=2)
        return None

    def _set_aside(self, step: int) -> pathlib.Path:
        """Move a damaged step out of the manager's view (kept for inspection, never deleted)."""
        source = self.directory / str(step)
        target = self.directory.parent / f"damaged-checkpoints/{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.exists():
            source.rename(target)
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------------------------
# Metrics


class MetricsWriter:
    """Appends JSON lines to metrics.jsonl and scalars to TensorBoard event files (tensorboardX,
    no TensorFlow). On resume from step k, records after k (written by the interrupted run) are
    dropped from the JSONL and purged from TensorBoard, so both logs read as one run."""

    def __init__(self, directory: str | pathlib.Path, resume_step: int = 0):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.directory / "tensorboard"), purge_step=resume_step or None)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def plot_curves(runs: dict[str, str | pathlib.Path], out_path: str | pathlib.Path, key: str = "loss") -> None:
    """Loss (or any metric) against step for several runs' metrics.jsonl files, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, path in runs.items():
        rows = [r for r in read_metrics(path) if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0  # parameter initialisation
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8  # batches per held-out set, spread evenly over it (chosen by the caller)
    save_every: int = 100
    keep_checkpoints: int = 3
    sample_tokens: int = 200
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "save_every", "keep_checkpoints", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RunConfig.{name} must be positive, got {getattr(self, name)}")


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints after the current step and returns."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, nothing to restore
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(model_config: ModelConfig, optim_config: OptimConfig, run_config: RunConfig, out_dir: str | pathlib.Path,
          train_batch: Callable[[int], np.ndarray], eval_sets: dict[str, Callable[[], Iterable[np.ndarray]]] | None = None,
          meta: dict | None = None, sample_fn: Callable[[TitansLM, Any], str] | None = None,
          byte_lengths: np.ndarray | None = None) -> dict:
    """Train (or resume) in out_dir; returns a summary with the final evaluation.

    train_batch(step) must be a pure function of the step returning [batch_size, seq_len + 1]
    ids. eval_sets maps a name to a function giving its evaluation batches (see `evaluate`;
    byte_lengths[id] = UTF-8 bytes of a token turns bits per token into bits per byte). meta
    (tokenizer fingerprint, data seed, ...) is stored in every checkpoint and must match on resume.
    """
    out_dir = pathlib.Path(out_dir)
    if optim_config.compute_dtype == "bfloat16":
        model_config = dataclasses.replace(model_config, dtype="bfloat16")
    model, optimizer, step_fn, eval_fn = _programs(model_config, optim_config, run_config.steps)
    expect = {"model_config": json.loads(json.dumps(dataclasses.asdict(model_config))),
              "batch_size": run_config.batch_size, "seq_len": run_config.seq_len, "seed": run_config.seed,
              **(meta or {})}
    checkpointer = Checkpointer(out_dir / "checkpoints", keep=run_config.keep_checkpoints)
    abstract = jax.eval_shape(lambda: init_train_state(model_config, optimizer, run_config.seed))
    restored = checkpointer.restore_latest(abstract, expect)
    if restored is None:
        state, start = init_train_state(model_config, optimizer, run_config.seed), 0
    else:
        state, start = restored[0], int(restored[1]["step"])
    writer = MetricsWriter(out_dir, resume_step=start)
    schedule_lr = optax.warmup_cosine_decay_schedule(
        0.0, optim_config.learning_rate, optim_config.warmup_steps, run_config.steps,
        optim_config.learning_rate * optim_config.min_lr_ratio)
    tokens_per_step = run_config.batch_size * run_config.seq_len
    summary: dict[str, Any] = {"resumed_from": start, "stopped_by_signal": None}

    def run_eval(step):
        results = {}
        for name, batches in (eval_sets or {}).items():
            results[name] = evaluate(eval_fn, state["params"], batches(), byte_lengths)
            record = {"step": step, f"eval/{name}/nll": results[name]["nll"],
                      f"eval/{name}/bits_per_token": results[name]["bits_per_token"]}
            if "bits_per_byte" in results[name]:
                record[f"eval/{name}/bits_per_byte"] = results[name]["bits_per_byte"]
            writer.write(record)
        return results

    def save(step):
        checkpointer.save(step, state, expect)

    progress = None
    if run_config.progress:
        from tqdm import tqdm

        progress = tqdm(total=run_config.steps, initial=start, unit="step", dynamic_ncols=True)
    clock, clock_step = time.perf_counter(), start
    with _StopFlag() as stop:
        for step in range(start, run_config.steps):
            batch = np.asarray(train_batch(step))
            if batch.shape != (run_config.batch_size, run_config.seq_len + 1):
                raise ValueError(f"train_batch({step}) gave shape {batch.shape}, expected "
                                 f"{(run_config.batch_size, run_config.seq_len + 1)}")
            state, metrics = step_fn(state, jnp.asarray(batch))
            done = step + 1
            loss = float(metrics["loss"])
            if not math.isfinite(loss):  # the checkpoints hold only states from before this step
                checkpointer.close()
                raise FloatingPointError(f"non-finite loss {loss} at step {done}; the last checkpoint is "
                                         f"step {max(checkpointer.steps(), default=0)}")
            record = {"step": done, "loss": loss}
            if done % run_config.log_every == 0 or done == run_config.steps:
                now = time.perf_counter()
                record.update(grad_norm=float(metrics["grad_norm"]), lr=float(schedule_lr(step)),
                              tokens_per_s=tokens_per_step * (done - clock_step) / max(now - clock, 1e-9))
                clock, clock_step = now, done
                if progress is not None:
                    progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            writer.write(record)
            if progress is not None:
                progress.update(1)
            if run_config.eval_every and done % run_config.eval_every == 0 and done != run_config.steps:
                run_eval(done)
            if done % run_config.save_every == 0 or done == run_config.steps:
                save(done)
            if stop.signal is not None:
                save(done)
                summary["stopped_by_signal"] = int(stop.signal)
                break
    if progress is not None:
        progress.close()
    checkpointer.close()
    final_step = int(state["step"])
    summary["step"] = final_step
    if final_step == run_config.steps:
        summary["eval"] = run_eval(final_step)
        if sample_fn is not None:
            summary["sample"] = sample_fn(model, state["params"])
    writer.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
