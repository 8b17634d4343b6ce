"""Logical axis names on parameters, and the one rules table that maps them onto the mesh.

Every parameter in ctgen is created with logical axis names (t5x vocabulary, extended for
convolutions and codebooks). The names say what a dimension *is*; the config's
`sharding_rules` say which mesh axis (`data`, `fsdp`, `tensor`) it is split over. Models never
name mesh axes themselves, so one model runs unchanged on any mesh.

Vocabulary (use these; add a name here before using a new one):
  batch, length, embed, mlp, heads, kv, vocab, joined_kv,
  conv_in, conv_out, conv_k (kernel taps), codebook, norm (1-D scales/biases), pos.

Activations and input batches go through the same table. Input batches are split over the
mesh axes of the `batch` rule (`batch_axes`, `logical_sharding`). Inside a jitted function,
`constrain(x, ("batch", "length", "embed"))` pins an activation's sharding by logical names; it
reads the mesh and rules from `activation_sharding(mesh, rules)`, which the code that traces the
function enters *inside* the traced function (the train step, eval/preview, T5 encoding), so the
constraint is fixed in the compiled program. Outside such a block `constrain` does nothing.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ctgen.errors import UserError

LOGICAL_AXES = (
    "batch", "length", "embed", "mlp", "heads", "kv", "vocab", "joined_kv",
    "conv_in", "conv_out", "conv_k", "codebook", "norm", "pos",
)

# (logical name, mesh axis or tuple of mesh axes or None). The first rule whose mesh axes are
# still free in this parameter and divide the dimension wins; otherwise the dimension is
# replicated. t5x/maxtext style.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("joined_kv", "tensor"),
    ("vocab", "tensor"),
    ("vocab", "fsdp"),
    ("codebook", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", "tensor"),
    ("kv", None),
    ("length", None),
    ("conv_k", None),
    ("norm", None),
    ("pos", None),
)


def _check_names(names: Sequence[str | None]) -> tuple[str | None, ...]:
    for n in names:
        if n is not None and n not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {n!r}; known: {LOGICAL_AXES}")
    return tuple(names)


def with_axes(init: Callable, *names: str | None) -> Callable:
    """Wrap an initializer so the created `nnx.Param` carries logical axis `names`.

    Eager sharding is off: ctgen shards state itself (abstract init, then a jitted init with
    out_shardings), so a model can also be built with no mesh at all (tests, conversion).
    """
    return nnx.with_partitioning(init, _check_names(names), eager_sharding=False)


def param(value: jax.Array | np.ndarray, *names: str | None, cls=nnx.Param) -> nnx.Variable:
    """A variable (default `nnx.Param`) holding `value` with logical axis `names`."""
    names = _check_names(names)
    if len(names) != np.ndim(value):
        raise ValueError(f"{len(names)} axis names {names} for a value of shape {np.shape(value)}")
    return cls(value, out_sharding=names, eager_sharding=False)


def logical_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on a variable (None if it has none)."""
    md = var.get_metadata()
    names = md.get("out_sharding")
    return tuple(names) if names else None


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def spec_for(names: Sequence[str | None] | None, shape: Sequence[int], rules, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array with logical `names` and `shape` under `rules` on `mesh`.

    Mesh axes of size 1 are dropped; a mesh axis is used at most once per array; a dimension is
    only split if the product of its mesh axes divides it (otherwise the next rule is tried,
    then replication) so odd sizes like 1365 never fail to shard.
    """
    if not names:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ValueError(f"axis names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        choice = None
        if name is not None:
            for logical, axes in rules:
                if logical != name:
                    continue
                axes = tuple(a for a in _as_tuple(axes) if mesh.shape.get(a, 1) > 1)
                if not axes:
                    continue
                if used.intersection(axes):
                    continue
                size = int(np.prod([mesh.shape[a] for a in axes]))
                if dim % size:
                    continue
                choice = axes[0] if len(axes) == 1 else axes
                used.update(axes)
                break
        out.append(choice)
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, rules, mesh: Mesh) -> nnx.State:
    """NamedShardings for every variable of an (abstract or concrete) NNX state."""

    def one(x):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            spec = spec_for(logical_names(x), np.shape(value), rules, mesh)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, spec_for(None, np.shape(x), rules, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_shardings(tree, rules, mesh: Mesh):
    """Like `state_shardings` for any pytree whose leaves may be NNX variables or arrays."""
    return state_shardings(tree, rules, mesh)


def abstract_on_mesh(tree, rules, mesh: Mesh):
    """`tree` (abstract or concrete; NNX variables or arrays) as ShapeDtypeStructs carrying their
    shardings on `mesh`: the target to create or restore state straight into its shards."""
    shardings = tree_shardings(tree, rules, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def rules_from_config(rules_cfg) -> tuple[tuple[str, Any], ...]:
    """Normalise a config's `sharding_rules` (list of [logical, mesh axes]) and validate names."""
    out = []
    for item in rules_cfg:
        if len(item) != 2:
            raise UserError(f"sharding rule {item!r} must be [logical_name, mesh_axes]")
        logical, axes = item
        _check_names([logical])
        axes = None if axes in (None, "", "none", "None") else axes
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in _as_tuple(axes):
            if a not in ("data", "fsdp", "tensor"):
                raise UserError(f"sharding rule {item!r}: mesh axis {a!r} is not one of data/fsdp/tensor")
        out.append((logical, axes))
    return tuple(out)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], rules, mesh: Mesh) -> NamedSharding:
    """NamedSharding of an array (parameter, batch or activation) with logical `names` and `shape`."""
    return NamedSharding(mesh, spec_for(names, shape, rules, mesh))


def batch_axes(rules, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes input batches are split over: those of the first `batch` rule with an axis of
    size > 1 (as `spec_for` picks for any batch size they divide), () if none."""
    for logical, axes in rules:
        axes = _as_tuple(axes)
        if logical == "batch" and any(mesh.shape.get(a, 1) > 1 for a in axes):
            return axes
    return ()


def describe_batch_axes(rules, mesh: Mesh) -> str:
    """E.g. "data*fsdp=8": the batch axes and how many ways they split a batch (for messages)."""
    axes = batch_axes(rules, mesh)
    return f"{'*'.join(axes) or 'no mesh axis'}={int(np.prod([mesh.shape[a] for a in axes]))}"


_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("ctgen_activation_sharding",
                                                                                      default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules) -> Iterator[None]:
    """Within this block (entered while a function is traced), `constrain` shards activations on
    `mesh` by `rules`. mesh=None: `constrain` stays a no-op."""
    token = _ACTIVE.set(None if mesh is None else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain activation `x` to the sharding its logical axis `names` get under the active
    `activation_sharding` rules (a dimension the rules cannot split evenly stays replicated);
    returns `x` unchanged when no `activation_sharding` block is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, logical_sharding(_check_names(names), x.shape, rules, mesh))
