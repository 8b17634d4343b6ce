"""Device mesh from the config: axes `data`, `fsdp`, `tensor`, one of them may be -1 (= the rest).

- `data`: pure data parallelism (parameters replicated).
- `fsdp`: data parallelism with parameters and optimizer state sharded (ZeRO-3 style).
- `tensor`: model (tensor) parallelism inside layers.
Batches are split over the mesh axes of the sharding rules' `batch` rule (by default `data` x
`fsdp`; see `ctgen.parallel.axes`). Axes are `Auto` so XLA propagates shardings from the
parameters' logical axes (see `ctgen.parallel.axes`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ctgen.errors import UserError
from ctgen.parallel.axes import DEFAULT_RULES, batch_axes

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(UserError):
    pass


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Turn the config's axis sizes (one may be -1) into a concrete shape for `num_devices`."""
    unknown = [k for k in sizes if k not in MESH_AXES]
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
    bad = [MESH_AXES[i] for i, s in enumerate(shape) if s == 0 or s < -1]
    if bad:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))}: axis sizes must be positive or -1 ({bad})")
    fixed = int(np.prod([s for s in shape if s != -1]))
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"mesh {dict(zip(MESH_AXES, shape))}: the fixed axes multiply to {fixed}, which does "
                f"not divide the {num_devices} available devices"
            )
        shape[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {fixed} devices but {num_devices} are "
            f"available; set one axis to -1 to use all devices, e.g. --config.mesh.fsdp=-1"
        )
    return tuple(shape)  # type: ignore[return-value]


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        # Topology-aware device order (TPU ICI rings, multi-host blocks).
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh | None, rules=DEFAULT_RULES) -> int:
    """How many ways a batch is split: over the mesh axes of the rules' `batch` rule (1 without a mesh)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in batch_axes(rules, mesh)]))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES) + f" ({mesh.size} devices)"
