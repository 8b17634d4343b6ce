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

from ctgen.convert.ctvit import import_generatect_ctvit
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


def load_ctvit_state(path: str, cfg: CTViTConfig | None = None) -> tuple[CTViTConfig, nnx.State]:
    """(architecture, full state) from a GenerateCT/ctgen file, a weights directory or a workdir."""
    if os.path.isfile(path):
        result = import_generatect_ctvit(path, cfg)
        return result.config, result.state
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
    abstract = nnx.eval_shape(lambda: CTViT(cfg, rngs=nnx.Rngs(0)))
    _, params, model_state = nnx.split(abstract, nnx.Param, ...)
    try:
        params, model_state = ckpt_lib.load_weights(path, params, model_state)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    return cfg, nnx.merge_state(params, model_state)


def load_ctvit(path: str, cfg: CTViTConfig | None = None) -> CTViT:
    """A ready `CTViT` module from any of the locations in this module's docstring."""
    cfg, state = load_ctvit_state(path, cfg)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CTViT(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, state)
