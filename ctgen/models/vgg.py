"""VGG16 feature extractor with torchvision's layout, as GenerateCT's perceptual loss uses it.

torchvision `vgg16()` with the classifier cut by two modules: 13 conv3x3+ReLU layers with five
2x2 max-pools, adaptive average pooling to 7x7, flatten in (C, H, W) order, Linear 25088->4096,
ReLU, Dropout(0.5), Linear 4096->4096, ReLU. Output: ReLU(fc7), 4096 features per image.
Input is NHWC. GenerateCT feeds a [-1, 1] grayscale slice repeated to 3 channels, with no ImageNet
normalisation and no resize, and keeps the VGG in train mode (dropout active).

`widths`/`fc_dim` shrink the network for tests; the defaults are VGG16's.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctgen.models.layers import Conv2d, Dense

# torchvision `features` indices of the conv layers, per stage (a max-pool follows each stage).
VGG16_STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))


@dataclasses.dataclass(frozen=True)
class VGGConfig:
    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    fc_dim: int = 4096
    pool_size: int = 7
    dropout: float = 0.5
    in_channels: int = 3


def adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of torch's AdaptiveAvgPool1d (floor/ceil bin edges)."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
    b, h, w, c = x_BxHxWxC.shape
    return jnp.max(x_BxHxWxC[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class VGG16(nnx.Module):
    """torchvision VGG16 up to ReLU(fc7). Call with `dropout_rng` to apply train-mode dropout."""

    def __init__(self, cfg: VGGConfig = VGGConfig(), *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        convs = []
        c_in = cfg.in_channels
        for width, stage in zip(cfg.widths, VGG16_STAGES):
            for _ in stage:
                convs.append(Conv2d(c_in, width, 3, padding=1, dtype=dtype, rngs=rngs))
                c_in = width
        self.convs = nnx.List(convs)
        self.fc6 = Dense(c_in * cfg.pool_size ** 2, cfg.fc_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc7 = Dense(cfg.fc_dim, cfg.fc_dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x_BxHxWxC: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = x_BxHxWxC
        i = 0
        for stage in VGG16_STAGES[: len(self.cfg.widths)]:
            for _ in stage:
                x = jax.nn.relu(self.convs[i](x))
                i += 1
            x = max_pool_2x2(x)
        p = self.cfg.pool_size
        ph = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], p), x.dtype)
        pw = jnp.asarray(adaptive_avg_pool_matrix(x.shape[2], p), x.dtype)
        pooled = jnp.einsum("oh,bhwc,pw->bcop", ph, x, pw)  # channel-first, as torch flattens
        h = jax.nn.relu(self.fc6(pooled.reshape(x.shape[0], -1)))
        if dropout_rng is not None and self.cfg.dropout > 0:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - self.cfg.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.cfg.dropout), 0.0).astype(h.dtype)
        return jax.nn.relu(self.fc7(h))
