"""Reading T5X checkpoints (the msgpack + TensorStore layout of the published `t5_1_1_*` models).

The layout, as google-research/t5x writes it (`t5x/checkpoints.py`):

    <model_dir>/checkpoint_<step>/checkpoint            msgpack (flax.serialization) of
        {"version": 3, "optimizer": {"target": {...params...}, "state": {"step", "param_states"}}}
        (version 0: the state dict itself, no "version"/"optimizer" wrapper)
    <model_dir>/checkpoint_<step>/target.encoder.layers_0.attention.query.kernel/
        a zarr array (gzip chunks), one per partitioned parameter

In the msgpack, a parameter small enough or unpartitioned is stored inline as an array; a
partitioned one is replaced by its TensorStore spec, e.g. `{"driver": "zarr", "kvstore":
{"driver": "file", "path": "target.encoder...."}, "metadata": {...}}`, with the path relative
to the checkpoint directory (`gcs` kvstores with a placeholder bucket when written to GCS; older
tensorstore versions put `path` at the top level). Newer layouts put the msgpack in
`checkpoint_<step>/state/checkpoint`.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ctgen.errors import UserError

CHECKPOINT_FILE = "checkpoint"
_STEP_DIR = re.compile(r"checkpoint_(\d+)\Z")


def find_t5x_checkpoint(path: str) -> str | None:
    """The msgpack file of the T5X checkpoint at `path` (a step dir, a model dir with
    `checkpoint_<step>` subdirs — the highest step wins — or the file itself); None if not T5X."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path if os.path.basename(path) == CHECKPOINT_FILE and _is_msgpack_checkpoint(path) else None
    if not os.path.isdir(path):
        return None
    for cand in (os.path.join(path, CHECKPOINT_FILE), os.path.join(path, "state", CHECKPOINT_FILE)):
        if os.path.isfile(cand) and _is_msgpack_checkpoint(cand):
            return cand
    steps = []
    for name in os.listdir(path):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(path, name)):
            steps.append((int(m.group(1)), name))
    for _, name in sorted(steps, reverse=True):
        found = find_t5x_checkpoint(os.path.join(path, name))
        if found:
            return found
    return None


def _is_msgpack_checkpoint(path: str) -> bool:
    # A msgpack map starts with 0x80-0x8f (fixmap), 0xde or 0xdf; Orbax metadata files are JSON.
    with open(path, "rb") as f:
        first = f.read(1)
    return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def _is_ts_spec(node: Any) -> bool:
    return isinstance(node, dict) and "driver" in node and ("kvstore" in node or "path" in node)


class TensorStoreArray:
    """A parameter stored as a zarr array next to the msgpack; read on `np.asarray`."""

    def __init__(self, spec: dict, ckpt_dir: str, name: str):
        self.name = name
        rel = spec["kvstore"].get("path") if isinstance(spec.get("kvstore"), dict) else None
        rel = rel if rel is not None else spec.get("path")
        if not isinstance(rel, str) or not rel:
            raise UserError(f"{ckpt_dir}: TensorStore spec of {name!r} has no path: {spec}")
        root = os.path.realpath(ckpt_dir)
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([root, full]) != root:
            raise UserError(f"{ckpt_dir}: TensorStore path of {name!r} points outside the checkpoint: {rel!r}")
        if not os.path.isdir(full):
            raise UserError(f"T5X checkpoint {ckpt_dir} is incomplete: parameter {name!r} should be "
                                    f"stored in {full}, which is missing")
        self.path = full
        self._store = None

    def _open(self):
        if self._store is None:
            import tensorstore as ts

            try:
                self._store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": self.path}},
                                      open=True, read=True).result()
            except Exception as e:
                raise UserError(f"cannot open zarr array {self.path} (parameter {self.name!r}): {e}") from None
            if self._store.dtype.name == "uint16":
                raise UserError(f"{self.path}: uint16-encoded bfloat16 (T5X checkpoint version < 3) is not "
                                 "supported; re-save the checkpoint with a current T5X")
        return self._store

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._open().shape)

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self._open().read().result())
        return arr if dtype is None else arr.astype(dtype)


def read_t5x_checkpoint(msgpack_path: str) -> dict[str, Any]:
    """Flat `{'target/encoder/...': array or TensorStoreArray}` of a T5X checkpoint (lazy for TensorStore)."""
    from flax import serialization

    ckpt_dir = os.path.dirname(os.path.abspath(msgpack_path))
    with open(msgpack_path, "rb") as f:
        raw = f.read()
    try:
        contents = serialization.msgpack_restore(raw)  # msgpack with ndarray ext types; no pickle
    except Exception as e:
        raise UserError(f"{msgpack_path} is not a T5X msgpack checkpoint: {e}") from None
    if not isinstance(contents, dict):
        raise UserError(f"{msgpack_path} is not a T5X checkpoint (top level is {type(contents).__name__})")
    version = contents.get("version", 0)
    if version == 0:
        state = contents
    elif version >= 2 and isinstance(contents.get("optimizer"), dict):
        state = contents["optimizer"]
    else:
        raise UserError(f"{msgpack_path}: unsupported T5X checkpoint version {version!r} "
                         "(supported: 0, and 2 or later with an 'optimizer' entry)")
    if "target" not in state:
        raise UserError(f"{msgpack_path}: no 'target' (model parameters) in the T5X checkpoint; "
                         f"top-level keys: {sorted(state)}")
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if _is_ts_spec(node):
            flat[prefix] = TensorStoreArray(node, ckpt_dir, prefix)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif node is not None:
            flat[prefix] = node

    walk("", state)
    return flat


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
