"""Where MaskGIT weights live, and loading them for use (training init, eval, export, generation).

- a GenerateCT file: `transformer_pretrained.pt` (its `maskgit.*` block) or a ctgen export
  (`.pt` / `.safetensors`);
- a ctgen weights directory (model "maskgit"), as written by `ctgen import generatect-transformer`,
  whose marker names the CT-ViT tokenizer that goes with it (`"tokenizer"`, relative to the
  directory: the import puts the file's `ctvit.*` block in `DIR/tokenizer`);
- a training workdir of the `maskgit` stage (config.json + its latest checkpoint; the tokenizer
  is its `tokenizer.weights`).

The MaskGIT's state sits at the root of the tree, as the stage's model; `load_maskgit` restores it
straight onto a mesh if given.
"""
from __future__ import annotations

import os

from flax import nnx
from jax.sharding import Mesh

from ctgen.errors import UserError
from ctgen.models.maskgit import MaskGIT, MaskGITConfig
from ctgen.weights import abstract_model, load_model, load_weights, save_weights, weights_info
from ctgen.weights import workdir_config as read_workdir_config

MODEL = "maskgit"  # the `model` a weights directory records for a MaskGIT
TOKENIZER_DIR = "tokenizer"  # where an import puts the CT-ViT, inside the MaskGIT's directory


def save_maskgit_dir(path: str, cfg: MaskGITConfig, state: nnx.State, *, tokenizer: str = "",
                     info: dict | None = None) -> None:
    """Write a weights directory of a MaskGIT; `tokenizer` (a path, relative to `path` or absolute)
    names the CT-ViT whose codes it models."""
    params, rest = nnx.split_state(state, nnx.Param, ...)
    save_weights(path, params, rest, model=MODEL, model_config=cfg.to_dict(),
                 info={**(info or {}), "tokenizer": tokenizer})


def _workdir(workdir: str) -> dict:
    return read_workdir_config(workdir, "maskgit", "MaskGIT")


def stored_config(path: str) -> tuple[MaskGITConfig, str]:
    """(architecture, tokenizer path or "") recorded by a weights directory or a training workdir."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such directory")
    info = weights_info(path)
    if info is None:
        config = _workdir(path)
        return MaskGITConfig.from_dict(config["model"]), config.get("tokenizer", {}).get("weights", "")
    if info["model"] != MODEL:
        raise UserError(f"{path}: weights directory of model {info['model']!r}, not a MaskGIT")
    tokenizer = info.get("tokenizer", "")
    if tokenizer and not os.path.isabs(tokenizer):
        tokenizer = os.path.join(path, tokenizer)
    return MaskGITConfig.from_dict(info["model_config"]), tokenizer


def tokenizer_path(path: str) -> str:
    """The CT-ViT that goes with the MaskGIT at `path` ("" if none is recorded); a GenerateCT file
    is its own tokenizer (its `ctvit.*` block)."""
    return path if os.path.isfile(path) else stored_config(path)[1]


def load_maskgit(path: str, cfg: MaskGITConfig | None = None, *, mesh: Mesh | None = None, rules=None,
                 **overrides) -> MaskGIT:
    """A ready `MaskGIT` from any location in the module docstring, sharded over `mesh` by its
    logical axes if given. `overrides` replace architecture-neutral fields (e.g. `attention`)."""
    if os.path.isfile(path):
        from ctgen.convert.maskgit import import_generatect_maskgit

        return import_generatect_maskgit(path, cfg, tokenizer=False, mesh=mesh, rules=rules, **overrides).model()
    cfg = cfg or stored_config(path)[0]
    if overrides:
        cfg = MaskGITConfig.from_dict({**cfg.to_dict(), **overrides})
    return load_model(path, lambda rngs: MaskGIT(cfg, rngs=rngs), mesh=mesh, rules=rules)


def load_maskgit_state(path: str) -> tuple[MaskGITConfig, nnx.State]:
    """(architecture, parameters) of the MaskGIT at `path` (a directory or workdir), e.g. to export it."""
    cfg = stored_config(path)[0]
    _, abstract = abstract_model(lambda rngs: MaskGIT(cfg, rngs=rngs))
    params, rest = nnx.split_state(abstract, nnx.Param, ...)
    params, rest = load_weights(path, params, rest)
    return cfg, nnx.merge_state(params, rest) if rest else params
