"""Memory plans per device for a model, a context length and a mesh -- without running anything.

    from titans_jax import plan
    row = plan.plan_memory("760M", arch="mac", context=2**21, batch=1, mesh="data=1,sequence=256")
    print(plan.markdown_table([row]))

(`python -m experiments.plan` is the command line; it makes the fake CPU devices.) Per device:

  exact, from shapes and shardings (jax.eval_shape + titans_jax.sharding's table):
    parameters      every parameter's shard (NamedSharding.shard_shape) x its dtype
    optimizer       AdamW's mu and nu (float32, sharded as their parameters) + its int32 counts
    gradients       as the parameters (float32, same shardings)
  exact, from the config (`memory_state_bytes`, `halo_cache_bytes`):
    memory state    the Titans memory's fast weights, momentum and chunk-start weights: local
                    batch x heads / tensor x memory layers x sum over the memory MLP's layers of
                    I x O (+ O with biases) x 3, in the parameter dtype; independent of the context.
                    (MAC with sequence shards: x all heads -- its pipeline does not split heads
                    over `tensor`, see Request.local_heads)
    halo / caches   what the sequence-parallel training pass holds per layer beside it: the
                    sliding-window halo (window keys and values from the left neighbour), the
                    conv halos, MAC's segment buffers and segment-start weights (the cache the
                    pipeline hands on), all keys and values for full attention
  compiled (`jax.jit(...).lower(...).compile().memory_analysis()`, for fake CPU devices):
    train           titans_jax.training.make_train_step (forward + backward + AdamW, traced
                    under the mesh) on the sharded training state and a [B, T + 1] batch
    inference       one forward pass, model.apply(..., logits_at="last"), on the sharded
                    parameters and a [B, T] batch
    fields: argument, output, alias, temp (temporaries), generated_code; the peak is
    argument + output - alias + temp (the step does not donate its state, so the new state is
    a second copy beside the old one).

XLA:CPU's memory analysis is an estimate of the same program on the target: the same
SPMD-partitioned program (per-device shapes, the same collectives), but TPU and GPU compilers fuse
differently, schedule differently (latency hiding) and may rematerialise to fit a memory limit,
so their temporaries can be smaller or larger. Two XLA:CPU defaults would make it a poor estimate
(both measured on toy models here), so experiments.plan turns them off (PLANNING_XLA_FLAGS):
  - it expands the optimization barriers that jax.checkpoint puts around a recomputation before
    CSE runs, so CSE merges the recomputation into the forward pass: remat has no effect on its
    temporaries (--xla_disable_hlo_passes=cse_barrier_expander keeps them);
  - its concurrency-optimised scheduler starts loops' buffers early, so the loops of different
    layers do not share memory and every layer adds its whole working set even under remat
    (--xla_cpu_enable_concurrency_optimized_scheduler=false).
A row records whether the flags were in effect ("planning_flags"). The hand count beside the
compiled numbers says what the pieces should cost.

Compile modes (`compile=`): "full" compiles the model as configured; "layers" compiles it with
2 and 3 layers and extrapolates every field linearly in the number of layers (from the second
layer on each adds the same: 5 depths of a small MAC model on 2 shards added 39 MB each; the
first differs, as the embedding, logits and optimizer temporaries are laid out around it).
Extrapolated numbers are labelled as such; `check_layers` compiles a fourth depth and reports
the prediction error. "none" reports the exact and hand-counted parts only.

Dimension letters: B batch, T tokens, L layers, D d_model, H heads, E head dim, V vocabulary,
C segment (MAC) or chunk (memory) length, P sequence shards, I / O memory layer widths.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from titans_jax import models, presets, sharding, training
from titans_jax.models import ModelConfig

GIB = 2**30
HBM_GIB = {"v5e": 16.0, "H100": 80.0}  # the default device sizes the tables compare with
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")
COMPILE_MODES = ("full", "layers", "none")
LAYER_DEPTHS = (2, 3)  # the depths "layers" compiles (from 2 on, each layer adds the same on XLA:CPU)
# XLA:CPU flags that make its memory analysis mean what it would on an accelerator (see the module
# docstring); experiments.plan sets them, with the fake device count, before jax starts.
PLANNING_XLA_FLAGS = ("--xla_disable_hlo_passes=cse_barrier_expander",
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")
CAVEAT = ("XLA:CPU's memory analysis is an estimate of the same SPMD program (per-device shapes, the same "
          "collectives) on the target: TPU and GPU compilers fuse, schedule and rematerialise differently, so their "
          "temporaries can be smaller or larger.")


# ----------------------------------------------------------------------------------------------
# The request: model, context, batch, mesh -- checked before anything is traced


@dataclasses.dataclass(frozen=True)
class Request:
    """One configuration to plan (see `plan_memory` for the fields)."""

    name: str  # preset name or "custom"
    config: ModelConfig  # the model as planned (dtype and remat applied)
    context: int
    batch: int
    mesh: sharding.MeshConfig
    sizes: dict  # mesh axis -> size, resolved

    @property
    def local_batch(self) -> int:
        return self.batch // (self.sizes["data"] * self.sizes["fsdp"])

    @property
    def local_tokens(self) -> int:
        return self.context // self.sizes["sequence"]

    @property
    def local_heads(self) -> int:
        """Heads per device in the token mixer as the program runs it: split over `tensor` when it
        divides them (the sharding table's rule) -- except in MAC's sequence-parallel pipeline,
        which runs every head on every tensor shard (sequence_parallel.pipeline hands each shard
        the whole parameters and its [B, L, D] slice of the sequence: split over batch and
        sequence only), so that tensor parallelism divides neither its state nor its work."""
        heads, tensor = self.config.num_heads, self.sizes["tensor"]
        if self.config.arch == "mac" and self.sizes["sequence"] > 1:
            return heads
        return heads // tensor if heads % tensor == 0 else heads

    @property
    def num_devices(self) -> int:
        return math.prod(self.sizes.values())


def model_config(model: str | ModelConfig, arch: str = "mac", dtype: str | None = None,
                 remat: str | None = None) -> tuple[str, ModelConfig]:
    """(name, config) for a preset name (solved for `arch`) or a ModelConfig (taken as is), with
    the compute dtype (parameters stay in their param_dtype, as training's bfloat16 option does)
    and the remat policy applied where given."""
    if isinstance(model, ModelConfig):
        name, config = "custom", model
    elif isinstance(model, str):
        # remat does not change the parameters: "none" keeps the preset's shape solving (a trace of
        # the model) away from it, and the preset's own policy comes back below unless one is given
        name, config = model, presets.preset(model, arch, remat="none")
        remat = presets.PRESETS[model][0].get("remat", ModelConfig.remat) if remat is None else remat
    else:
        raise TypeError(f"model must be a preset name or a ModelConfig, got {type(model).__name__}")
    changes = {}
    if dtype is not None:
        changes["dtype"] = dtype
    if remat is not None:
        if remat not in models.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of {tuple(models.REMAT_POLICIES)}")
        changes["remat"] = remat
    return name, (config.replace(**changes) if changes else config)


def make_request(model: str | ModelConfig, *, context: int, mesh: str | sharding.MeshConfig, arch: str = "mac",
                 batch: int | None = None, num_devices: int | None = None, dtype: str | None = None,
                 remat: str | None = None) -> Request:
    """A checked Request; clear errors (ValueError) for every input that cannot be planned:
    an unknown preset, a mesh larger than the devices, a context that does not split over the
    sequence shards (or, for MAC, into whole segments per shard), a batch that does not split
    over data x fsdp. batch None: one sequence per data x fsdp shard (the smallest batch that
    splits). num_devices None: the devices of this process."""
    mesh_config = sharding.MeshConfig.parse(mesh) if isinstance(mesh, str) else mesh
    if not isinstance(mesh_config, sharding.MeshConfig):
        raise TypeError(f"mesh must be a 'data=..,sequence=..' string or a MeshConfig, got {type(mesh).__name__}")
    available = len(jax.devices()) if num_devices is None else int(num_devices)
    requested = mesh_config.requested()
    if -1 in requested.values():
        sizes = mesh_config.sizes(available)
    else:
        sizes = requested
        if math.prod(sizes.values()) > available:
            raise ValueError(f"mesh {mesh_config.describe()} needs {math.prod(sizes.values())} devices but only "
                             f"{available} are available (--devices {available}); give at least "
                             f"--devices {math.prod(sizes.values())}")
    name, config = model_config(model, arch, dtype, remat)
    if not isinstance(context, (int, np.integer)) or isinstance(context, bool) or context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    if context % sizes["sequence"]:
        raise ValueError(f"context {context} does not split into the mesh's {sizes['sequence']} sequence shards; use a "
                         f"multiple of {sizes['sequence']}")
    if config.arch == "mac" and sizes["sequence"] > 1 and (context // sizes["sequence"]) % config.segment_size:
        raise ValueError(f"MAC: a sequence shard of {context // sizes['sequence']} tokens ({context} / "
                         f"{sizes['sequence']}) must hold whole segments of {config.segment_size} tokens")
    ways = sizes["data"] * sizes["fsdp"]
    batch = ways if batch is None else batch
    if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if batch % ways:
        raise ValueError(f"batch {batch} does not split over the mesh's data x fsdp = {ways} devices; use a multiple "
                         f"of {ways} (or fewer data / fsdp shards)")
    return Request(name, config, int(context), int(batch), mesh_config, sizes)


# ----------------------------------------------------------------------------------------------
# Exact counts: parameters, optimizer, gradients from shardings; memory state and caches from the config


def _bytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def abstract_state(config: ModelConfig, optimizer) -> dict:
    """The training state's shapes (jax.eval_shape of titans_jax.training.init_train_state)."""
    return jax.eval_shape(lambda: training.init_train_state(config.replace(remat="none"), optimizer, 0))


def state_bytes(state: dict, mesh) -> dict:
    """Per-device and global bytes of parameters and optimizer state under `mesh`, and the
    parameters that a mesh axis of their rule could not split."""
    shardings = sharding.state_shardings(state, mesh)
    rows = sharding.describe_shardings(state["params"], mesh)
    params = jax.tree.leaves(state["params"])
    per_device = {
        "parameters": sum(_bytes(row["per_device"], leaf.dtype) for row, leaf in zip(rows, params, strict=True)),
        "optimizer": sum(_bytes(where.shard_shape(tuple(leaf.shape)), leaf.dtype) for leaf, where in zip(
            jax.tree.leaves(state["opt_state"]), jax.tree.leaves(shardings["opt_state"]), strict=True)),
    }
    per_device["gradients"] = per_device["parameters"]  # the same shapes, dtypes and shardings
    opt_leaves = jax.tree.leaves(state["opt_state"])
    totals = {"parameters": sum(_bytes(leaf.shape, leaf.dtype) for leaf in params),
              "optimizer": sum(_bytes(leaf.shape, leaf.dtype) for leaf in opt_leaves),
              "parameter_count": models.param_count(state["params"]),
              "optimizer_counts": sum(1 for leaf in opt_leaves if leaf.ndim == 0)}
    not_split = [{"path": row["path"], "shape": list(row["shape"]), "spec": str(row["spec"]),
                  "wanted": str(sharding.logical_to_spec(row["logical"], None, mesh)),
                  "per_device": list(row["per_device"])} for row in rows if row["not_split"]]
    return {"per_device": per_device, "global": totals, "not_split": not_split}


def memory_layer_elements(config: ModelConfig) -> int:
    """Elements of one copy of the memory's inner weights for one head: sum over the memory
    MLP's layers of I x O (+ O with biases). 0 for architectures without a memory."""
    if not config.uses_memory:
        return 0
    memory = config.memory_layer.memory_config
    return sum(i * o + (o if memory.use_bias else 0) for i, o in memory.layer_dims)


def memory_state_bytes(config: ModelConfig, local_batch: int, local_heads: int) -> int:
    """The memory state per device: local batch x heads x memory layers x (fast weights M_t,
    momentum S_t, chunk-start weights) in the parameter dtype. Independent of the context."""
    copies = 3  # MemoryState.weights, .momentum, .chunk_weights
    return (local_batch * local_heads * config.num_layers * copies * memory_layer_elements(config)
            * jnp.dtype(config.param_dtype).itemsize)


def halo_cache_bytes(config: ModelConfig, local_batch: int, local_heads: int, context: int, shards: int) -> dict:
    """Per device, all layers: what the training pass holds per layer beside the memory state
    (see the module docstring); a dict of named parts in bytes."""
    act = jnp.dtype(config.dtype).itemsize
    heads_dim = local_heads * config.head_dim
    width = config.lmm.conv_width
    layers = config.num_layers
    parts: dict[str, int] = {}
    if config.arch in ("swa", "mag", "mal") and shards > 1:
        parts["attention halo (window k, v)"] = layers * local_batch * config.window * heads_dim * 2 * act
    if config.arch == "transformer" and shards > 1:
        parts["all-gathered k, v"] = layers * local_batch * context * heads_dim * 2 * act
    if config.arch in ("lmm", "mag", "mal") and width and shards > 1:
        parts["conv halo"] = layers * local_batch * (width - 1) * 3 * heads_dim * act
    if config.prefix_length and config.arch != "mac":
        parts["persistent k, v"] = (layers * local_batch * config.prefix_length * heads_dim * 2 * act
                                    if config.arch in ("transformer", "swa", "mag", "mal") else 0)
    if config.arch == "mac":
        parts["segment buffers (4 x C x H x E)"] = layers * local_batch * 4 * config.segment_size * heads_dim * act
        parts["segment-start weights"] = (layers * local_batch * local_heads * memory_layer_elements(config)
                                          * jnp.dtype(config.param_dtype).itemsize)
        conv = (3 * heads_dim if width else 0) + (heads_dim if width and config.mac_retrieval == "causal" else 0)
        parts["conv states"] = layers * local_batch * max(width - 1, 0) * conv * act
    return {name: value for name, value in parts.items() if value}


def activation_hand_count(request: Request) -> dict:
    """A rough count of the activations (bytes per device), term by term, for the reader to set
    beside the compiled temporaries. Per layer and token the residual stream is D elements; the
    number of [T, D]-sized tensors a block keeps for its backward pass depends on the remat policy
    ("full": its input only, then one block's insides at a time while it is recomputed)."""
    config = request.config
    act = jnp.dtype(config.dtype).itemsize
    batch, tokens, heads = request.local_batch, request.local_tokens, request.local_heads
    d, e, layers = config.d_model, config.head_dim, config.num_layers
    he = heads * e
    vocab = config.vocab_size // request.sizes["tensor"] if config.vocab_size % request.sizes["tensor"] == 0 \
        else config.vocab_size
    mlp = config.mlp_hidden // request.sizes["tensor"] if config.mlp_hidden % request.sizes["tensor"] == 0 \
        else config.mlp_hidden
    # Elements per token that one block keeps for its backward pass when nothing is rematerialised.
    block = 3 * d + 3 * mlp + d  # input, two norms; SwiGLU gate, up, product; its output
    hidden = 0
    if config.uses_memory:
        memory = config.memory_layer.memory_config
        hidden = heads * sum(o for _, o in memory.layer_dims[:-1])  # the memory MLP's hidden units
        # qkv, conv, silu; l2 norms; read, gate; out; the inner loop's hidden activations (forward,
        # gradient at the chunk start, retrieval: ~12 per hidden unit in XLA:CPU's buffers of a MAC layer)
        block += 3 * 3 * he + 2 * he + 2 * he + d + 12 * hidden
    if config.arch in ("transformer", "swa", "mag", "mal"):
        keys = min(config.attention_block + (config.window or 0), 2 * config.attention_block)  # per query block
        block += 3 * he + he + d + 3 * heads * keys  # scores, probabilities, their gradient
    if config.arch == "mac":
        span = config.num_persistent + 2 * config.segment_size  # attention over [persistent || retrieved || segment]
        # q, k, v; retrieved k, v; output, its projection; scores, probabilities, masks (~6.5 f32 per
        # key and head, as XLA:CPU lays out a MAC layer's frames); retrieval query, read, projection; gate
        block += 3 * he + 2 * he + he + d + int(6.5 * heads * span) + 3 * he + he + d + 2 * d
    saved_per_layer = d if config.remat == "full" else block
    terms = {
        "saved between layers (L x B x T x saved elements)": layers * batch * tokens * saved_per_layer * act,
        "one block's insides (recomputed in its backward)": (batch * tokens * block * act
                                                           if config.remat == "full" else 0),
        "logits, their exponentials and gradient (B x T x V x f32 x 3)": batch * tokens * vocab * 4 * 3,
    }
    if config.uses_memory:
        memory = config.memory_layer.memory_config
        chunks = -(-tokens // memory.chunk_size)
        per_layer = batch * heads * chunks * 3 * memory_layer_elements(config) * jnp.dtype(config.param_dtype).itemsize
        terms["memory states at chunk boundaries (x 3 per chunk)"] = per_layer * (1 if config.remat == "full"
                                                                                 else layers)
    shards = request.sizes["sequence"]
    deep = config.arch == "mac" or (config.uses_memory and not _is_affine(config))
    if shards > 1 and deep:
        rounds = batch + shards - 1  # microbatches (one sequence each) + P - 1
        state = (memory_state_bytes(config, batch, heads) + sum(halo_cache_bytes(
            config, batch, heads, request.context, shards).values())) // max(layers, 1)
        # jax.checkpoint in sequence_parallel.pipeline_starts saves its inputs in every round: the
        # shard's whole input and the incoming state, (M + P - 1) times (XLA:CPU's buffers hold
        # about twice the input per round)
        terms["pipeline rounds (input + state saved per round)"] = rounds * (tokens * d * act + state)
    # A forward pass keeps nothing for later: the residual stream and the current block's
    # projections over the whole shard; MAC's attention and memory insides one segment at a time.
    if config.arch == "mac":
        insides = 4 * d * tokens + block * min(tokens, config.segment_size)
    else:
        insides = (4 * d + 9 * he + 3 * mlp + 12 * hidden) * tokens
    inference = {
        "residual stream and one block's insides": batch * insides * act,
        "last-token logits": batch * vocab * 4,
    }
    return {"train": terms, "train_total": sum(terms.values()), "inference": inference,
            "inference_total": sum(inference.values()), "block_elements_per_token": block,
            "memory_hidden_per_token": hidden}


def _is_affine(config: ModelConfig) -> bool:
    from titans_jax import sequence_parallel

    return sequence_parallel.is_affine(config.memory_layer.memory_config)


# ----------------------------------------------------------------------------------------------
# Compiled memory analysis


def _analysis(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend gives no memory analysis")
    return {field: int(getattr(stats, f"{field}_size_in_bytes")) for field in MEMORY_FIELDS}


def _train_program(config: ModelConfig, optimizer, mesh, batch: int, context: int):
    state = abstract_state(config, optimizer)
    shardings = sharding.state_shardings(state, mesh)
    state = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                         state, shardings)
    step = training.make_train_step(models.TitansLM(config), optimizer, shardings, mesh)
    tokens = jax.ShapeDtypeStruct((batch, context + 1), jnp.int32, sharding=sharding.batch_sharding(mesh))
    return step.__wrapped__, (state, tokens)  # the jitted step; traced here under the mesh


def _inference_program(config: ModelConfig, optimizer, mesh, batch: int, context: int):
    config = config.replace(remat="none")  # a forward pass keeps nothing for a backward one
    params = abstract_state(config, optimizer)["params"]
    where = sharding.param_shardings(params, mesh)
    params = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), params, where)
    model = models.TitansLM(config)
    fn = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens, logits_at="last"),
                 in_shardings=(where, sharding.batch_sharding(mesh)))
    tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=sharding.batch_sharding(mesh))
    return fn, (params, tokens)


PROGRAMS = {"train": _train_program, "inference": _inference_program}


def compile_memory(program: str, config: ModelConfig, mesh, batch: int, context: int, optimizer=None) -> dict:
    """Lower and compile one program ("train" or "inference") of `config` on `mesh` from
    abstract shapes; its memory analysis (bytes per device) with the lowering and compile times."""
    optimizer = optimizer or training.make_optimizer(training.OptimConfig(), 1000)
    fn, args = PROGRAMS[program](config, optimizer, mesh, batch, context)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return dict(_analysis(compiled), lower_s=lowered_at - start, compile_s=done - lowered_at)


def _peak(fields: dict) -> float:
    return fields["argument"] + fields["output"] - fields["alias"] + fields["temp"]


def compiled_memory(request: Request, mesh, program: str, mode: str = "full", check_layers: bool = False,
                    optimizer=None) -> dict:
    """The memory analysis of `program` for the request: compiled as configured ("full"), or
    ("layers") compiled with LAYER_DEPTHS layers and extrapolated linearly to L (check_layers:
    one more depth, compiled, beside its prediction -- for the train program)."""
    config = request.config
    layers = config.num_layers
    low, high = LAYER_DEPTHS
    check_layers = check_layers and program == "train"  # a forward pass's temporaries do not grow with depth
    if mode == "layers" and layers <= high + int(check_layers):
        mode = "full"  # as cheap to compile the model itself
    if mode == "full":
        fields = compile_memory(program, config, mesh, request.batch, request.context, optimizer)
        result = {field: fields[field] for field in MEMORY_FIELDS}
        result.update(method="compiled", lower_s=fields["lower_s"], compile_s=fields["compile_s"])
        result["peak"] = _peak(result)
        return result
    if mode != "layers":
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
    depths = (low, high, high + 1) if check_layers else (low, high)
    points = {depth: compile_memory(program, config.replace(num_layers=depth), mesh, request.batch, request.context,
                                    optimizer) for depth in depths}

    def at(depth):
        return {field: points[low][field] + (depth - low) * (points[high][field] - points[low][field])
                for field in MEMORY_FIELDS}

    result = {field: int(round(value)) for field, value in at(layers).items()}
    result.update(method=f"extrapolated from {low}- and {high}-layer compiles",
                  lower_s=sum(point["lower_s"] for point in points.values()),
                  compile_s=sum(point["compile_s"] for point in points.values()),
                  points={str(depth): {field: point[field] for field in MEMORY_FIELDS + ("lower_s", "compile_s")}
                          for depth, point in points.items()})
    result["peak"] = _peak(result)
    if check_layers:
        predicted, actual = _peak(at(high + 1)), _peak(points[high + 1])
        result[f"check_{high + 1}_layers"] = {"predicted_peak": predicted, "compiled_peak": actual,
                                              "relative_error": (predicted - actual) / actual}
    if program == "train":
        # The remat estimate: the compiled `low`-layer program, and for every further layer only
        # what the remat policy keeps (saved_per_layer) plus its parameters' gradient and one
        # optimizer temporary. On XLA:CPU each further layer adds far more (module docstring).
        layer_params = (points[high]["argument"] - points[low]["argument"]) / 3  # params + mu + nu per layer
        per_layer = 2 * layer_params + saved_per_layer(request)
        estimate = dict(result, temp=int(round(points[low]["temp"] + (layers - low) * per_layer)))
        result["remat_estimate"] = {"temp": estimate["temp"], "peak": _peak(estimate), "per_layer_temp": per_layer,
                                    "compiled_per_layer_temp": points[high]["temp"] - points[low]["temp"]}
    return result


def saved_per_layer(request: Request) -> int:
    """Bytes per device one layer keeps from its forward pass for its backward pass under the
    remat policy: its input for "full"; for the others, roughly its insides (the hand count)."""
    config = request.config
    elements = (config.d_model if config.remat == "full"
                else activation_hand_count(request)["block_elements_per_token"])
    return request.local_batch * request.local_tokens * elements * jnp.dtype(config.dtype).itemsize


def planning_flags_in_effect() -> bool:
    """Whether XLA_FLAGS carries PLANNING_XLA_FLAGS (read at backend start: set them before jax
    initialises its CPU backend, as experiments.plan does)."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    return "cse_barrier_expander" in flags and "xla_cpu_enable_concurrency_optimized_scheduler=false" in flags


# ----------------------------------------------------------------------------------------------
# The plan


def plan_memory(model: str | ModelConfig, *, context: int, mesh: str | sharding.MeshConfig = "data=1",
                arch: str = "mac", batch: int | None = None, devices: Sequence | None = None,
                dtype: str | None = None, remat: str | None = None, compile: str = "full",
                programs: Sequence[str] = ("train", "inference"), check_layers: bool = False,
                hbm_gib: dict | Sequence[float] | None = None) -> dict:
    """The memory plan of one configuration, per device (bytes), as a JSON-able dict.

    model: a preset name (solved for `arch`) or a ModelConfig. context: tokens per sequence.
    batch: sequences per step (None: one per data x fsdp shard). mesh: 'data=1,sequence=256'
    or a MeshConfig; it runs on the first mesh-size `devices` (default: this process's).
    dtype: the compute dtype ("bfloat16": activations in bf16, parameters and optimizer in
    float32); remat: a key of titans_jax.models.REMAT_POLICIES (None: the config's).
    compile: "full" | "layers" | "none" (module docstring). hbm_gib: {label: GiB} (or sizes)
    to check the training peak against (default: v5e 16, H100 80).
    An error inside one program (a compile that fails) is recorded in its entry, not raised.
    """
    devices = list(jax.devices() if devices is None else devices)
    request = make_request(model, context=context, mesh=mesh, arch=arch, batch=batch, num_devices=len(devices),
                           dtype=dtype, remat=remat)
    if compile not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile!r}; choose one of {COMPILE_MODES}")
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"unknown programs {sorted(unknown)}; choose from {tuple(PROGRAMS)}")
    hbm = _hbm(hbm_gib)
    config = request.config
    mesh_obj = sharding.make_mesh(dataclasses.replace(request.mesh, **request.sizes), devices[:request.num_devices])
    optimizer = training.make_optimizer(training.OptimConfig(), 1000)
    state = state_bytes(abstract_state(config, optimizer), mesh_obj)
    memory_state = memory_state_bytes(config, request.local_batch, request.local_heads)
    caches = halo_cache_bytes(config, request.local_batch, request.local_heads, request.context,
                              request.sizes["sequence"])
    shards_of_weights = request.sizes["fsdp"] * request.sizes["tensor"]
    param_bytes = state["global"]["parameters"]
    counts = state["global"]["optimizer_counts"] * 4
    hand = {
        "parameters (ideal split: total / (fsdp x tensor))": param_bytes / shards_of_weights,
        "optimizer (2 x float32 per parameter + int32 counts)": 2 * 4 * state["global"]["parameter_count"]
        / shards_of_weights + counts,
        "gradients": param_bytes / shards_of_weights,
        "memory state": memory_state,
        "halo / caches": sum(caches.values()),
        **{f"activations {key}": value for key, value in activation_hand_count(request).items()
           if key in ("train_total", "inference_total")},
    }
    row = {
        "model": {"name": request.name, "arch": config.arch, "layers": config.num_layers, "d_model": config.d_model,
                  "heads": config.num_heads, "head_dim": config.head_dim, "vocab": config.vocab_size,
                  "parameters": state["global"]["parameter_count"], "dtype": config.dtype,
                  "param_dtype": config.param_dtype, "remat": config.remat},
        "context": request.context, "batch": request.batch, "mesh": dict(request.sizes),
        "mesh_text": ",".join(f"{k}={v}" for k, v in request.sizes.items() if v != 1 or k == "data"),
        "devices": request.num_devices,
        "local": {"batch": request.local_batch, "tokens": request.local_tokens, "heads": request.local_heads},
        "exact": dict(state["per_device"], **{"memory state": memory_state, "halo / caches": sum(caches.values())}),
        "caches": caches, "hand": hand, "activations_hand": activation_hand_count(request),
        "not_split": state["not_split"], "caveat": CAVEAT, "compile_mode": compile,
        "planning_flags": planning_flags_in_effect(),
    }
    for program in programs if compile != "none" else ():
        try:
            row[program] = compiled_memory(request, mesh_obj, program, compile, check_layers, optimizer)
        except Exception as error:  # noqa: BLE001 - one program's failure is part of the plan
            row[program] = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"}
    peak = row.get("train", {}).get("peak")
    row["fits"] = {label: (None if peak is None else bool(peak <= size * GIB)) for label, size in hbm.items()}
    estimate = row.get("train", {}).get("remat_estimate", {}).get("peak")
    if estimate is not None:
        row["fits_remat_estimate"] = {label: bool(estimate <= size * GIB) for label, size in hbm.items()}
    inference_peak = row.get("inference", {}).get("peak")
    row["inference_fits"] = {label: (None if inference_peak is None else bool(inference_peak <= size * GIB))
                             for label, size in hbm.items()}
    row["hbm_gib"] = hbm
    return row


def _hbm(hbm_gib) -> dict:
    if hbm_gib is None:
        return dict(HBM_GIB)
    if isinstance(hbm_gib, dict):
        return {str(k): float(v) for k, v in hbm_gib.items()}
    return {next((label for label, size in HBM_GIB.items() if size == float(v)), f"{float(v):g} GiB"): float(v)
            for v in hbm_gib}


# ----------------------------------------------------------------------------------------------
# Tables


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def markdown_table(rows: list[dict]) -> str:
    """One row per configuration: the per-device quantities in GiB, the training and inference
    peaks and whether the training peak fits each HBM size."""
    if not rows:
        raise ValueError("no rows to tabulate")
    labels = list(rows[0]["hbm_gib"])
    header = (["mesh", "B / dev", "T / dev", "params", "optimizer", "grads", "memory state", "halo / caches",
               "train temp", "train peak", "train peak, remat est.", "infer temp", "infer peak"]
              + [f"fits {label} {rows[0]['hbm_gib'][label]:g} GiB" for label in labels] + ["method", "compile s"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        train, infer = row.get("train", {}), row.get("inference", {})
        exact = row["exact"]
        cells = [row["mesh_text"], str(row["local"]["batch"]), str(row["local"]["tokens"]),
                 _gib(exact["parameters"]), _gib(exact["optimizer"]), _gib(exact["gradients"]),
                 _gib(exact["memory state"]), _gib(exact["halo / caches"]),
                 _program_cell(train, "temp"), _program_cell(train, "peak"),
                 _program_cell(train.get("remat_estimate", {}), "peak"),
                 _program_cell(infer, "temp"), _program_cell(infer, "peak")]
        for label in labels:
            verdict = {True: "yes", False: "no", None: "-"}[row["fits"][label]]
            estimate = row.get("fits_remat_estimate", {}).get(label)
            if estimate is not None and estimate != row["fits"][label]:
                verdict += f" (est. {'yes' if estimate else 'no'})"
            cells.append(verdict)
        methods = {entry.get("method") for entry in (train, infer) if entry.get("method")}
        cells.append("; ".join(sorted(methods)) or ("-" if row["compile_mode"] == "none" else "error"))
        seconds = sum(entry.get("lower_s", 0) + entry.get("compile_s", 0) for entry in (train, infer))
        cells.append(f"{seconds:.0f}" if seconds else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _program_cell(entry: dict, field: str) -> str:
    if "error" in entry:
        return "error"
    return _gib(entry.get(field))


def hand_table(rows: list[dict]) -> str:
    """The hand count beside the exact and compiled numbers (GiB per device)."""
    header = ["mesh", "params exact / ideal", "optimizer exact / ideal", "memory state", "halo / caches",
              "train activations: hand / compiled temp", "inference: hand / compiled temp"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        hand, exact = row["hand"], row["exact"]
        ideal_params = next(v for k, v in hand.items() if k.startswith("parameters"))
        ideal_opt = next(v for k, v in hand.items() if k.startswith("optimizer"))
        lines.append("| " + " | ".join([
            row["mesh_text"], f"{_gib(exact['parameters'])} / {_gib(ideal_params)}",
            f"{_gib(exact['optimizer'])} / {_gib(ideal_opt)}", _gib(exact["memory state"]),
            _gib(exact["halo / caches"]),
            f"{_gib(hand['activations train_total'])} / {_program_cell(row.get('train', {}), 'temp')}",
            f"{_gib(hand['activations inference_total'])} / {_program_cell(row.get('inference', {}), 'temp')}",
        ]) + " |")
    return "\n".join(lines)


def details(row: dict) -> str:
    """The terms of one row's hand count, its compile points and its unsplit parameters."""
    lines = [f"### {row['model']['name']} {row['model']['arch']}, mesh {row['mesh_text']}, batch {row['batch']} x "
             f"{row['context']} tokens", ""]
    hand = row["activations_hand"]
    lines.append("hand count of the training activations (GiB per device): " + "; ".join(
        f"{name} {value / GIB:.2f}" for name, value in hand["train"].items()))
    if row["caches"]:
        lines.append("halo / caches (GiB): " + "; ".join(f"{name} {value / GIB:.3f}"
                                                         for name, value in row["caches"].items()))
    for program in ("train", "inference"):
        entry = row.get(program)
        if not entry:
            continue
        if "error" in entry:
            lines.append(f"{program}: {entry['error']}")
            continue
        text = (f"{program} ({entry['method']}; lower {entry['lower_s']:.0f} s, compile {entry['compile_s']:.0f} s): "
                + ", ".join(f"{field} {entry[field] / GIB:.3f}" for field in MEMORY_FIELDS)
                + f", peak {entry['peak'] / GIB:.3f} GiB")
        lines.append(text)
        for depth, point in entry.get("points", {}).items():
            lines.append(f"  {depth} layers: "
                         + ", ".join(f"{field} {point[field] / GIB:.3f}" for field in MEMORY_FIELDS)
                         + f" GiB (lower {point['lower_s']:.0f} s, compile {point['compile_s']:.0f} s)")
        if "remat_estimate" in entry:
            estimate = entry["remat_estimate"]
            lines.append(f"  remat estimate: temp {estimate['temp'] / GIB:.3f}, peak {estimate['peak'] / GIB:.3f} GiB "
                         f"(each further layer {estimate['per_layer_temp'] / GIB:.3f} GiB by hand; XLA:CPU adds "
                         f"{estimate['compiled_per_layer_temp'] / GIB:.3f} GiB)")
        for key, check in entry.items():
            if key.startswith("check_"):
                lines.append(f"  check: {key.split('_')[1]} layers predicted peak {check['predicted_peak'] / GIB:.3f} "
                             f"GiB, compiled {check['compiled_peak'] / GIB:.3f} GiB "
                             f"({100 * check['relative_error']:+.1f}%)")
    if row.get("inference_fits") and None not in row["inference_fits"].values():
        lines.append("inference fits: " + ", ".join(f"{label} {'yes' if fits else 'no'}"
                                                    for label, fits in row["inference_fits"].items()))
    if row["not_split"]:
        lines.append(f"not split ({len(row['not_split'])} parameters; dims a mesh axis does not divide): " + "; ".join(
            f"{item['path']} {tuple(item['shape'])} {item['spec']} (rule: {item['wanted']})"
            for item in row["not_split"][:12]) + (" ..." if len(row["not_split"]) > 12 else ""))
    return "\n".join(lines)


__all__ = ["CAVEAT", "COMPILE_MODES", "HBM_GIB", "Request", "activation_hand_count", "compile_memory",
           "compiled_memory", "details", "halo_cache_bytes", "hand_table", "make_request", "markdown_table",
           "memory_layer_elements", "memory_state_bytes", "model_config", "plan_memory", "state_bytes"]
