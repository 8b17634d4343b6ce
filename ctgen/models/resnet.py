"""ResNet-50 feature network (Flax NNX, NHWC) reading torchvision-layout state_dicts.

The 2.5D FID of the VLM3D challenge runs a ResNet-50 trunk (conv1 ... layer4, global average
pool: 2048 features per slice) whose weights the user supplies. Two weight families share
torchvision's module names (`conv1`, `bn1`, `layer{1-4}.{i}.conv{1-3}`, `.bn{1-3}`,
`.downsample.{0,1}`):

* torchvision (`resnet50().state_dict()`): convolutions without bias, the stride on the 3x3
  convolution of a bottleneck (v1.5), BatchNorm eps 1e-5;
* the RadImageNet PyTorch release (converted from Keras): convolutions with bias, the stride
  on the first 1x1 convolution (v1), BatchNorm eps 1.001e-5, no `fc`.

`ctgen.convert.resnet.load_resnet50(path)` reads either (it tells them apart by the conv biases,
`ResNetConfig.from_state_dict`). BatchNorm runs in inference mode (running statistics).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


STAGES = (("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 2), ("layer4", 512, 2))  # name, width, stride
EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """conv_bias / stride_first / bn_eps: RadImageNet's Keras-born variant (True, True, 1.001e-5)
    or torchvision's (False, False, 1e-5). `blocks` shrinks the network for tests."""

    conv_bias: bool = False
    stride_first: bool = False
    bn_eps: float = 1e-5
    blocks: tuple[int, ...] = (3, 4, 6, 3)
    in_channels: int = 3

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, np.ndarray]) -> "ResNetConfig":
        keras = "conv1.bias" in sd
        blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(name + ".")}) for name, *_ in STAGES)
        return cls(conv_bias=keras, stride_first=keras, bn_eps=1.001e-5 if keras else 1e-5, blocks=blocks,
                   in_channels=int(sd["conv1.weight"].shape[1]))


class Conv(nnx.Module):
    """NHWC convolution; kernel (k, k, in, out) = torch weight (out, in, k, k) permuted."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, bias: bool, rngs: nnx.Rngs):
        from ctgen.models.layers import torch_linear_init
        from ctgen.parallel.axes import with_axes

        init = torch_linear_init(c_in * k * k)
        self.kernel = nnx.Param(with_axes(init, "conv_k", "conv_k", "conv_in", "conv_out")(rngs.params(), (k, k, c_in, c_out)))
        self.bias = nnx.Param(with_axes(init, "norm")(rngs.params(), (c_out,))) if bias else None
        self.stride, self.pad = stride, k // 2

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x_BxHxWxC, self.kernel[...], (self.stride, self.stride), ((self.pad, self.pad), (self.pad, self.pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
        return y if self.bias is None else y + self.bias[...].reshape(1, 1, 1, -1)


class BatchNorm(nnx.Module):
    """Inference-mode BatchNorm2d over the channel (last) axis; running statistics are Buffers."""

    def __init__(self, c: int, eps: float):
        from ctgen.models.layers import Buffer
        from ctgen.parallel.axes import param

        self.scale, self.bias = param(jnp.ones((c,)), "norm"), param(jnp.zeros((c,)), "norm")
        self.mean, self.var = param(jnp.zeros((c,)), "norm", cls=Buffer), param(jnp.ones((c,)), "norm", cls=Buffer)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
        return x * inv.reshape(1, 1, 1, -1) + (self.bias[...] - self.mean[...] * inv).reshape(1, 1, 1, -1)


class Bottleneck(nnx.Module):
    def __init__(self, c_in: int, width: int, stride: int, cfg: ResNetConfig, rngs: nnx.Rngs):
        s1, s2 = (stride, 1) if cfg.stride_first else (1, stride)
        c_out = width * EXPANSION
        self.conv1, self.bn1 = Conv(c_in, width, 1, s1, cfg.conv_bias, rngs), BatchNorm(width, cfg.bn_eps)
        self.conv2, self.bn2 = Conv(width, width, 3, s2, cfg.conv_bias, rngs), BatchNorm(width, cfg.bn_eps)
        self.conv3, self.bn3 = Conv(width, c_out, 1, 1, cfg.conv_bias, rngs), BatchNorm(c_out, cfg.bn_eps)
        self.downsample = (nnx.List([Conv(c_in, c_out, 1, stride, cfg.conv_bias, rngs), BatchNorm(c_out, cfg.bn_eps)])
                           if stride != 1 or c_in != c_out else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(y + identity)


def max_pool_3x3_s2(x_BxHxWxC: jax.Array) -> jax.Array:
    """torch MaxPool2d(3, stride=2, padding=1): padding never wins the max."""
    return jax.lax.reduce_window(x_BxHxWxC, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class ResNet50(nnx.Module):
    """The ResNet-50 trunk up to global average pooling: (B, H, W, C) -> (B, 2048)."""

    def __init__(self, cfg: ResNetConfig = ResNetConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.conv1, self.bn1 = Conv(cfg.in_channels, 64, 7, 2, cfg.conv_bias, rngs), BatchNorm(64, cfg.bn_eps)
        c_in = 64
        for (name, width, stride), n in zip(STAGES, cfg.blocks):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(c_in, width, stride if i == 0 else 1, cfg, rngs))
                c_in = width * EXPANSION
            setattr(self, name, nnx.List(blocks))

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        x = max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x_BxHxWxC.astype(jnp.float32)))))
        for name, *_ in STAGES:
            for block in getattr(self, name):
                x = block(x)
        return jnp.mean(x, axis=(1, 2))


def feature_fn(model: ResNet50):
    """A jitted `x_BxHxWxC -> (B, features)` for this model (compiled once per input shape)."""
    graph, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
    return lambda x_BxHxWxC: fn(state, jnp.asarray(x_BxHxWxC, jnp.float32))
