"""Where CT-ViT weights live, and loading them: the tokenizer alone, or everything.

- a GenerateCT file: `ctvit_pretrained.pt`, `transformer_pretrained.pt` (its `ctvit.*` block), or
  a ctgen export (`.pt` / `.safetensors`);
- a ctgen weights directory (model "ctvit"), as written by `ctgen import generatect-ctvit`: it
  works as `--config.init_from` and as `ctgen eval --weights`;
- a training workdir of the `ctvit` stage (config.json + its latest checkpoint).

Directories hold the CT-ViT stage's layout: `{"ctvit": autoencoder, "vgg": ..., "discr": ...}`
(loss networks only if they were imported or trained). Directories and workdirs written before
the autoencoder was split from its loss networks keep it at the root; `ctgen.weights` reads both
(see its "sub-model stored at the root"). Loading the tokenizer (`load_ctvit`) reads only the
autoencoder, restored straight onto a mesh if given: the VGG16 and the discriminator are never
allocated.
"""
from __future__ import annotations

import os
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from ctgen.convert.ctvit import abstract_ctvit, import_generatect_ctvit
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.ctvit_losses import LossNetworksConfig, model_config_dict, split_model_config
from ctgen.weights import load_model, load_weights, save_weights, weights_info
from ctgen.weights import workdir_config as read_workdir_config

MODEL = "ctvit"  # the `model` a weights directory records for a CT-ViT


def save_ctvit_dir(path: str, cfg: CTViTConfig, state: nnx.State, *, nets: LossNetworksConfig | None = None,
                   loss_nets: dict[str, nnx.State] | None = None, info: dict | None = None) -> None:
    """Write a weights directory of the autoencoder `state` (params + VQ buffers) and, with
    `nets`, the loss networks' states `loss_nets` ({"vgg": ..., "discr": ...})."""
    if (nets is None) != (not loss_nets):
        raise ValueError("pass the loss networks' sizes (nets) and their states (loss_nets) together")
    params, model_state = {}, {}
    for name, s in {"ctvit": state, **(loss_nets or {})}.items():
        p, rest = nnx.split_state(s, nnx.Param, ...)
        params[name] = p
        if rest:
            model_state[name] = rest
    save_weights(path, params, model_state, model=MODEL, model_config=model_config_dict(cfg, nets), info=info)


def workdir_config(workdir: str) -> tuple[CTViTConfig, LossNetworksConfig | None]:
    """The architecture of a `ctvit` training workdir (from its config.json)."""
    return split_model_config(read_workdir_config(workdir, "ctvit", "CT-ViT")["model"])


def stored_config(path: str) -> tuple[CTViTConfig, LossNetworksConfig | None]:
    """The architecture recorded by a weights directory or a training workdir."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such file or directory")
    info = weights_info(path)
    if info is None:
        return workdir_config(path)
    if info["model"] != MODEL:
        raise UserError(f"{path}: weights directory of model {info['model']!r}, not a CT-ViT")
    return split_model_config(info["model_config"])


def load_ctvit(path: str, cfg: CTViTConfig | None = None, *, mesh: Mesh | None = None, rules=None) -> CTViT:
    """The tokenizer: a ready `CTViT` from any of the locations in this module's docstring,
    sharded over `mesh` by its logical axes (`rules`, default rules) if given. Reads only the
    autoencoder: never allocates the VGG16 or the discriminator."""
    if os.path.isfile(path):
        return import_generatect_ctvit(path, cfg, loss_networks=False, mesh=mesh, rules=rules).model()
    cfg = cfg or stored_config(path)[0]
    return load_model(path, lambda rngs: CTViT(cfg, rngs=rngs), at="ctvit", mesh=mesh, rules=rules)


def load_ctvit_state(path: str) -> tuple[CTViTConfig, LossNetworksConfig | None, dict[str, Any]]:
    """(architecture, loss networks' sizes, {"ctvit": state, "vgg": ..., "discr": ...}): everything
    a location holds, e.g. to export it."""
    if os.path.isfile(path):
        result = import_generatect_ctvit(path)
        return result.config, result.nets, result.states
    cfg, nets = stored_config(path)
    _, abstract = abstract_ctvit(cfg, nets)
    split = {name: nnx.split_state(s, nnx.Param, ...) for name, s in abstract.items()}
    params, model_state = load_weights(path, {k: p for k, (p, _) in split.items()},
                                       {k: rest for k, (_, rest) in split.items() if rest})
    return cfg, nets, {k: nnx.merge_state(params[k], model_state[k]) if k in model_state else params[k]
                       for k in params}
