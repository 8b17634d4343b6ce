"""GenerateCT's 2-D slice discriminator (a StyleGAN-like residual net) in NNX, NHWC.

num_layers = log2(image_size) - 2; channels [C] + [4*base*2^i for i in 0..num_layers], capped at
512 (base 16, 128x128: 1->64->128->256->512->512->512). Each block: two conv3x3+LeakyReLU(0.1),
a stride-2 1x1 shortcut, and (all but the last block) a 2x2 space-to-depth + 1x1 conv downsample;
output (x + res)/sqrt(2). After the block whose *input* resolution is in `attn_res_layers`, a
residual attention (8 heads x 64, GenerateCT's attention). Head: conv3x3 + LeakyReLU, flatten in
(C, H, W) order, Linear -> 1 logit per image.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ctgen.models.attention import Attention
from ctgen.models.layers import Conv2d, Dense, leaky_relu


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    base_dim: int = 16
    image_size: int = 128
    channels: int = 1
    attn_res_layers: tuple[int, ...] = (16,)
    max_dim: int = 512
    attn_heads: int = 8
    attn_dim_head: int = 64

    @property
    def num_layers(self) -> int:
        return int(math.log2(self.image_size) - 2)

    @property
    def layer_dims(self) -> tuple[int, ...]:
        dims = [self.channels] + [self.base_dim * 4 * 2 ** i for i in range(self.num_layers + 1)]
        return tuple(min(d, self.max_dim) for d in dims)

    @property
    def attn_block_indices(self) -> tuple[int, ...]:
        res, out = self.image_size, []
        for i in range(len(self.layer_dims) - 1):
            if res in self.attn_res_layers:
                out.append(i)
            res //= 2
        return tuple(out)


def space_to_depth_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, 4C) with channels ordered (c, p1, p2) like einops in torch."""
    b, h, w, c = x_BxHxWxC.shape
    x = x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c)
    return jnp.transpose(x, (0, 1, 3, 5, 2, 4)).reshape(b, h // 2, w // 2, 4 * c)


class DiscriminatorBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, downsample: bool, dtype, rngs: nnx.Rngs):
        self.conv_res = Conv2d(c_in, c_out, 1, padding=0, dtype=dtype, rngs=rngs)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1, dtype=dtype, rngs=rngs)
        self.downsample = Conv2d(4 * c_out, c_out, 1, padding=0, dtype=dtype, rngs=rngs) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        res = self.conv_res(x[:, ::2, ::2] if self.downsample is not None else x)
        x = leaky_relu(self.conv1(x))
        x = leaky_relu(self.conv2(x))
        if self.downsample is not None:
            x = self.downsample(space_to_depth_2x2(x))
        return (x + res) * (1.0 / math.sqrt(2))


class Discriminator(nnx.Module):
    """Image (B, H, W, C) -> logits (B,)."""

    def __init__(self, cfg: DiscriminatorConfig = DiscriminatorConfig(), *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        dims = cfg.layer_dims
        n = len(dims) - 1
        self.blocks = nnx.List([DiscriminatorBlock(dims[i], dims[i + 1], downsample=i != n - 1, dtype=dtype,
                                                   rngs=rngs) for i in range(n)])
        self.attn_index = cfg.attn_block_indices
        self.attn = nnx.List([Attention(dims[i + 1], heads=cfg.attn_heads, dim_head=cfg.attn_dim_head, dtype=dtype,
                                        rngs=rngs) for i in self.attn_index])
        last = dims[-1]
        fmap = cfg.image_size // 2 ** cfg.num_layers
        self.to_logits_conv = Conv2d(last, last, 3, padding=1, dtype=dtype, rngs=rngs)
        self.to_logits = Dense(fmap * fmap * last, 1, axes=("embed", None), dtype=dtype, rngs=rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        x = x_BxHxWxC
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.attn_index:
                attn = self.attn[self.attn_index.index(i)]
                b, h, w, c = x.shape
                tokens = x.reshape(b, h * w, c)
                x = (attn(tokens) + tokens).reshape(b, h, w, c)
        x = leaky_relu(self.to_logits_conv(x))
        flat = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch flattens (C, H, W)
        return self.to_logits(flat)[:, 0]
