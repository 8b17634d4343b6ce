"""Where SR U-Net weights live, and loading them for inference, export and import.

- a GenerateCT file: the trainer checkpoint `superres_pretrained.pt` (its EMA weights, else its
  live ones), a `Superres` or `Unet` state_dict (`.pt` / `.safetensors`), or a ctgen export;
- a ctgen weights directory (model "superres", its `UNetConfig` in the marker), as written by
  `ctgen import generatect-superres`;
- a training workdir of the `superres` stage (config.json + its latest checkpoint, whose EMA
  copy of the weights is what sampling uses).
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ctgen.convert import superres as sv
from ctgen.convert.torch_files import read_state_dict, read_torch_object, write_state_dict, write_torch_object
from ctgen.errors import UserError
from ctgen.models.unet import UNet, UNetConfig
from ctgen.weights import abstract_model, load_weights, load_weights_and_ema, save_weights, weights_info
from ctgen.weights import workdir_config as read_workdir_config

MODEL = "superres"  # the `model` a weights directory records for the SR U-Net


def save_superres_dir(path: str, cfg: UNetConfig, params: Any, *, info: dict | None = None) -> None:
    """A weights directory of U-Net parameters (the ones meant for sampling)."""
    save_weights(path, params, {}, model=MODEL, model_config=cfg.to_dict(), info=info)


def workdir_config(workdir: str) -> UNetConfig:
    return UNetConfig.from_dict(read_workdir_config(workdir, "superres", "super-resolution")["model"])


def workdir_has_ema(workdir: str) -> bool:
    """Whether the run keeps an EMA of the U-Net (optim.main.ema_decay > 0)."""
    return float(read_workdir_config(workdir, "superres", "super-resolution").get("optim", {}).get("main", {}).get("ema_decay", 0.0)) > 0


def stored_config(path: str) -> UNetConfig:
    """The architecture recorded by a weights directory or a training workdir."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such file or directory")
    info = weights_info(path)
    if info is None:
        return workdir_config(path)
    if info["model"] != MODEL:
        raise UserError(f"{path}: weights directory of model {info['model']!r}, not the SR U-Net")
    return UNetConfig.from_dict(info["model_config"])


def latest_step(workdir: str) -> int | None:
    steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if re.fullmatch(r"\d+", d)] \
        if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    return max(steps) if steps else None


def read_generatect_file(path: str, *, prefer_ema: bool = True) -> sv.Selected:
    """The U-Net weights of a GenerateCT/ctgen `.pt` or `.safetensors` file (see `sv.select_unet_weights`)."""
    obj = read_state_dict(path) if path.endswith(".safetensors") else read_torch_object(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return sv.select_unet_weights(obj, path, prefer_ema=prefer_ema)


def _load_file(path: str, cfg: UNetConfig | None, mesh, rules, prefer_ema: bool) -> sv.ImportResult:
    sel = read_generatect_file(path, prefer_ema=prefer_ema)
    return sv.from_generatect(sel.state_dict, cfg, source=path, mesh=mesh, rules=rules, which=sel.which,
                              steps=sel.steps)


def load_params(path: str, cfg: UNetConfig | None = None, *, mesh: Mesh | None = None,
                rules=None) -> tuple[UNetConfig, nnx.GraphDef, nnx.State, nnx.State | None, int | None]:
    """(architecture, graphdef, live parameters, EMA parameters or None, step or None) of a
    weights directory or workdir, placed on `mesh` if given. A weights directory holds only the
    weights meant for sampling (returned as the live ones)."""
    cfg = cfg or stored_config(path)
    graphdef, abstract = abstract_model(lambda r: UNet(cfg, rngs=r), mesh=mesh, rules=rules)
    if weights_info(path) is not None:
        return cfg, graphdef, load_weights(path, abstract)[0], None, None
    if not workdir_has_ema(path):
        return cfg, graphdef, load_weights(path, abstract)[0], None, latest_step(path)
    params, _, ema = load_weights_and_ema(path, abstract, {}, {"main": abstract})
    return cfg, graphdef, params, ema["main"], latest_step(path)


def load_superres(path: str, cfg: UNetConfig | None = None, *, mesh: Mesh | None = None, rules=None,
                  use_ema: bool = True) -> tuple[UNet, str]:
    """A ready `UNet` from any location in the module docstring, sharded over `mesh` by its
    logical axes if given, and which weights it holds ("ema", "live", or the file's "model",
    "superres", "unet"). `use_ema`: prefer the EMA weights where there are both."""
    if os.path.isfile(path):
        result = _load_file(path, cfg, mesh, rules, use_ema)
        return result.model(), result.which
    cfg, graphdef, params, ema, _ = load_params(path, cfg, mesh=mesh, rules=rules)
    if use_ema and ema is not None:
        return nnx.merge(graphdef, ema), "ema"
    return nnx.merge(graphdef, params), "live"


def export_superres(path: str, out: str) -> str:
    """Export the SR U-Net at `path` (workdir, weights directory or file) to `out`; returns a
    summary. `.pt`: GenerateCT's trainer checkpoint (`model` = live weights, `ema.1.ema_model` =
    the weights meant for sampling). `.safetensors`: the `Unet` state_dict of the sampling weights."""
    if os.path.isfile(path):
        live_res = _load_file(path, None, None, None, prefer_ema=False)
        ema_res = _load_file(path, live_res.config, None, None, prefer_ema=True)
        cfg, live, ema, steps = live_res.config, live_res.params, ema_res.params, live_res.steps or 0
    else:
        cfg, _, live, ema_params, steps = load_params(path)
        ema, steps = (ema_params if ema_params is not None else live), steps or 0
    if cfg.residual:
        raise UserError(f"{path}: this U-Net was trained with model.residual=true (it generates the residual over "
                        "bicubic upsampling); GenerateCT's sampler would treat that residual as the slice, so it is "
                        "not exported")
    ema_sd = sv.to_generatect(ema, cfg)
    if out.endswith(".safetensors"):
        write_state_dict(ema_sd, out)
        return f"wrote {out}: {len(ema_sd)} GenerateCT Unet keys (the weights meant for sampling)"
    if not out.endswith((".pt", ".pth")):
        raise UserError(f"{out}: use a .pt (GenerateCT trainer checkpoint) or .safetensors (Unet weights) name")
    ckpt = sv.trainer_checkpoint(sv.to_generatect(live, cfg), ema_sd, steps=steps)
    write_torch_object(ckpt, out)
    return (f"wrote {out}: GenerateCT trainer checkpoint (model: {len(ckpt['model'])} keys, ema: "
            f"{len(ckpt['ema'])} keys, steps {steps})")


def import_to_dir(path: str, out: str, *, prefer_ema: bool = True, resnet_groups: int = 8) -> str:
    """Import a GenerateCT SR file into a ctgen weights directory; returns a summary."""
    sel = read_generatect_file(path, prefer_ema=prefer_ema)
    cfg = sv.infer_config(sel.state_dict, resnet_groups=resnet_groups)
    result = sv.from_generatect(sel.state_dict, cfg, source=path, which=sel.which, steps=sel.steps)
    used = {"ema": "its EMA weights (ema.1.ema_model, what GenerateCT samples with)",
            "model": "its live weights (`model`; no EMA weights in the file)" if prefer_ema
            else "its live weights (`model`, as asked)",
            "superres": "a Superres state_dict (unets.1.*)", "unet": "a Unet state_dict"}[sel.which]
    save_superres_dir(out, cfg, result.params, info={"source": os.path.abspath(path), "weights": sel.which,
                                                       "steps": sel.steps})
    n = sum(int(np.prod(v.shape)) for v in sel.state_dict.values())
    return "\n".join([f"imported {path} -> {out}", f"weights used: {used}", result.report.describe(),
                      f"architecture: dim {cfg.dim}, dim_mults {cfg.dim_mults}, {cfg.num_resnet_blocks} resnet blocks, "
                      f"cross-attention per stage {cfg.layer_cross_attns}, text width {cfg.text_embed_dim}, "
                      f"{n:,} parameters" + (f", trained {sel.steps} steps" if sel.steps else "")])
