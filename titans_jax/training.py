"""Training language models: optax AdamW with warmup + cosine, one jitted step, orbax
checkpoints that resume exactly, metrics to JSONL and TensorBoard, evaluation in bits per byte.

The loop itself, `run_loop(LoopSpec, LoopConfig, out_dir)`, knows nothing about the model: a
LoopSpec gives the initial and abstract state, a step function (state, i) -> (state, metrics),
an evaluation, the identity a checkpoint must match and the settings it may change. `train`
below is the Titans language-model loop built on it; t2_jax's REINFORCE and LoRA expert training
(t2_jax.train) is another. Everything below about checkpoints, signals and metrics holds
for every loop.

The trainer does not know where batches come from: it takes `train_batch(step) -> [B, T + 1]`
token ids, a pure function of the step (titans_jax.data.pipeline.WindowDataset.batch is one), so
the data position is the step and a resumed run reads exactly the batches an uninterrupted run
would have read. Everything that determines the continuation -- parameters, optimiser state,
step, the data seed, the model and tokenizer fingerprints, the optimiser settings -- is in the
checkpoint.

Checkpoints (orbax CheckpointManager, async, keep the last N):
  - saved every `save_every` steps, at the end, and when SIGTERM / SIGINT arrive (the signal
    sets a flag; the loop saves after the current step -- once, even on a save step -- and
    returns without the final evaluation; a second signal acts at once, as if no handler were
    installed). A save that fails in orbax's background thread (a full disk) is raised at the
    next step as one CheckpointSaveError naming the step, the directory and the cause; the
    earlier checkpoints are left as they were;
  - every save records a sha256 of the whole state (parameters, optimiser state, step); on
    resume the newest step that restores *and* matches its digest wins, and each skipped one is
    moved to <run>/damaged-checkpoints with a warning (orbax itself raises on most damage, but a
    damaged or empty step still counts as its latest_step, and bit flips can restore silently).
    When every checkpoint is damaged the run says so and starts again from step 0, keeping the
    old metrics.jsonl beside the new one;
  - a checkpoint of another model config, tokenizer, data seed or sequence length is refused,
    naming the fields that differ, before anything in the run directory is written. Changed
    optimiser settings (any OptimConfig field, the total steps that shape the schedule, the
    batch size) are refused too unless `allow_changes=True` (CLI: --allow-changes), which
    records each change with the step it took effect at in the checkpoints, summary.json and
    config.json.

Metrics: metrics.jsonl (one JSON object per line) is rewritten atomically on resume, dropping
the interrupted run's records after the resumed step and a torn last line (a kill mid-write),
with a warning. Rerunning a finished run writes nothing new: it reports the recorded evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import signal
import time
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from titans_jax import config_tree, sharding
from titans_jax.models import STACKED_BLOCKS, ModelConfig, TitansLM, init_params

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


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate over warmup_steps, then cosine decay to
    learning_rate * min_lr_ratio at total_steps (the schedule the optimizer applies and logs)."""
    if total_steps <= config.warmup_steps:
        raise ValueError(f"total steps ({total_steps}) must exceed warmup_steps ({config.warmup_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=total_steps, end_value=config.learning_rate * config.min_lr_ratio)


def decay_mask(params):
    """True for the leaves that weight decay applies to: matrices and embeddings, not vectors
    (norm scales, biases, gates' biases). A leaf of the stacked blocks (scan_layers=True) has
    one more axis, its layers, which does not count."""
    def decays(path, leaf) -> bool:
        layers_axis = bool(path) and getattr(path[0], "key", None) == STACKED_BLOCKS
        return leaf.ndim - layers_axis >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay; global-norm clipping; weight decay on the
    leaves of `decay_mask` only."""
    schedule = learning_rate_schedule(config, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay, mask=decay_mask),
    )


# ModelConfig fields (dotted paths for nested ones) added after checkpoints were written, with the
# value those checkpoints had: at that value a field is left out of a checkpoint's identity, so
# the older checkpoints resume.
_ADDED_MODEL_FIELDS = {"scan_layers": False, "lmm.memory.surprise_clip": None, "lmm.memory.last_layer_floor": False,
                       "lmm.memory.every_layer_floor": False}


def model_identity(config: ModelConfig) -> dict:
    """The model config as recorded in a checkpoint and compared on resume (JSON values),
    without the fields of _ADDED_MODEL_FIELDS that have the value older checkpoints imply."""
    record = json.loads(json.dumps(dataclasses.asdict(config)))
    for path, implied in _ADDED_MODEL_FIELDS.items():
        *parents, name = path.split(".")
        node = record
        for parent in parents:
            node = node[parent]
        if node[name] == implied:
            del node[name]
    return record


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


def make_train_step(model: TitansLM, optimizer: optax.GradientTransformation, state_shardings: dict | None = None,
                    mesh=None):
    """One jitted step: loss, gradients, clipping, AdamW; returns (state, metrics). With
    `state_shardings` (titans_jax.sharding.state_shardings) and its `mesh`, the state keeps
    its shardings, batches are split over the batch axes and the step is traced under the mesh
    (so the models' sequence-parallel mixers see it)."""

    def loss_fn(params, batch):
        tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
        total, count = next_token_nll(model, params, tokens, mask)
        # a batch with no target in it contributes nothing (weights may sum to less than 1)
        return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)

    def step(state: dict, batch):
        """batch: token windows [B, T + 1], or (windows, mask [B, T]) to train on the marked
        targets only (e.g. the answer tokens of task examples); a float mask weighs them."""
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    if state_shardings is None:
        return jax.jit(step)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return _under_mesh(mesh, jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                                     out_shardings=(state_shardings, replicated)))


def make_eval_fn(model: TitansLM, mesh=None):
    fn = jax.jit(lambda params, tokens, mask: next_token_nll(model, params, tokens, mask))
    return fn if mesh is None else _under_mesh(mesh, fn)


def _under_mesh(mesh, fn):
    """fn called (and so traced) with `mesh` as the current mesh."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):  # jit's .lower(...).compile() for memory and cost analysis
        with jax.set_mesh(mesh):
            return fn.lower(*args, **kwargs)

    wrapped.lower = lower
    return wrapped


def evaluate(eval_fn, params, batches: Iterable, byte_lengths: np.ndarray | None = None, mesh=None) -> dict:
    """NLL (nats per token), bits per token and, given the UTF-8 byte length of every token id,
    bits per byte over evaluation batches: (tokens [B, T + 1], mask [B, T]) pairs or plain
    token arrays (all targets real). With a mesh, batches go onto it split over the batch axes
    (replicated when their size does not divide)."""
    total, count, num_bytes = 0.0, 0.0, 0
    for item in batches:
        tokens, mask = (item, np.ones((item.shape[0], item.shape[1] - 1), bool)) if isinstance(item, np.ndarray) else item
        if mesh is None:
            tokens_in, mask_in = jnp.asarray(tokens), jnp.asarray(mask)
        else:
            ways = dict(mesh.shape)["data"] * dict(mesh.shape)["fsdp"]
            where = (sharding.batch_sharding(mesh) if np.shape(tokens)[0] % ways == 0
                     else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            tokens_in, mask_in = sharding.put_batch(tokens, where), sharding.put_batch(mask, where)
        nll, n = eval_fn(params, tokens_in, mask_in)
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


class Programs(NamedTuple):
    model: TitansLM
    optimizer: optax.GradientTransformation
    mesh: Any
    abstract_state: dict  # shapes, dtypes and shardings of the training state
    init: Callable[[], dict]  # the initial state, created sharded
    step: Callable
    eval: Callable


@functools.lru_cache(maxsize=8)
def compiled_programs(model_config: ModelConfig, optim_config: OptimConfig, total_steps: int, seed: int,
              mesh_config: sharding.MeshConfig = sharding.MeshConfig(), devices: tuple = ()) -> Programs:
    """The model, optimizer, mesh and jitted programs of one configuration — cached, so that
    several runs of it in a process (a resumed run, tests) reuse the compiled programs."""
    model = TitansLM(model_config)
    optimizer = make_optimizer(optim_config, total_steps)
    mesh = sharding.make_mesh(mesh_config, list(devices) or None)
    abstract = jax.eval_shape(lambda: init_train_state(model_config, optimizer, seed))
    shardings = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                            abstract, shardings)
    init = jax.jit(lambda: init_train_state(model_config, optimizer, seed), out_shardings=shardings)
    return Programs(model, optimizer, mesh, abstract, init, make_train_step(model, optimizer, shardings, mesh),
                    make_eval_fn(model, mesh))


# ----------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...); earlier ones are intact."""


def _to_host(leaf) -> np.ndarray:
    """The whole value of a (possibly sharded, possibly multi-process) array on this host."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


# Several processes (jax.process_count() > 1): every process runs the same loop on the same global
# batches and takes part in every collective (steps, orbax saves / restores, digests, the
# agreements below); only process 0 writes the run's files.


def _is_primary() -> bool:
    """Whether this process writes metrics, summary.json, config.json, TensorBoard events and the
    progress bar (process 0; always true in a single process)."""
    return jax.process_index() == 0


def _gather_flags(value: int) -> np.ndarray:
    """Every process's `value` (an int32 per process, in process order). A collective: every
    process must call it at the same point."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)


def _all_agree(flag: bool) -> bool:
    """True when `flag` holds on every process (so that all take the same branch)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(_gather_flags(int(flag))))


def _agreed_signal(signum: int | None) -> int | None:
    """The stop signal any process received (the first, in process order), so that every process
    saves and stops after the same step (a scheduler may signal only some processes, or all of
    them a step apart)."""
    if jax.process_count() == 1:
        return signum
    received = [int(value) for value in _gather_flags(signum or 0) if value]
    return received[0] if received else None


def _barrier(name: str) -> None:
    """All processes wait here (the barrier orbax's CheckpointManager uses by default)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def tree_digest(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (the same on every mesh)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(_to_host(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def params_digest(params) -> str:
    """The digest checkpoints written before the whole-state digest recorded (parameters only)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(_to_host(leaf)).tobytes())
    return digest.hexdigest()


def _verify_digest(state: dict, meta: dict) -> None:
    if "state_sha256" in meta:
        if tree_digest(state) != meta["state_sha256"]:
            raise ValueError("the state (parameters, optimiser state, step) does not match the digest recorded "
                             "at save time")
    elif "params_sha256" in meta:  # written by an older version: only the parameters can be checked
        if params_digest(state["params"]) != meta["params_sha256"]:
            raise ValueError("parameter digest does not match the one recorded at save time")
        warnings.warn("this checkpoint predates whole-state digests: its optimiser state is not verified",
                      RuntimeWarning, stacklevel=3)
    else:
        raise ValueError("the checkpoint records no digest")


def _root_cause(error: BaseException) -> str:
    """The innermost exception of a chain, as one line."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text if len(text) <= 400 else text[:200] + ' ... ' + text[-195:]}"


def mismatches(recorded: dict, current: dict, keys) -> list[str]:
    """'field: checkpoint value -> this run's value' for each differing (nested) field."""
    lines = []
    for key in keys:
        lines += config_tree.diff({key: recorded.get(key)}, {key: current.get(key)})
    return lines


class Checkpointer:
    """orbax CheckpointManager with verification on restore and fallback to older steps."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.set_aside: list[pathlib.Path] = []  # damaged steps moved away by restore_latest
        self._saved: set[int] = set()
        self._in_flight: int | None = None
        self._closed = False

    def save(self, step: int, state: dict, meta: dict) -> bool:
        """Start an (async) save of `state` at `step`; a step already saved is not saved again
        (orbax would raise StepAlreadyExistsError). Returns whether a save was started."""
        step = int(step)
        if step in self._saved or step in self.manager.all_steps():
            return False
        self.wait()  # the previous save must have succeeded (orbax would wait for it anyway)
        meta = dict(meta, step=step, state_sha256=tree_digest(state))
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state), meta=self._ocp.args.JsonSave(meta))
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as error:  # noqa: BLE001 - the synchronous part failed (e.g. no space for metadata)
            self._raise_save_error(step, error)
        self._saved.add(step)
        self._in_flight = step
        return True

    def check(self) -> None:
        """Raise CheckpointSaveError if a background save has failed (cheap; call every step)."""
        try:
            self.manager.check_for_errors()
        except Exception as error:  # noqa: BLE001 - orbax raises whatever the writer raised
            if jax.process_count() > 1:
                _all_agree(False)  # the other processes raise too (below), not wait at the next step
            self._raise_save_error(self._in_flight, error)
        if not _all_agree(True):
            raise CheckpointSaveError(f"saving checkpoint step {self._in_flight} to {self.directory} failed on "
                                      "another process (its error names the cause)")

    def _raise_save_error(self, step, error: BaseException):
        # the committed steps on disk (orbax's own list is not reliable after a failed save)
        good = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and int(p.name) != step]
        raise CheckpointSaveError(
            f"saving checkpoint step {step} to {self.directory} failed ({_root_cause(error)}); the earlier "
            f"checkpoints {sorted(good)} are intact") from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            self._raise_save_error(self._in_flight, error)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: dict, identity: dict, settings: dict | None = None,
                       allow_changes: bool = False) -> tuple[dict, dict, list[dict]] | None:
        """The newest checkpoint that restores and verifies, as (state, meta, changes), or None.

        `identity` holds metadata that must match (model config, tokenizer, data seed, ...): a
        mismatch raises ValueError naming each differing field. `settings` (optimiser, schedule,
        batch size) may differ only with allow_changes; `changes` then lists each as
        {"step", "field", "from", "to"}. A setting the checkpoint did not record (an older
        version) is taken as unchanged, with a warning."""
        settings = settings or {}
        for step in reversed(self.steps()):
            ocp = self._ocp
            try:  # the metadata first: a checkpoint of another run is refused, never "repaired"
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as error:  # noqa: BLE001 - unreadable metadata: damaged
                meta, damage = None, error
            if not _all_agree(meta is not None) and meta is not None:
                meta, damage = None, RuntimeError("another process could not read the checkpoint's metadata")
            if meta is not None:
                changes = self._compare(step, meta, identity, settings, allow_changes)
                try:
                    state = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state)))["state"]
                except Exception as error:  # noqa: BLE001 - any damage: warn, set aside, fall back
                    state, damage = None, error
                # several processes: each restored its own shards; all must succeed to go on (damage
                # seen by some only is set aside too -- unless orbax's own closing barrier, which
                # a process that raised inside orbax skips, keeps the others waiting)
                if _all_agree(state is not None):
                    try:  # the digest gathers the whole state: the same verdict on every process
                        _verify_digest(state, meta)
                        return state, meta, changes
                    except Exception as error:  # noqa: BLE001
                        damage = error
                elif state is not None:
                    damage = RuntimeError("another process could not restore its part of the state")
            aside = self._set_aside(step)
            warnings.warn(f"checkpoint step {step} in {self.directory} is damaged ({type(damage).__name__}: "
                          f"{str(damage)[:200]}); moved to {aside}, falling back to the previous one",
                          RuntimeWarning, stacklevel=2)
        return None

    def _compare(self, step: int, meta: dict, identity: dict, settings: dict, allow_changes: bool) -> list[dict]:
        where = f"checkpoint step {step} in {self.directory}"
        differ = mismatches(meta, identity, identity)
        if differ:
            raise ValueError(f"{where} belongs to another run; these fields differ (checkpoint -> this run): "
                             f"{'; '.join(differ)}. Use another run directory.")
        unrecorded = [key for key in settings if key not in meta]
        if unrecorded:
            warnings.warn(f"{where} does not record {unrecorded} (written by an older version); assuming this "
                          f"run's values", RuntimeWarning, stacklevel=3)
        recorded = {key: meta[key] for key in settings if key in meta}
        differ = mismatches(recorded, settings, recorded)
        if differ and not allow_changes:
            raise ValueError(f"{where} was trained with other optimiser settings (checkpoint -> this run): "
                             f"{'; '.join(differ)}. Rerun with the checkpoint's values, or pass --allow-changes "
                             f"(train(..., allow_changes=True)) to continue with the new ones from step {step}; "
                             f"the change is then recorded with its step.")
        changes = []
        for key in recorded:
            old, new = _flatten_fields(recorded[key], key), _flatten_fields(settings[key], key)
            changes += [{"step": step, "field": name, "from": old.get(name), "to": new.get(name)}
                        for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        return changes

    def _set_aside(self, step: int) -> pathlib.Path:
        """Move a damaged step out of the manager's view (kept for inspection, never deleted)."""
        source = self.directory / str(step)
        if jax.process_count() == 1:
            stamp = time.strftime('%Y%m%d-%H%M%S')
        else:  # process 0 moves it (its clock names it); the others wait, then see it gone
            from jax.experimental import multihost_utils

            now = multihost_utils.broadcast_one_to_all(np.int32(int(time.time())))
            stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(int(now)))
        target = self.directory.parent / f"damaged-checkpoints/{step}-{stamp}"
        if _is_primary():
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.exists():
                source.rename(target)
        _barrier(f"titans_jax:set-aside-checkpoint-{step}")
        self.manager.reload()
        self.set_aside.append(target)
        return target

    def close(self) -> None:
        """Wait for the last save (CheckpointSaveError if it failed) and release the manager;
        closing twice is harmless."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self.manager.close()


def _flatten_fields(value, prefix: str) -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten_fields(item, f"{prefix}.{key}"))
        return flat
    return {prefix: value}


def _write_atomically(path: pathlib.Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# ----------------------------------------------------------------------------------------------
# Metrics


def _parse_metrics(path: pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a kill mid-write) is dropped with a
    warning; a damaged line elsewhere raises ValueError naming it."""
    text = pathlib.Path(path).read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}: dropped a torn last line ({len(line)} characters, written by a run killed "
                              f"mid-write)", RuntimeWarning, stacklevel=3)
                break
            raise ValueError(f"{path} line {number} is damaged ({error}); fix or remove that line") from None
    return records


class MetricsWriter:
    """Appends JSON lines to metrics.jsonl and scalars to TensorBoard event files (tensorboardX,
    no TensorFlow). On resume from step k, records after k (written by the interrupted run) are
    dropped from the JSONL (rewritten atomically) and purged from TensorBoard, so both logs read
    as one run; `drop` removes more of the kept records (e.g. a final evaluation cut short)."""

    def __init__(self, directory: str | pathlib.Path, resume_step: int = 0,
                 drop: Callable[[dict], bool] | None = None):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        if self.path.exists():
            kept = [record for record in _parse_metrics(self.path)
                    if record.get("step", 0) <= resume_step and not (drop and drop(record))]
            _write_atomically(self.path, "".join(json.dumps(record) + "\n" for record in kept))
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


class _NoMetrics:
    """The metrics writer of processes other than 0 in a multi-process run: writes nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line is skipped with a warning)."""
    return _parse_metrics(pathlib.Path(path))


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
    # The device mesh (titans_jax.sharding): data / fsdp / tensor / sequence axes. The default
    # puts every device on `data`. Not part of a run's identity: a run may resume on another mesh.
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "save_every", "keep_checkpoints", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RunConfig.{name} must be positive, got {getattr(self, name)}")
        if not isinstance(self.mesh, sharding.MeshConfig):
            raise TypeError(f"RunConfig.mesh must be a MeshConfig, got {type(self.mesh).__name__}")

    def check_mesh(self, mesh) -> None:
        """The batch and sequence split evenly over the mesh (clear errors, before any work)."""
        sizes = dict(mesh.shape)
        ways = sizes["data"] * sizes["fsdp"]
        if self.batch_size % ways:
            raise ValueError(f"batch_size {self.batch_size} does not split over the mesh's data x fsdp = {ways} "
                             "devices; use a multiple of it")
        if self.seq_len % sizes["sequence"]:
            raise ValueError(f"seq_len {self.seq_len} does not split into the mesh's {sizes['sequence']} sequence "
                             "shards; use a multiple of it")


def _checked_batch(batch, step: int, run_config: RunConfig):
    """train_batch(step)'s result as the step takes it: ids [B, T + 1], or (ids, mask [B, T])."""
    shape = (run_config.batch_size, run_config.seq_len + 1)
    if isinstance(batch, tuple):
        if len(batch) != 2:
            raise ValueError(f"train_batch({step}) gave a tuple of {len(batch)}; expected (ids, mask)")
        tokens, mask = np.asarray(batch[0]), np.asarray(batch[1])
        if mask.shape != (shape[0], shape[1] - 1) or not (mask.dtype == np.bool_ or mask.dtype == np.float32):
            raise ValueError(f"train_batch({step}) gave a mask of shape {mask.shape} and dtype {mask.dtype}; "
                             f"expected bool or float32 weights {(shape[0], shape[1] - 1)}")
        if mask.dtype == np.float32 and not (np.all(np.isfinite(mask)) and np.all(mask >= 0)):
            raise ValueError(f"train_batch({step}) gave mask weights that are negative or not finite")
    else:
        tokens, mask = np.asarray(batch), None
    if tokens.shape != shape:
        raise ValueError(f"train_batch({step}) gave shape {tokens.shape}, expected {shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"train_batch({step}) gave {tokens.dtype} ids; expected integers")
    return tokens if mask is None else (tokens, mask)


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints after the current step and returns. The
    first signal puts the previous handlers back, so a second one acts at once (KeyboardInterrupt
    for SIGINT, termination for SIGTERM); the checkpoints already written stay intact."""

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
        self._restore()

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()


def _is_eval_record(record: dict) -> bool:
    return any(key.startswith("eval/") for key in record)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What `run_loop` needs from a model and its objective — nothing else about them.

    init() makes the initial state and abstract_state describes it (shapes, dtypes, shardings:
    what a checkpoint restores into). step(state, i) runs training step i (0-based) and returns
    (state, metrics): metrics["loss"] is recorded every step, the other metrics on log steps
    only; a step must be a pure function of (state, i) — its data and any sampling keys derived
    from i — so that a resumed run repeats an uninterrupted one exactly. evaluate(state, step)
    returns {set name: {metric: value}}, written as eval/<set>/<metric> (only scalar numbers).
    identity must match a checkpoint exactly; settings may differ with allow_changes (recorded).
    log_extras(i) adds fields on log steps (e.g. the learning rate); items_per_step with
    throughput_name reports a rate (e.g. tokens_per_s); finish(state) gives the summary's extra
    fields once the run completes (e.g. a text sample). eval_names: the evaluation sets, so that
    rerunning a finished run with other sets evaluates again."""

    abstract_state: Any
    init: Callable[[], Any]
    step: Callable[[Any, int], tuple[Any, dict]]
    identity: dict
    settings: dict
    evaluate: Callable[[Any, int], dict[str, dict]] | None = None
    eval_names: tuple[str, ...] = ()
    log_extras: Callable[[int], dict] | None = None
    items_per_step: int = 0
    throughput_name: str = "tokens_per_s"
    finish: Callable[[Any], dict] | None = None


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The loop's schedule of logging, evaluation and checkpoints (not part of a run's identity)."""

    steps: int
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    save_every: int = 100
    keep_checkpoints: int = 3
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")


def _scalar_fields(prefix: str, values: dict) -> dict:
    return {f"{prefix}{key}": float(value) for key, value in values.items()
            if isinstance(value, (int, float, np.number)) or (hasattr(value, "shape") and np.ndim(value) == 0)}


def run_loop(spec: LoopSpec, loop: LoopConfig, out_dir: str | pathlib.Path, *, run_record: dict | None = None,
             allow_changes: bool = False) -> dict:
    """Train (or resume) in out_dir with orbax checkpoints, metrics.jsonl / TensorBoard, a progress
    bar and signal handling (see the module docstring); returns the run's summary (also written
    to out_dir/summary.json): resumed_from, step, changes, stopped_by_signal, and when the run
    completed, completed=True, eval (the final evaluation) and finish(state)'s fields.

    Model-agnostic: the Titans language-model loop (`train`), the Transformer² REINFORCE loop and
    its LoRA baseline (t2_jax._experts) all run through it. run_record (the experiment's
    configuration) is written to out_dir/config.json once the checkpoints have been checked."""
    out_dir = pathlib.Path(out_dir)
    primary = _is_primary()
    checkpointer = Checkpointer(out_dir / "checkpoints", keep=loop.keep_checkpoints)
    try:  # restored onto this run's mesh, whatever mesh wrote the checkpoint
        restored = checkpointer.restore_latest(spec.abstract_state, spec.identity, spec.settings, allow_changes)
    except BaseException:
        checkpointer.close()
        raise
    changes: list[dict] = []
    previous_metrics = out_dir / "metrics.jsonl"
    if restored is None:
        state, start = spec.init(), 0
        if checkpointer.set_aside:
            kept = None
            if primary and previous_metrics.exists():
                kept = previous_metrics.with_name(f"metrics.before-restart-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
                os.replace(previous_metrics, kept)
            warnings.warn(f"every checkpoint in {checkpointer.directory} was damaged (moved to "
                          f"{checkpointer.set_aside[0].parent}); training starts again from step 0"
                          + (f" (the previous metrics are kept in {kept})" if kept else ""),
                          RuntimeWarning, stacklevel=2)
    else:
        state, start = restored[0], int(restored[1]["step"])
        changes = list(restored[1].get("changes", [])) + restored[2]
    summary_path = out_dir / "summary.json"
    if start == loop.steps and summary_path.exists():  # a finished run, rerun: report, write nothing
        previous = json.loads(summary_path.read_text())
        if (previous.get("completed") and previous.get("step") == start
                and set(previous.get("eval", {})) == set(spec.eval_names)):
            checkpointer.close()
            return dict(previous, resumed_from=start, already_finished=True)
    if run_record is not None and primary:
        _write_atomically(out_dir / "config.json", json.dumps(dict(run_record, changes=changes), indent=2,
                                                                default=str))
    # at the final step, a rerun re-evaluates: drop evaluation rows of an evaluation cut short
    writer = MetricsWriter(out_dir, resume_step=start, drop=(
        (lambda record: record.get("step") == start and _is_eval_record(record)) if start == loop.steps
        else None)) if primary else _NoMetrics()
    saved_meta = dict(spec.identity, **spec.settings, changes=changes)
    summary: dict[str, Any] = {"resumed_from": start, "stopped_by_signal": None, "changes": changes}

    def run_eval(step):
        results = spec.evaluate(state, step) if spec.evaluate is not None else {}
        for name, values in results.items():
            writer.write({"step": step, **_scalar_fields(f"eval/{name}/", values)})
        return results

    progress = None
    if loop.progress and primary:
        from tqdm import tqdm

        progress = tqdm(total=loop.steps, initial=start, unit="step", dynamic_ncols=True)
    clock, clock_step = time.perf_counter(), start
    final_step = start
    try:
        with _StopFlag() as stop:
            for step in range(start, loop.steps):
                state, metrics = spec.step(state, step)
                done = final_step = step + 1
                loss = float(metrics["loss"])
                checkpointer.check()  # a background save that failed surfaces here, one step later
                if not math.isfinite(loss):  # the checkpoints hold only states from before this step
                    raise FloatingPointError(f"non-finite loss {loss} at step {done}; the last checkpoint is "
                                             f"step {max(checkpointer.steps(), default=0)}")
                record = {"step": done, "loss": loss}
                if done % loop.log_every == 0 or done == loop.steps:
                    now = time.perf_counter()
                    record.update(_scalar_fields("", {k: v for k, v in metrics.items() if k != "loss"}))
                    record.update(spec.log_extras(step) if spec.log_extras is not None else {})
                    if spec.items_per_step:
                        record[spec.throughput_name] = (spec.items_per_step * (done - clock_step)
                                                        / max(now - clock, 1e-9))
                    clock, clock_step = now, done
                    if progress is not None:
                        postfix = {"loss": f"{loss:.3f}"}
                        if spec.items_per_step:
                            postfix["rate"] = f"{record[spec.throughput_name]:.0f}"
                        progress.set_postfix(postfix)
                writer.write(record)
                if progress is not None:
                    progress.update(1)
                if loop.eval_every and done % loop.eval_every == 0 and done != loop.steps:
                    run_eval(done)
                signum = _agreed_signal(stop.signal)  # read once: the save and the stop agree
                if done % loop.save_every == 0 or done == loop.steps or signum is not None:
                    checkpointer.save(done, state, saved_meta)  # once per step, whatever asked for it
                if signum is not None:
                    summary["stopped_by_signal"] = int(signum)
                    break
        if progress is not None:
            progress.close()
            progress = None
        checkpointer.close()  # waits for the last save; raises CheckpointSaveError if it failed
        summary["step"] = final_step
        if final_step == loop.steps and summary["stopped_by_signal"] is None:
            summary["eval"] = run_eval(final_step)
            if spec.finish is not None:
                summary.update(spec.finish(state))
            summary["completed"] = True
    finally:
        if progress is not None:
            progress.close()
        try:
            checkpointer.close()
        finally:
            writer.close()
    if primary:
        _write_atomically(summary_path, json.dumps(summary, indent=2, default=_json_default))
    return summary


def _json_default(value):
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    return str(value)


def train(model_config: ModelConfig, optim_config: OptimConfig, run_config: RunConfig, out_dir: str | pathlib.Path,
          train_batch: Callable[[int], np.ndarray], eval_sets: dict[str, Callable[[], Iterable[np.ndarray]]] | None = None,
          meta: dict | None = None, sample_fn: Callable[[TitansLM, Any], str] | None = None,
          byte_lengths: np.ndarray | None = None, run_record: dict | None = None,
          allow_changes: bool = False, initial_params: Any = None) -> dict:
    """Train (or resume) a Titans language model in out_dir; returns a summary with the final
    evaluation (the loop itself is `run_loop`).

    train_batch(step) must be a pure function of the step returning [batch_size, seq_len + 1]
    ids, or a pair (ids, mask [batch_size, seq_len]) whose mask marks the targets the loss counts:
    bool (the loss is their mean NLL) or float32 weights (the weighted mean, sum(w nll) / sum(w)).
    eval_sets maps a name to a function giving its evaluation batches (see `evaluate`;
    byte_lengths[id] = UTF-8 bytes of a token turns bits per token into bits per byte). meta
    (tokenizer fingerprint, data seed, ...) is stored in every checkpoint and must match on resume.
    run_record (the experiment's configuration) is written to out_dir/config.json once the
    checkpoints have been checked, with the list of recorded setting changes. allow_changes:
    accept a checkpoint written with other optimiser settings / total steps / batch size (see the
    module docstring). initial_params: start from these parameters (e.g. another run's, trained on
    other rows: a curriculum) instead of the seed's initialisation, with a fresh optimiser state at
    step 0; they must have the model's parameter structure, shapes and dtypes, and their digest is
    part of the identity, so a resume from other initial parameters is refused.

    Several processes (jax.distributed initialised; jax.process_count() > 1): every process calls
    train with the same arguments and the same train_batch / eval_sets (each puts only its own
    shards of the global batch on its devices). Checkpoints are saved and restored collectively
    (out_dir must be a filesystem all processes share); a stop signal to any process stops all
    after the same step; only process 0 writes metrics.jsonl, TensorBoard events, config.json,
    summary.json and the progress bar, and only process 0 calls sample_fn (with the parameters
    gathered to host memory by all processes); every process returns the summary (the sample
    only on process 0).
    """
    if optim_config.compute_dtype == "bfloat16":
        model_config = dataclasses.replace(model_config, dtype="bfloat16")
    programs = compiled_programs(model_config, optim_config, run_config.steps, run_config.seed, run_config.mesh,
                         tuple(jax.devices()))
    model, step_fn, eval_fn, mesh = programs.model, programs.step, programs.eval, programs.mesh
    run_config.check_mesh(mesh)
    identity = {"model_config": model_identity(model_config),
                "seq_len": run_config.seq_len, "seed": run_config.seed, **(meta or {})}
    init = programs.init
    if initial_params is not None:
        init = _init_from_params(programs, initial_params)
        identity["initial_params_sha256"] = tree_digest(initial_params)
    settings = {"optim": dataclasses.asdict(optim_config), "total_steps": run_config.steps,
                "batch_size": run_config.batch_size}
    schedule_lr = learning_rate_schedule(optim_config, run_config.steps)
    batch_on_mesh = sharding.batch_sharding(mesh)

    def step(state, i):
        batch = _checked_batch(train_batch(i), i, run_config)
        return step_fn(state, jax.tree.map(lambda part: sharding.put_batch(part, batch_on_mesh), batch))

    def run_eval(state, _step):
        return {name: evaluate(eval_fn, state["params"], batches(), byte_lengths, mesh)
                for name, batches in (eval_sets or {}).items()}

    def finish(state):
        if sample_fn is None:
            return {}
        if jax.process_count() == 1:
            return {"sample": sample_fn(model, state["params"])}
        host_params = jax.tree.map(_to_host, state["params"])  # gathered by every process, sampled on one
        return {"sample": sample_fn(model, host_params)} if _is_primary() else {}

    spec = LoopSpec(abstract_state=programs.abstract_state, init=init, step=step, identity=identity,
                    settings=settings, evaluate=run_eval, eval_names=tuple(eval_sets or {}),
                    log_extras=lambda i: {"lr": float(schedule_lr(i))},
                    items_per_step=run_config.batch_size * run_config.seq_len, finish=finish)
    loop = LoopConfig(steps=run_config.steps, log_every=run_config.log_every, eval_every=run_config.eval_every,
                      save_every=run_config.save_every, keep_checkpoints=run_config.keep_checkpoints,
                      progress=run_config.progress)
    return run_loop(spec, loop, out_dir, run_record=run_record, allow_changes=allow_changes)


def _init_from_params(programs: Programs, params) -> Callable[[], dict]:
    """The initial-state function of a run that starts from `params` (checked against the
    model's parameters: structure, shapes, dtypes) with a fresh optimiser state at step 0."""
    expected = programs.abstract_state["params"]
    if jax.tree.structure(params) != jax.tree.structure(expected):
        have = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        want = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(expected)[0]}
        raise ValueError(f"initial_params do not have the model's parameters: missing {sorted(want - have)[:5]}, "
                         f"unexpected {sorted(have - want)[:5]}")
    for (path, leaf), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected)):
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype  # no copy of a sharded array
        if tuple(np.shape(leaf)) != want.shape or dtype != want.dtype:
            raise ValueError(f"initial_params{jax.tree_util.keystr(path)} is {dtype}{list(np.shape(leaf))}, "
                             f"the model's is {want.dtype}{list(want.shape)}")
    shardings = jax.tree.map(lambda leaf: leaf.sharding, programs.abstract_state)
    start = jax.jit(lambda p: {"params": p, "opt_state": programs.optimizer.init(p), "step": jnp.zeros((), jnp.int32)},
                    out_shardings=shardings)
    return lambda: start(jax.tree.map(_to_host, params))  # only when no checkpoint is resumed


def load_trained(run_dir: str | pathlib.Path, changes: dict | None = None) -> tuple[ModelConfig, Any, dict]:
    """(model config, parameters, checkpoint metadata) of the newest good checkpoint of a run
    written by `train` (its config.json names the model and optimiser; damaged steps fall back
    as on resume). Raises FileNotFoundError naming what is missing.

    `changes` (ModelConfig.replace's dotted paths): evaluate the trained parameters under a
    changed model config, e.g. {"lmm.memory.every_layer_floor": True}: an intervention on what the
    model computes with the same parameters. A change that alters the parameters' tree, shapes or
    dtypes raises ValueError naming the first leaf that differs."""
    run_dir = pathlib.Path(run_dir)
    record_path = run_dir / "config.json"
    if not record_path.exists():
        raise FileNotFoundError(f"{record_path} not found: not a training run directory (train one with "
                                f"`python -m experiments.train --config quick --out {run_dir}`)")
    record = json.loads(record_path.read_text())
    model_config = config_tree.from_dict(ModelConfig, record["model_config"])
    optim_config = config_tree.from_dict(OptimConfig, record["config"]["optim"])
    optimizer = make_optimizer(optim_config, int(record["config"]["run"]["steps"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh wrote it
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                            jax.eval_shape(lambda: init_train_state(model_config, optimizer, 0)))
    if not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} not found: the run has no checkpoint yet")
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        restored = checkpointer.restore_latest(abstract, {})
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no usable checkpoint in {run_dir / 'checkpoints'}")
    state, meta, _ = restored
    if changes:
        changed = model_config.replace(changes)
        expected = jax.eval_shape(lambda: init_params(changed, jax.random.PRNGKey(0)))
        leaves = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
        trained = dict(jax.tree_util.tree_flatten_with_path(state["params"])[0])
        def spec(tree, path):
            leaf = tree.get(path)
            return "absent" if leaf is None else f"{leaf.dtype}{list(leaf.shape)}"

        for path in sorted(set(leaves) | set(trained), key=jax.tree_util.keystr):
            if spec(leaves, path) != spec(trained, path):
                raise ValueError(f"{changes} changes the model's parameters at {jax.tree_util.keystr(path)} "
                                 f"(trained {spec(trained, path)}, changed {spec(leaves, path)}): only changes "
                                 "that keep them apply")
        model_config = changed
    return model_config, state["params"], meta
