"""torchvision-layout ResNet-50 state_dicts (torchvision, RadImageNet's PyTorch release) -> ctgen's ResNet50.

Keys may carry a `backbone.` / `module.` prefix, or number the trunk as an
`nn.Sequential(*children)` (`0.`=conv1, `1.`=bn1, `4.`-`7.`=layer1-4), as the VLM3D challenge's
`ResNet50.pt` does; `fc.*` is ignored. Files are read without unpickling (ctgen.convert.torch_files).
"""
from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctgen.convert.generatect_layers import conv2d
from ctgen.convert.namemap import ConversionError, Rule, convert
from ctgen.errors import UserError
from ctgen.models.resnet import ResNet50, ResNetConfig
from ctgen.weights import flatten_state, unflatten_state

_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _conv_rules(ours: str, theirs: str, bias: bool) -> list:
    rules = conv2d(ours, theirs)  # kernel + bias
    return rules if bias else rules[:1]


def _bn_rules(ours: str, theirs: str) -> list:
    return [Rule(f"{ours}/{a}", f"{theirs}.{b}") for a, b in
            (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))]


def torchvision_resnet_rules(cfg: ResNetConfig) -> list:
    """ctgen ResNet50 state paths <-> torchvision `resnet50().state_dict()` keys."""
    rules = _conv_rules("conv1", "conv1", cfg.conv_bias) + _bn_rules("bn1", "bn1")
    block = "layer{stage}/{i}", "layer{stage}.{i}"
    for j in (1, 2, 3):
        rules += _conv_rules(f"{block[0]}/conv{j}", f"{block[1]}.conv{j}", cfg.conv_bias)
        rules += _bn_rules(f"{block[0]}/bn{j}", f"{block[1]}.bn{j}")
    rules += _conv_rules(f"{block[0]}/downsample/0", f"{block[1]}.downsample.0", cfg.conv_bias)
    return rules + _bn_rules(f"{block[0]}/downsample/1", f"{block[1]}.downsample.1")


def normalize_keys(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision names from the accepted spellings (prefixes, nn.Sequential numbering); no `fc`."""
    out = {}
    for key, value in sd.items():
        k = re.sub(r"^(module\.|backbone\.|model\.)+", "", key)
        head, _, rest = k.partition(".")
        k = f"{_SEQUENTIAL[head]}.{rest}" if head in _SEQUENTIAL and rest else k
        if not (k.startswith("fc.") or k.endswith("num_batches_tracked")):
            out[k] = np.asarray(value)
    return out


def resnet_from_state_dict(sd: Mapping[str, np.ndarray], cfg: ResNetConfig | None = None,
                           source: str = "state_dict") -> ResNet50:
    """A ResNet50 holding the weights of a torchvision-layout state_dict."""
    sd = normalize_keys(sd)
    if "conv1.weight" not in sd:
        raise UserError(f"{source}: not a ResNet state_dict (no conv1.weight; first keys: {list(sd)[:5]})")
    cfg = cfg or ResNetConfig.from_state_dict(sd)
    graph, state = nnx.split(nnx.eval_shape(lambda: ResNet50(cfg, rngs=nnx.Rngs(0))))
    expected = {k: tuple(v.shape) for k, v in flatten_state(nnx.to_pure_dict(state)).items()}
    try:
        flat, _ = convert(sd, torchvision_resnet_rules(cfg), direction="to_ours", expected_shapes=expected)
    except ConversionError as err:
        raise UserError(f"{source} is not a ResNet-50 state_dict in torchvision layout:\n{err}") from err
    nnx.replace_by_pure_dict(state, unflatten_state({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}))
    return nnx.merge(graph, state)


def load_resnet50(path: str) -> ResNet50:
    """ResNet-50 from a `.pt` (loaded with weights_only) or `.safetensors` state_dict file."""
    from ctgen.convert.torch_files import read_state_dict

    return resnet_from_state_dict(read_state_dict(path), source=path)
