"""Reading Hugging Face weight files without unpickling arbitrary objects.

`model.safetensors` (single or sharded with `model.safetensors.index.json`) is read lazily from
its documented layout (8-byte little-endian header size, JSON header, raw little-endian
tensors), so bfloat16 tensors need no PyTorch and unused tensors (a T5 decoder) are never read.
`pytorch_model.bin` (single or sharded) goes through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from ctgen.errors import UserError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class LazyTensor:
    """A tensor in a file, read on `np.asarray` (namemap conversions only read what they use)."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), np.dtype(dtype)

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


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """A `pytorch_model.bin` state dict as numpy arrays; never unpickles arbitrary objects."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs PyTorch (pip install 'ctgen[torch]'), or convert the "
                          "weights to model.safetensors") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} could not be loaded as a plain PyTorch state dict "
                         f"(weights_only=True): {e}") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, expected a state dict of tensors")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.dtype == torch.bfloat16:
            out[k] = v.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[k] = v.numpy()
    return out


def _read_index(directory: str, index_name: str, reader) -> dict[str, Any]:
    path = os.path.join(directory, index_name)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid shard index (needs a 'weight_map'): {e!r}") from None
    out: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise UserError(f"{path} names shard {shard}, which is missing from {directory}")
        out.update(reader(shard_path))
    return out


def read_hf_weights(directory: str) -> tuple[dict[str, Any], str]:
    """All tensors of a Hugging Face model directory (lazy where possible), and the file they came from."""
    for name, reader, index in (
        (SAFETENSORS, read_safetensors, False), (SAFETENSORS_INDEX, read_safetensors, True),
        (TORCH_BIN, read_torch_bin, False), (TORCH_BIN_INDEX, read_torch_bin, True),
    ):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return (_read_index(directory, name, reader) if index else reader(path)), path
    raise UserError(f"{directory} has a config.json but no weights: expected one of {', '.join(WEIGHT_FILES)}")
