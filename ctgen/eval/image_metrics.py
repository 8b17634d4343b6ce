"""Reconstruction metrics for volumes: PSNR and SSIM (jit-able, per sample).

SSIM is the original (Wang et al. 2004) definition: 11x11 Gaussian window (sigma 1.5),
K1 = 0.01, K2 = 0.03, valid region only, computed per axial slice and averaged over the slices.
`data_range` is the width of the value range (2.0 for CT-ViT's [-1, 1]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x_BxFxHxW: jax.Array, y_BxFxHxW: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per sample, (B,)."""
    err = jnp.mean(jnp.square(x_BxFxHxW.astype(jnp.float32) - y_BxFxHxW.astype(jnp.float32)),
                   axis=tuple(range(1, x_BxFxHxW.ndim)))
    return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(err, 1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def _blur(x_NxHxW: jax.Array, g: jax.Array) -> jax.Array:
    """Separable valid Gaussian filter of a stack of images."""
    k = g.shape[0]
    x = x_NxHxW[:, None]
    x = jax.lax.conv_general_dilated(x, g.reshape(1, 1, k, 1), (1, 1), "VALID")
    x = jax.lax.conv_general_dilated(x, g.reshape(1, 1, 1, k), (1, 1), "VALID")
    return x[:, 0]


def ssim(x_BxFxHxW: jax.Array, y_BxFxHxW: jax.Array, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> jax.Array:
    """Mean structural similarity per sample, (B,). Slices smaller than the window use a window of
    their size."""
    b, f, h, w = x_BxFxHxW.shape
    window = min(window, h, w)
    g = jnp.asarray(_gaussian_window(window, sigma))
    x = x_BxFxHxW.reshape(b * f, h, w).astype(jnp.float32)
    y = y_BxFxHxW.reshape(b * f, h, w).astype(jnp.float32)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mx * mx
    syy = _blur(y * y, g) - my * my
    sxy = _blur(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.mean(s.reshape(b, -1), axis=1)
