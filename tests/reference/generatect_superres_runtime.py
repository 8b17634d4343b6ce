"""Load GenerateCT's super-resolution code from a user's local checkout, for parity tests and benchmarks only.

Nothing of GenerateCT is copied here: `superres_pytorch` is imported from the checkout named by
CTGEN_GENERATECT_DIR (the repository root). Runtime adaptations, in this process only:
- the package `__init__` (trainer, accelerate, pydantic configs, T5 downloads) is bypassed by
  importing `super_resolution.superres_pytorch` from a namespace stub;
- `super_resolution.t5` is replaced by a stub whose `get_encoded_dim` answers 768 (T5 v1.1 base's
  width, which GenerateCT would read from the Hugging Face hub at import time) and whose text
  encoder refuses to run (tests pass T5 states, never text);
- torchvision gets the minimal stand-in of `generatect_runtime` (while importing) if it cannot be imported;
- its debug `print`s are muted.
The trainer checkpoint's EMA block is built with ema-pytorch's `EMA` (pin ema-pytorch==0.8.3, the
layout in shared/reference/state_dicts/generatect_superres.txt).
"""
from __future__ import annotations

import importlib
import os
import sys
import types

import generatect_runtime as ctvit_rt

ENV = ctvit_rt.ENV
NEEDS = ("torch", "einops", "einops_exts", "beartype", "kornia", "ema_pytorch")
# superres.yaml's U-Net. layer_cross_attns=True stands for the ListConfig GenerateCT passes, which
# its cast_tuple repeats for every stage (each entry truthy): cross-attention in every stage.
PAPER_UNET = dict(dim=64, num_resnet_blocks=2, dim_mults=(1, 2, 4), layer_cross_attns=True, use_linear_attn=False,
                  layer_attns=False, attend_at_middle=False, use_linear_cross_attn=False, memory_efficient=True,
                  channels=1, attn_heads=8)


def skip_reason() -> str | None:
    root = ctvit_rt.checkout_dir()
    if not root:
        return f"set {ENV} to a local GenerateCT checkout to run parity tests against the reference"
    path = os.path.join(root, "super_resolution", "super_resolution", "superres_pytorch.py")
    if not os.path.exists(path):
        return f"{ENV}={root} has no super_resolution/super_resolution/superres_pytorch.py"
    for mod in NEEDS:
        try:
            importlib.import_module(mod)
        except ImportError:
            return (f"GenerateCT's Superres needs `{mod}` (pip install -e '.[parity]': kornia, einops-exts, "
                    "ema-pytorch==0.8.3, beartype, einops, torch)")
    return None


def _t5_stub() -> types.ModuleType:
    t5 = types.ModuleType("super_resolution.t5")
    t5.DEFAULT_T5_NAME = "google/t5-v1_1-base"

    def get_encoded_dim(name):
        return 768

    def t5_encode_text(*args, **kwargs):
        raise RuntimeError("parity runtime: pass text_embeds; GenerateCT's T5 is not loaded here")

    t5.get_encoded_dim = get_encoded_dim
    t5.t5_encode_text = t5_encode_text
    return t5


def load() -> types.SimpleNamespace:
    """GenerateCT's `superres_pytorch` module (CPU), torch, and ema-pytorch's EMA."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    import torch
    from ema_pytorch import EMA

    pkg_dir = os.path.join(ctvit_rt.checkout_dir(), "super_resolution", "super_resolution")
    if "super_resolution" not in sys.modules:
        stub = types.ModuleType("super_resolution")
        stub.__path__ = [pkg_dir]
        sys.modules["super_resolution"] = stub
        sys.modules["super_resolution.t5"] = _t5_stub()
    with ctvit_rt.torchvision_standin():
        sr = importlib.import_module("super_resolution.superres_pytorch")
    sr.print = lambda *a, **k: None
    return types.SimpleNamespace(sr=sr, torch=torch, EMA=EMA)


def build_superres(unet_kwargs: dict | None = None, image_sizes=(128, 512), seed: int = 0):
    """GenerateCT's `Superres((NullUnet(), Unet(**superres.yaml unet1)), **superres.yaml params)`
    with random weights (torch seed `seed`); `image_sizes` may be smaller than the paper's for speed."""
    ref = load()
    ref.torch.manual_seed(seed)
    unet = ref.sr.Unet(**(unet_kwargs or PAPER_UNET), lowres_cond=False)
    superres = ref.sr.Superres(unets=(ref.sr.NullUnet(), unet), image_sizes=list(image_sizes), channels=1,
                               timesteps=[25, 25], condition_on_text=True, random_crop_sizes=[None, None],
                               pred_objectives="v", lowres_sample_noise_level=0.1, text_embed_dim=768)
    return superres.eval()


def ema_modules(superres):
    """`nn.ModuleList([EMA(unet) for unet in superres.unets])`, as GenerateCT's trainer holds them."""
    ref = load()
    return ref.torch.nn.ModuleList([ref.EMA(u) for u in superres.unets])
