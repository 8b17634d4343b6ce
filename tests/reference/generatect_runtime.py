"""Load GenerateCT's CTViT from a user's local checkout, for parity tests and benchmarks only.

Nothing of GenerateCT is copied here: the modules are imported from the checkout named by
CTGEN_GENERATECT_DIR (the repository root). Two runtime adaptations are applied in this process:
- its `torch.device('cuda')` calls are answered with the CPU device (the module-level `torch`
  name of its attention/ctvit modules is replaced by a proxy), and its debug `print`s are muted;
- if torchvision cannot be imported (PyPI's wheels do not match every torch build), a minimal
  `torchvision` stand-in is registered that provides what `ctvit.py` imports, and VGG16 is built
  here with torchvision's module layout (`make_torch_vgg16`).
The package's `__init__` (which pulls in T5/transformers and data code) is bypassed by importing
`transformer_maskgit.ctvit` from a namespace stub. `load_maskgit` also imports its
`MaskGITTransformer` module; its `transformer_maskgit.t5` import is answered by a stand-in (no
`transformers`, no downloads) whose `get_encoded_dim` gives 768, T5 v1.1 base's width, and whose
`t5_encode_text` refuses: parity runs feed text states directly.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types

ENV = "CTGEN_GENERATECT_DIR"


def checkout_dir() -> str | None:
    return os.environ.get(ENV) or None


def skip_reason() -> str | None:
    """Why the reference cannot run here (None if it can)."""
    root = checkout_dir()
    if not root:
        return f"set {ENV} to a local GenerateCT checkout to run parity tests against the reference"
    pkg = os.path.join(root, "transformer_maskgit", "transformer_maskgit", "ctvit.py")
    if not os.path.exists(pkg):
        return f"{ENV}={root} has no transformer_maskgit/transformer_maskgit/ctvit.py"
    for mod in ("torch", "einops", "beartype", "vector_quantize_pytorch"):
        try:
            importlib.import_module(mod)
        except ImportError:
            return f"GenerateCT's CTViT needs `{mod}` (pip install vector-quantize-pytorch==1.1.2 beartype einops torch)"
    return None


def make_torch_vgg16(widths=(64, 128, 256, 512, 512), fc_dim: int = 4096, in_channels: int = 3):
    """torchvision-layout VGG16 with the classifier cut by two modules (as GenerateCT uses it)."""
    import torch
    from torch import nn

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c = [], in_channels
            for width, n in zip(widths, (2, 2, 3, 3, 3)):
                for _ in range(n):
                    layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True)]
                    c = width
                layers.append(nn.MaxPool2d(2, 2))
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(nn.Linear(c * 49, fc_dim), nn.ReLU(True), nn.Dropout(0.5),
                                            nn.Linear(fc_dim, fc_dim), nn.ReLU(True))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return VGG()


@contextlib.contextmanager
def torchvision_standin():
    """While GenerateCT's modules are imported: a minimal `torchvision` if the real one is missing
    (they import it at module level; ctgen's tests pass the VGG16 in). Removed again afterwards, so
    that libraries probing for torchvision later in the process (transformers) do not find it."""
    try:
        import torchvision  # noqa: F401
        yield
        return
    except Exception:
        pass
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.utils = types.ModuleType("torchvision.utils")
    tv.models = types.ModuleType("torchvision.models")

    def vgg16(*args, **kwargs):
        raise RuntimeError("torchvision stand-in: pass vgg= to CTViT (no ImageNet weights offline)")

    tv.models.vgg16 = vgg16
    added = {"torchvision": tv, **{f"torchvision.{n}": getattr(tv, n) for n in ("transforms", "utils", "models")}}
    sys.modules.update(added)
    try:
        yield
    finally:
        for name, module in added.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


class _CpuTorch(types.ModuleType):
    """`torch` with `device('cuda...')` answered by the CPU device."""

    def __init__(self, torch):
        super().__init__("torch")
        self._torch = torch

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def device(self, *args, **kwargs):
        if args and str(args[0]).startswith("cuda"):
            return self._torch.device("cpu")
        return self._torch.device(*args, **kwargs)


def load() -> types.SimpleNamespace:
    """Import GenerateCT's `ctvit` and `attention` modules (CPU-adapted). Needs `skip_reason() is None`."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    import torch

    pkg_dir = os.path.join(checkout_dir(), "transformer_maskgit", "transformer_maskgit")
    if "transformer_maskgit" not in sys.modules:
        stub = types.ModuleType("transformer_maskgit")
        stub.__path__ = [pkg_dir]
        sys.modules["transformer_maskgit"] = stub
    with torchvision_standin():
        attention = importlib.import_module("transformer_maskgit.attention")
        ctvit = importlib.import_module("transformer_maskgit.ctvit")
    proxy = _CpuTorch(torch)
    for mod in (attention, ctvit):
        mod.torch = proxy
        mod.print = lambda *a, **k: None
    return types.SimpleNamespace(ctvit=ctvit, attention=attention, CTViT=ctvit.CTViT, torch=torch,
                                 make_vgg16=make_torch_vgg16)


def build_reference(cfg, nets=None, seed: int = 0):
    """GenerateCT `CTViT` with the architecture of a ctgen `CTViTConfig` and, if given, the loss
    networks of a `LossNetworksConfig` (`use_vgg_and_gan`), on the CPU with random weights."""
    ref = load()
    ref.torch.manual_seed(seed)
    kwargs = dict(dim=cfg.dim, codebook_size=cfg.codebook_size, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  temporal_patch_size=cfg.temporal_patch_size, spatial_depth=cfg.spatial_depth,
                  temporal_depth=cfg.temporal_depth, dim_head=cfg.dim_head, heads=cfg.heads,
                  use_vgg_and_gan=nets is not None)
    if nets is not None:
        kwargs.update(vgg=make_torch_vgg16(nets.vgg.widths, nets.vgg.fc_dim), discr_base_dim=nets.discr.base_dim)
    model = ref.CTViT(**kwargs)
    return model


def load_maskgit() -> types.SimpleNamespace:
    """`load()` plus GenerateCT's `MaskGITTransformer` module (`MaskGit`, `MaskGITTransformer`)."""
    ref = load()
    if "transformer_maskgit.t5" not in sys.modules:
        t5 = types.ModuleType("transformer_maskgit.t5")
        t5.DEFAULT_T5_NAME = "google/t5-v1_1-base"
        t5.get_encoded_dim = lambda name: 768

        def t5_encode_text(*args, **kwargs):
            raise RuntimeError("T5 stand-in: pass text states (context=...) to GenerateCT's MaskGit")

        t5.t5_encode_text = t5_encode_text
        sys.modules["transformer_maskgit.t5"] = t5
    with torchvision_standin():
        mod = importlib.import_module("transformer_maskgit.MaskGITTransformer")
    mod.torch = _CpuTorch(ref.torch)
    return types.SimpleNamespace(**vars(ref), module=mod, MaskGit=mod.MaskGit,
                                 MaskGITTransformer=mod.MaskGITTransformer)


def build_maskgit_reference(cfg, seed: int = 0):
    """GenerateCT `MaskGit` with the architecture of a ctgen `MaskGITConfig`, random weights, CPU
    (`MaskGit` always gives its cross-attention 2 null key/values)."""
    if cfg.cross_num_null_kv != 2:
        raise ValueError("GenerateCT's MaskGit has 2 null key/values per cross-attention")
    ref = load_maskgit()
    ref.torch.manual_seed(seed)
    return ref.MaskGit(num_tokens=cfg.num_tokens, max_seq_len=cfg.max_seq_len, dim=cfg.dim,
                       dim_context=cfg.dim_context, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head,
                       ff_mult=cfg.ff_mult, gradient_shrink_alpha=cfg.gradient_shrink_alpha)
