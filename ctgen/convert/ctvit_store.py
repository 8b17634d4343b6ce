"""Where CT-ViT weights live, and loading a ready-to-run `CTViT` from any of them.

- a GenerateCT file: `ctvit_pretrained.pt`, `transformer_pretrained.pt` (its `ctvit.*` block), or
  a ctgen export (`.pt` / `.safetensors`);
- a ctgen weights directory (`ctgen.train.checkpoint.save_weights`: params + VQ codebook), as
  written by `ctgen import generatect-ctvit`; its marker file records the architecture, and it
  works as `--config.init_from` and as `ctgen eval --weights`;
- a training workdir of the `ctvit` stage (config.json + its latest checkpoint).
"""
from __future__ import annotations

import json
import os

from flax import nnx

from ctgen.convert.ctvit import abstract_ctvit, import_generatect_ctvit
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.train import checkpoint as ckpt_lib


def save_ctvit_dir(path: str, cfg: CTViTConfig, state: nnx.State, *, info: dict | None = None) -> None:
    """Write a weights directory (params + VQ buffers) that records the CT-ViT architecture."""
    params, model_state = nnx.split_state(state, nnx.Param, ...)
    ckpt_lib.save_weights(path, params, model_state,
                          info={"stage": "ctvit", "ctvit_config": cfg.to_dict(), **(info or {})})


def workdir_config(workdir: str) -> CTViTConfig:
    """The CT-ViT architecture of a `ctvit` training workdir (from its config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{workdir}: no config.json (not a ctgen training workdir)")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("stage") != "ctvit":
        raise UserError(f"{workdir} is a {config.get('stage')!r} workdir, not a CT-ViT one")
    return CTViTConfig.from_dict(config["model"])


def _load(path: str, cfg: CTViTConfig | None) -> tuple[CTViTConfig, nnx.GraphDef, nnx.State]:
    if os.path.isfile(path):
        result = import_generatect_ctvit(path, cfg)
        return result.config, result.graphdef, result.state
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such file or directory")
    info = ckpt_lib.weights_info(path)
    if cfg is None:
        if info is not None:
            if "ctvit_config" not in info:
                raise UserError(f"{path}: weights directory of stage {info.get('stage')!r}, not a CT-ViT")
            cfg = CTViTConfig.from_dict(info["ctvit_config"])
        else:
            cfg = workdir_config(path)
    graphdef, abstract_state = abstract_ctvit(cfg)
    params, model_state = nnx.split_state(abstract_state, nnx.Param, ...)
    try:
        params, model_state = ckpt_lib.load_weights(path, params, model_state)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    return cfg, graphdef, nnx.merge_state(params, model_state)


def load_ctvit_state(path: str, cfg: CTViTConfig | None = None) -> tuple[CTViTConfig, nnx.State]:
    """(architecture, full state) from a GenerateCT/ctgen file, a weights directory or a workdir."""
    cfg, _, state = _load(path, cfg)
    return cfg, state


def load_ctvit(path: str, cfg: CTViTConfig | None = None) -> CTViT:
    """A ready `CTViT` module from any of the locations in this module's docstring."""
    _, graphdef, state = _load(path, cfg)
    return nnx.merge(graphdef, state)
