"""Reading the weights of a Hugging Face model directory without unpickling arbitrary objects.

`model.safetensors` or `pytorch_model.bin`, single or sharded (`*.index.json`); the files are read
by `ctgen.convert.torch_files` (safetensors lazily, so a T5 decoder is never read).
"""
from __future__ import annotations

import json
import os
from typing import Any

from ctgen.convert.torch_files import read_safetensors, read_torch
from ctgen.errors import UserError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)


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
        (TORCH_BIN, read_torch, False), (TORCH_BIN_INDEX, read_torch, True),
    ):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return (_read_index(directory, name, reader) if index else reader(path)), path
    raise UserError(f"{directory} has a config.json but no weights: expected one of {', '.join(WEIGHT_FILES)}")
