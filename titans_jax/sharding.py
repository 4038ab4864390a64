"""Device meshes and ONE table of logical axis names -> mesh axes, for every parameter and
activation of every architecture.

Everything distributed runs on JAX's own engine: a `jax.sharding.Mesh` with the axes

    data      batch split, parameters replicated                     (data parallel)
    fsdp      batch split, parameters split too, gathered per use    (ZeRO-3 / FSDP)
    tensor    heads and MLP width split                               (tensor parallel)
    sequence  tokens split                                           (sequence / context parallel)

`NamedSharding`s on jitted programs (GSPMD) place parameters, optimiser state and batches; the
token mixers, whose recurrences the compiler cannot split along the sequence, run per shard
under `jax.shard_map` (titans_jax.sequence_parallel). The same code runs on one CPU device,
8 fake CPU devices, several processes and a TPU slice: only the MeshConfig changes.

Parameters get logical axes from their path in the parameter tree (PARAM_AXES: one row per
kind of parameter, checked to cover every parameter of every architecture), activations from
`constrain(x, ("batch", "sequence", None))` calls in the models; LOGICAL_RULES maps both to
mesh axes. A dimension that a mesh axis does not divide stays unsplit along that axis
(`logical_to_spec` drops it; `describe_shardings` lists where that happened).

Typical use (what titans_jax.training does):

    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    shardings = state_shardings(abstract_state, mesh)      # abstract_state from jax.eval_shape
    with jax.set_mesh(mesh):                                # models see the mesh while tracing
        state = jax.jit(init, out_shardings=shardings)()
        step = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)), ...)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# The one table: logical axis name -> mesh axes (None: never split).
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations and batches
    "sequence": ("sequence",),  # activations along tokens
    "embed": ("fsdp",),  # the d_model side of weights (FSDP); activations keep d_model whole
    "heads": ("tensor",),  # per-head parameters (memory M_0, gates, norms), heads of activations
    "qkv": ("tensor",),  # fused q/k/v projection outputs and the convs over them
    "inner": ("tensor",),  # heads x head_dim flattened (output gate, output projection input)
    "mlp": ("tensor",),  # SwiGLU hidden width
    "vocab": ("tensor",),  # embedding rows, lm_head columns
    "layers": None,  # a stacked-layers axis (scan over layers)
}

# Logical axes of every parameter, by the end of its path ("/"-joined keys). First match wins;
# a parameter no row matches is an error (a new parameter must be added here).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embed/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)qkv/kernel$", ("embed", "qkv")),
    (r"(^|/)(out|retrieval_out)/kernel$", ("inner", "embed")),
    (r"(^|/)(output_gate|retrieval_query)/kernel$", ("embed", "inner")),
    (r"(^|/)mlp/(gate|up)/kernel$", ("embed", "mlp")),
    (r"(^|/)mlp/down/kernel$", ("mlp", "embed")),
    (r"(^|/)conv_kernel$", (None, "qkv")),
    (r"(^|/)conv_bias$", ("qkv",)),
    (r"(^|/)retrieval_conv_kernel$", (None, "inner")),
    (r"(^|/)retrieval_conv_bias$", ("inner",)),
    (r"(^|/)gate_kernel$", ("embed", None, "heads")),
    (r"(^|/)gate_bias$", (None, "heads")),
    (r"(^|/)(memory|local_memory)/layers/\d+/w$", ("heads", None, None)),
    (r"(^|/)(memory|local_memory)/layers/\d+/b$", ("heads", None)),
    (r"(^|/)(memory|local_memory)/norm/(scale|bias)$", ("heads", None)),
    (r"(^|/)(out_norm_scale|retrieval_norm_scale)$", ("heads", None)),
    (r"(^|/)learned_queries$", ("heads", None, None)),
    (r"(^|/)persistent$", (None, "embed")),
    (r"(^|/)scale$", (None,)),  # RMSNorm scales: small, replicated
)


# ----------------------------------------------------------------------------------------------
# Meshes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; their product is the number of devices. One axis may be -1:
    the devices left over (the default puts every device on `data`)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def __post_init__(self):
        sizes = self.requested()
        for name, size in sizes.items():
            if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size <= 0 and size != -1):
                raise ValueError(f"MeshConfig.{name} must be a positive integer or -1 (the rest), got {size!r}")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1 (the rest of the devices), got {sizes}")

    def requested(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def sizes(self, num_devices: int) -> dict[str, int]:
        """The axis sizes for `num_devices` devices, -1 resolved; a clear error if they do not fit."""
        sizes = self.requested()
        known = math.prod(size for size in sizes.values() if size != -1)
        if -1 in sizes.values():
            if num_devices % known:
                raise ValueError(f"mesh {self.describe()} cannot use {num_devices} devices: the fixed axes need "
                                 f"a multiple of {known}")
            sizes = {name: (num_devices // known if size == -1 else size) for name, size in sizes.items()}
        elif known != num_devices:
            raise ValueError(f"mesh {self.describe()} needs {known} devices, {num_devices} are available "
                             "(set one axis to -1 to take the rest)")
        return sizes

    def describe(self) -> str:
        return ",".join(f"{name}={size}" for name, size in self.requested().items())

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """'data=2,sequence=4' -> MeshConfig (unnamed axes keep their defaults)."""
        fields = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in MESH_AXES:
                raise ValueError(f"mesh entries look like 'data=2,sequence=4' with axes {MESH_AXES}, got {item!r}")
            try:
                fields[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"mesh axis {name.strip()} needs an integer size, got {value!r}") from None
        if fields and -1 not in fields.values() and "data" not in fields:
            fields["data"] = 1  # everything named explicitly: no implicit rest
        return cls(**fields)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with the four axes (size-1 axes included, so every spec can name them)."""
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.sizes(len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def current_mesh():
    """The mesh set by `jax.set_mesh` (an AbstractMesh while tracing), or None -- also inside a
    `shard_map` body, whose code runs per shard and must not be split again."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or AxisType.Manual in tuple(mesh.axis_types):
        return None
    return mesh


def axis_size(name: str, mesh=None) -> int:
    """Size of a mesh axis in `mesh` (default: the current one); 1 when absent."""
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None:
        return 1
    return dict(mesh.shape).get(name, 1)


# ----------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpecs


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None) -> P:
    """PartitionSpec of an array with these logical axes on `mesh` (default: the current one).

    Mesh axes absent from the mesh, of size 1, already used by an earlier dimension, or (given
    `shape`) not dividing the dimension are left out: that dimension is then not split along
    them."""
    mesh = current_mesh() if mesh is None else mesh
    sizes = dict(mesh.shape) if mesh is not None else {}
    used: set[str] = set()
    entries = []
    for index, name in enumerate(logical):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"unknown logical axis {name!r}; the rules know {sorted(LOGICAL_RULES)}")
        axes = []
        split = 1
        for axis in (LOGICAL_RULES.get(name) or ()) if name is not None else ():
            size = sizes.get(axis, 1)
            if size == 1 or axis in used:
                continue
            if shape is not None and shape[index] % (split * size):
                continue
            axes.append(axis)
            split *= size
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes under the current mesh; nothing without one."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh)))


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _is_axes(x) -> bool:
    """A leaf of a logical-axes tree: a tuple of axis names / None (memory layers are tuples of
    dicts, so plain `isinstance(x, tuple)` would not do)."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_logical_axes(params) -> Any:
    """The logical axes of every parameter (a tree of tuples beside `params`). Stacked layers
    (a leading axis of a `blocks` subtree) get "layers" in front."""

    def axes(path, leaf):
        name = _path_name(path)
        for pattern, logical in PARAM_AXES:
            if re.search(pattern, name):
                stacked = name.startswith("blocks/") or "/blocks/" in name
                logical = (("layers",) if stacked else ()) + tuple(logical)
                if len(logical) != len(leaf.shape):
                    raise ValueError(f"parameter {name} has shape {tuple(leaf.shape)} but its sharding rule gives "
                                     f"{len(logical)} axes {logical}")
                return logical
        raise ValueError(f"no sharding rule for parameter {name} (shape {tuple(leaf.shape)}): add a row to "
                         "titans_jax.sharding.PARAM_AXES")

    return jax.tree_util.tree_map_with_path(axes, params)


def param_shardings(params, mesh: Mesh) -> Any:
    """NamedShardings for a (possibly abstract) parameter tree on `mesh`."""
    logical = param_logical_axes(params)
    return jax.tree.map(lambda axes, leaf: NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh)),
                        logical, params, is_leaf=_is_axes)


def state_shardings(state: dict, mesh: Mesh) -> dict:
    """Shardings of a training state {"params", "opt_state", "step"}: the optimiser's moments
    follow their parameters (matched by path suffix), its scalars are replicated."""
    params = param_shardings(state["params"], mesh)
    by_path = {_path_name(path): (sharding, tuple(leaf.shape)) for (path, sharding), leaf in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(state["params"]), strict=True)}
    replicated = NamedSharding(mesh, P())

    def for_leaf(path, leaf):
        parts = _path_name(path).split("/")
        for start in range(len(parts)):  # the longest suffix that names a parameter of this shape
            match = by_path.get("/".join(parts[start:]))
            if match is not None and match[1] == tuple(leaf.shape):
                return match[0]
        return replicated

    return {"params": params,
            "opt_state": jax.tree_util.tree_map_with_path(for_leaf, state["opt_state"]),
            "step": replicated}


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    """Token batches [B, T (+ 1)]: split over the batch axes only (the sequence is resharded
    inside the model, where the length divides)."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], *([None] * (rank - 1))))


def put_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global host batch onto the mesh; each process materialises only its own shards, so
    this works unchanged with several processes (each computes the same global batch)."""
    batch = np.asarray(batch)
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def describe_shardings(params, mesh: Mesh) -> list[dict]:
    """One row per parameter: path, shape, logical axes, spec, per-device shape, and the mesh
    axes its rule asked for but the shape could not take."""
    logical = param_logical_axes(params)
    rows = []
    for (path, leaf), (_, axes) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                       jax.tree_util.tree_flatten_with_path(
                                           logical, is_leaf=_is_axes)[0], strict=True):
        spec = logical_to_spec(axes, leaf.shape, mesh)
        wanted = logical_to_spec(axes, None, mesh)
        local = NamedSharding(mesh, spec).shard_shape(tuple(leaf.shape))
        rows.append({"path": _path_name(path), "shape": tuple(leaf.shape), "logical": axes, "spec": spec,
                     "per_device": local, "not_split": spec != wanted})
    return rows
