"""Reading and writing PyTorch state_dict files (`.pt`/`.pth`/`.bin` and `.safetensors`), never
unpickling arbitrary objects.

`.safetensors` is read lazily from its documented layout (8-byte little-endian header size, JSON
header, raw little-endian tensors): bfloat16 needs no PyTorch, and tensors nobody converts (a T5
decoder, a VGG that a tokenizer load skips) are never read. `.pt` files go through
`torch.load(weights_only=True)`: a plain dict of tensors, bfloat16 kept as `ml_dtypes.bfloat16`.
Writing: `.safetensors` with the safetensors package, `.pt` as `torch.save` of a plain dict.
Checkpoints that nest state_dicts with other entries (GenerateCT's trainer checkpoints: `model`,
`ema`, `steps`, optimizer state) go through `read_torch_object` / `write_torch_object`, with the
same `weights_only=True` rule.
"""
from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ctgen.errors import UserError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class LazyTensor:
    """A tensor in a file, read on `np.asarray` (conversions only read what they use)."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        count = int(np.prod(self.shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            buf = f.read(count * self.dtype.itemsize)
        if len(buf) != count * self.dtype.itemsize:
            raise UserError(f"{self.path}: truncated tensor data at byte {self.offset}")
        arr = np.frombuffer(buf, dtype=self.dtype.newbyteorder("<")).reshape(self.shape)
        arr = arr.astype(self.dtype.newbyteorder("="), copy=True)
        return arr if dtype is None else arr.astype(dtype)


def read_safetensors(path: str) -> dict[str, LazyTensor]:
    """Lazy tensors of one `.safetensors` file, validated against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise UserError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UserError(f"{path} is not a safetensors file (header size {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a safetensors file (bad header: {e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (header is not a JSON object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: bad header entry for tensor {name!r} ({e!r})") from None
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or 8 + n + end > size:
            raise UserError(f"{path}: tensor {name!r} has inconsistent offsets {begin}..{end} for shape {shape}")
        out[name] = LazyTensor(path, 8 + n + begin, shape, dtype)
    return out


def _torch(path: str):
    try:
        import torch
    except ImportError:
        raise UserError(f"reading or writing {path} needs PyTorch (pip install 'ctgen[torch]'), or use a "
                        ".safetensors file") from None
    return torch


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A `.pt`/`.bin` state_dict as numpy arrays; never unpickles anything but tensors."""
    torch = _torch(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} could not be loaded as a plain PyTorch state_dict "
                        f"(weights_only=True): {type(e).__name__}: {e}") from None
    if not isinstance(sd, Mapping):
        raise UserError(f"{path} holds a {type(sd).__name__}, expected a state_dict of tensors")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().cpu()
        out[k] = v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
    return out


def read_state_dict(path: str) -> dict[str, Any]:
    """Tensors of a `.safetensors` file (lazy) or a PyTorch `.pt`/`.pth`/`.bin` file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return dict(read_safetensors(path))
    return read_torch(path)


def write_state_dict(state_dict: Mapping[str, Any], path: str) -> None:
    """Write a state_dict as `.safetensors` or as `.pt`/`.pth`/`.bin` (torch.save of a plain
    dict of tensors), in the given key order."""
    if not path.endswith((".safetensors", *TORCH_SUFFIXES)):
        raise UserError(f"{path}: unknown output format; use a .pt or .safetensors file name")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
        return
    torch = _torch(path)
    torch.save(OrderedDict((k, torch.from_numpy(np.require(v, None, ["C_CONTIGUOUS", "WRITEABLE"])))
                           for k, v in state_dict.items()), path)


def _to_numpy(obj: Any, torch) -> Any:
    if isinstance(obj, torch.Tensor):
        v = obj.detach().cpu()
        return v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v, torch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v, torch) for v in obj)
    return obj


def read_torch_object(path: str) -> Any:
    """A `.pt` file holding nested dicts/lists of tensors and plain values (a trainer checkpoint),
    tensors as numpy arrays; loaded with `weights_only=True`, so nothing else is unpickled."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    torch = _torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} could not be loaded with weights_only=True (plain tensors and containers "
                        f"only): {type(e).__name__}: {e}") from None
    return _to_numpy(obj, torch)


def write_torch_object(obj: Mapping[str, Any], path: str) -> None:
    """`torch.save` of nested dicts of numpy arrays (as tensors, key order kept) and plain values."""
    torch = _torch(path)

    def tensors(x):
        if isinstance(x, np.ndarray) or isinstance(x, np.generic):
            return torch.from_numpy(np.require(np.asarray(x), None, ["C_CONTIGUOUS", "WRITEABLE"]))
        if isinstance(x, Mapping):
            return OrderedDict((k, tensors(v)) for k, v in x.items())
        return x

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(tensors(obj), path)
