"""Singular Value Fine-tuning (SVF, Transformer² §3.1) as pure functions over pytrees.

Dimension letters: L layers (leading axis of stacked kernels), I/O a kernel's in/out size,
R = min(I, O) singular values, K experts.

Our kernels are stored (in, out) (y = x @ W), the transpose of the paper's W (out x in); the
singular values are the same. For each selected kernel W = U diag(s) Vt with U (L, I, R),
s (L, R), Vt (L, R, O), computed once in float32.

An expert is a pytree shaped like the selected part of the parameters, with a vector (L, R)
where each kernel was. Forms (see docs/t2.md):
  "paper"      W' = U diag(s * z) Vt                          (z = 1 reproduces W)
  "released"   z = sigmoid(p) for stored logits p, and
               W' = U diag(s * z) Vt * sum(s) / sum(s * z)    (nuclear norm preserved: any
               uniform z reproduces W; only relative values of z matter)
  "released_z" the released composition with z stored directly (what mixing returns for
               released experts: the mix is taken over z = sigmoid(p), not over the logits).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2_jax._model import Params

DEFAULT_RULE = r"layers/mlp/(gate|up|down)/kernel"
ATTENTION_QV_RULE = r"layers/attn/(q|v)/kernel"
EXPERT_FORMAT_VERSION = "1"


class ExpertMismatchError(ValueError):
    """An expert (or cached SVD) does not belong to the base model it is applied to."""


@dataclasses.dataclass(frozen=True)
class SVFForm:
    """How an expert vector becomes singular-value scales."""

    name: str
    sigmoid: bool                 # the expert holds logits p, z = sigmoid(p)
    preserve_nuclear_norm: bool   # rescale by sum(s) / sum(s * z)


FORMS = {
    "paper": SVFForm("paper", sigmoid=False, preserve_nuclear_norm=False),
    "released": SVFForm("released", sigmoid=True, preserve_nuclear_norm=True),
    "released_z": SVFForm("released_z", sigmoid=False, preserve_nuclear_norm=True),
}


def get_form(form: str | SVFForm) -> SVFForm:
    if isinstance(form, SVFForm):
        return form
    if form not in FORMS:
        raise ValueError(f"unknown SVF form {form!r}; choose one of {sorted(FORMS)}")
    return FORMS[form]


def z_form(form: str | SVFForm) -> SVFForm:
    """The form that applies z values directly with the same composition (used after mixing)."""
    form = get_form(form)
    return FORMS["released_z"] if form.preserve_nuclear_norm else FORMS["paper"]


class Factors(NamedTuple):
    u: jax.Array   # (L, I, R)
    s: jax.Array   # (L, R)
    vt: jax.Array  # (L, R, O)


# ---- paths and selection ----------------------------------------------------------------------


def _path_string(path) -> str:
    parts = []
    for key in path:
        parts.append(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))))
    return "/".join(parts)


def flatten_paths(tree) -> dict[str, Any]:
    """{"layers/mlp/gate/kernel": leaf, ...} for a nested-dict pytree."""
    return {_path_string(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_paths(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def _map_paths(fn, tree):
    """tree with each leaf replaced by fn(path string, leaf): the container types (dicts, lists of
    a Titans memory's layers, ...) are kept, unlike unflatten_paths(flatten_paths(tree))."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(_path_string(path), leaf), tree)


def select_paths(params: Params, rule: str = DEFAULT_RULE) -> list[str]:
    """Paths of the kernels an SVF rule selects (a regex that must match the whole path)."""
    pattern = re.compile(rule)
    paths = [p for p, leaf in flatten_paths(params).items()
             if pattern.fullmatch(p) and np.ndim(leaf) >= 2]
    if not paths:
        raise ValueError(f"SVF rule {rule!r} selects no matrix; paths look like "
                         f"{list(flatten_paths(params))[:4]}")
    return sorted(paths)


# ---- fingerprints and the SVD cache -----------------------------------------------------------


def fingerprint(params: Params) -> str:
    """sha256 over every leaf's path, shape, dtype and bytes: identifies a base model."""
    digest = hashlib.sha256()
    for path, leaf in sorted(flatten_paths(params).items()):
        array = np.asarray(leaf)
        digest.update(f"{path}|{array.shape}|{array.dtype}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _svd(matrices: np.ndarray) -> Factors:
    # LAPACK (numpy) per matrix: on CPU it is several times faster than XLA's SVD.
    matrices = np.asarray(matrices, np.float32)
    parts = [np.linalg.svd(m, full_matrices=False)
             for m in matrices.reshape(-1, *matrices.shape[-2:])]
    lead = matrices.shape[:-2]
    u, s, vt = (np.stack([p[i] for p in parts]).reshape(lead + parts[0][i].shape) for i in range(3))
    return Factors(jnp.asarray(u), jnp.asarray(s), jnp.asarray(vt))


def compute_svd(params: Params, rule: str = DEFAULT_RULE) -> dict[str, Factors]:
    """float32 SVD (LAPACK gesdd) of every selected kernel, for each layer of the stack."""
    flat = flatten_paths(params)
    return {path: _svd(flat[path]) for path in select_paths(params, rule)}


def _rule_tag(rule: str) -> str:
    return hashlib.sha256(rule.encode()).hexdigest()[:12]


def svd_cached(params: Params, rule: str = DEFAULT_RULE,
               cache_dir: str | pathlib.Path | None = None,
               base_fingerprint: str | None = None) -> dict[str, Factors]:
    """compute_svd, cached on disk under the base model's fingerprint and the rule.

    File: <cache_dir>/<fingerprint[:16]>-<rule hash>.npz (cache_dir default
    $TITANS_JAX_CACHE/t2_svd). A file whose stored fingerprint or rule differs is refused.
    """
    from t2_jax.fetch import cache_root

    base_fingerprint = base_fingerprint or fingerprint(params)
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else cache_root() / "t2_svd"
    file = cache_dir / f"{base_fingerprint[:16]}-{_rule_tag(rule)}.npz"
    if file.exists():
        with np.load(file) as data:
            meta = json.loads(str(data["__meta__"]))
            if meta["fingerprint"] != base_fingerprint or meta["rule"] != rule:
                raise ExpertMismatchError(f"SVD cache {file} belongs to base {meta['fingerprint']} "
                                          f"rule {meta['rule']!r}, not {base_fingerprint} {rule!r}")
            return {path: Factors(*(jnp.asarray(data[f"{path}::{part}"])
                                    for part in Factors._fields))
                    for path in meta["paths"]}
    factors = compute_svd(params, rule)
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"{path}::{part}": np.asarray(getattr(f, part))
              for path, f in factors.items() for part in Factors._fields}
    meta = {"fingerprint": base_fingerprint, "rule": rule, "paths": sorted(factors)}
    partial = file.with_suffix(".partial.npz")
    np.savez(partial, __meta__=np.asarray(json.dumps(meta)), **arrays)
    partial.replace(file)
    return factors


# ---- experts ------------------------------------------------------------------------------------


def init_expert(svd: Mapping[str, Factors], form: str | SVFForm = "paper",
                key: jax.Array | None = None, noise_std: float = 0.01) -> dict:
    """A fresh expert. paper: z = 1 (+ noise) so W' = W. released: logits p = 0.1 + noise
    (the released code's init_val 0.1 with N(0, 0.01^2) noise)."""
    form = get_form(form)
    base = 0.1 if form.sigmoid else 1.0
    flat = {}
    for i, (path, f) in enumerate(sorted(svd.items())):
        value = jnp.full(f.s.shape, base, jnp.float32)
        if key is not None and noise_std:
            value = value + noise_std * jax.random.normal(jax.random.fold_in(key, i), f.s.shape)
        flat[path] = value
    return unflatten_paths(flat)


def _check_expert(svd: Mapping[str, Factors], flat_expert: Mapping[str, Any]) -> None:
    if set(flat_expert) != set(svd):
        raise ExpertMismatchError(f"expert covers {sorted(flat_expert)}, the SVD covers "
                                  f"{sorted(svd)}: they were made with different selection rules")
    for path, f in svd.items():
        if jnp.shape(flat_expert[path]) != f.s.shape:
            raise ExpertMismatchError(f"expert vector {path} has shape "
                                      f"{jnp.shape(flat_expert[path])}, the base model's "
                                      f"singular values have shape {f.s.shape}")


def singular_value_scales(svd: Mapping[str, Factors], expert, form: str | SVFForm = "paper"
                          ) -> dict[str, jax.Array]:
    """{path: s'} with W' = U diag(s') Vt for each selected kernel (the form's formula).
    The base factors are constants: gradients reach only the expert."""
    form = get_form(form)
    flat_expert = flatten_paths(expert)
    _check_expert(svd, flat_expert)
    scales = {}
    for path, f in svd.items():
        s = jax.lax.stop_gradient(f.s)
        z = flat_expert[path].astype(jnp.float32)
        if form.sigmoid:
            z = jax.nn.sigmoid(z)
        scaled = s * z
        if form.preserve_nuclear_norm:
            scaled = scaled * (s.sum(-1, keepdims=True) / scaled.sum(-1, keepdims=True))
        scales[path] = scaled
    return scales


def compose(params: Params, svd: Mapping[str, Factors], expert,
            form: str | SVFForm = "paper") -> Params:
    """params with every selected kernel replaced by W' = U diag(s') Vt (rebuilt, in the
    kernel's dtype). Unselected leaves are returned as constants (stop_gradient)."""
    scales = singular_value_scales(svd, expert, form)

    def rebuild(path, leaf):
        leaf = jax.lax.stop_gradient(leaf)
        scale = scales.get(path)
        if scale is None:
            return leaf
        u, vt = jax.lax.stop_gradient(svd[path].u), jax.lax.stop_gradient(svd[path].vt)
        return ((u * scale[..., None, :]) @ vt).astype(leaf.dtype)

    return _map_paths(rebuild, params)


def factorise(params: Params, svd: Mapping[str, Factors], expert,
              form: str | SVFForm = "paper") -> Params:
    """params with every selected kernel replaced by {"u", "scale", "vt"}: the model then
    computes ((x @ U) * s') @ Vt and never rebuilds W' (t2_jax.dense)."""
    scales = singular_value_scales(svd, expert, form)

    def replace(path, leaf):
        leaf = jax.lax.stop_gradient(leaf)
        scale = scales.get(path)
        if scale is None:
            return leaf
        return {"u": jax.lax.stop_gradient(svd[path].u).astype(leaf.dtype), "scale": scale,
                "vt": jax.lax.stop_gradient(svd[path].vt).astype(leaf.dtype)}

    return _map_paths(replace, params)


def to_z(expert, form: str | SVFForm = "paper"):
    """The expert's z values (sigmoid of the logits for the released form)."""
    form = get_form(form)
    return jax.tree.map(jax.nn.sigmoid, expert) if form.sigmoid else expert


def mix_experts(experts: Sequence[Any], alpha, form: str | SVFForm = "paper"):
    """z' = sum_k alpha_k z_k, taken over z values (sigmoid applied first for released-form
    experts, unlike the released code which mixes logits). Apply the result with z_form(form).

    alpha: (K,) one weight per expert, or a pytree shaped like an expert whose leaves are (K,)
    (per expert per matrix) or (K, L) (per expert per matrix per layer).
    """
    if not experts:
        raise ValueError("mix_experts needs at least one expert")
    zs = [to_z(e, form) for e in experts]
    structure = jax.tree.structure(zs[0])
    for z in zs[1:]:
        if jax.tree.structure(z) != structure:
            raise ExpertMismatchError("experts to mix have different structures")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *zs)  # leaves (K, L, R)
    K = len(experts)
    if isinstance(alpha, (jax.Array, np.ndarray, list, tuple)):
        alpha = jnp.asarray(alpha, jnp.float32)
        if alpha.shape != (K,):
            raise ValueError(f"alpha must have shape ({K},) or be a pytree of per-matrix weights,"
                             f" got shape {alpha.shape}")
        alpha = jax.tree.map(lambda _: alpha, zs[0])
    if jax.tree.structure(alpha) != structure:
        raise ValueError("a per-matrix alpha must be a pytree shaped like the experts")

    def mix(a, z):
        a = jnp.asarray(a, jnp.float32)
        if a.shape[0] != K:
            raise ValueError(f"alpha leaf has leading size {a.shape[0]}, expected {K} experts")
        a = a.reshape(a.shape + (1,) * (z.ndim - a.ndim))
        return jnp.sum(a * z, axis=0)

    return jax.tree.map(mix, alpha, stacked)


# ---- saving and loading experts ------------------------------------------------------------------


def save_expert(path: str | pathlib.Path, expert, *, base_fingerprint: str, rule: str,
                form: str | SVFForm, extra: Mapping[str, str] | None = None) -> pathlib.Path:
    """Write an expert as safetensors with its metadata (base fingerprint, rule, form)."""
    from safetensors.numpy import save_file

    form = get_form(form)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "t2_jax.svf_expert", "format_version": EXPERT_FORMAT_VERSION,
                "base_fingerprint": base_fingerprint, "rule": rule, "form": form.name}
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"extra metadata may not override {key!r}")
        metadata[key] = str(value)
    tensors = {p: np.ascontiguousarray(np.asarray(v, np.float32))
               for p, v in flatten_paths(expert).items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_expert(path: str | pathlib.Path, base_fingerprint: str | None = None,
                svd: Mapping[str, Factors] | None = None, *, params: Params | None = None,
                allow_other_base: bool = False) -> tuple[dict, dict[str, str]]:
    """Read an expert and its metadata, checking that it was trained on the base model it will
    be applied to: give that model as base_fingerprint (t2_jax.fingerprint(params)) or as params.

    The file records its base's fingerprint; an expert of another base, or a call naming no
    base, is refused (ExpertMismatchError / ValueError) unless allow_other_base=True, which
    loads it with a warning. With svd, the expert's paths and shapes are checked against it.
    """
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"expert file {path} not found")
    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        flat = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}
    if metadata.get("format") != "t2_jax.svf_expert":
        raise ValueError(f"{path} is not a t2_jax SVF expert (metadata {metadata})")
    if params is not None:
        if base_fingerprint is not None and base_fingerprint != fingerprint(params):
            raise ValueError("load_expert: base_fingerprint and params name different models")
        base_fingerprint = fingerprint(params)
    recorded = metadata.get("base_fingerprint")
    problem = None
    if recorded is None:
        problem = f"expert {path} records no base model fingerprint"
    elif base_fingerprint is None:
        if not allow_other_base:
            raise ValueError(
                f"load_expert({path}): the expert was trained on base model {recorded[:16]}…; "
                "name the model it will be applied to with base_fingerprint="
                "t2_jax.fingerprint(params) or params=params (or pass allow_other_base=True "
                "to load it unchecked)")
        problem = f"expert {path} (base model {recorded[:16]}…) is loaded without a base check"
    elif recorded != base_fingerprint:
        problem = (f"expert {path} was trained on base model {recorded[:16]}…, but it is being "
                   f"loaded onto base model {base_fingerprint[:16]}…")
    if problem is not None:
        if not allow_other_base:
            raise ExpertMismatchError(problem + "; refusing to apply it to the wrong model (pass "
                                      "allow_other_base=True to override)")
        warnings.warn(problem + " (allow_other_base=True)", stacklevel=2)
    if svd is not None:
        _check_expert(svd, flat)
    return unflatten_paths(flat), metadata
