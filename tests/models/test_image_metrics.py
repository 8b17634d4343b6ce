"""PSNR / SSIM for CT-ViT evaluation."""
import jax.numpy as jnp
import numpy as np
import pytest

from ctgen.eval.image_metrics import psnr, ssim


def test_psnr_known_value():
    x = jnp.zeros((2, 3, 8, 8))
    y = x.at[1].set(0.1)  # MSE 0.01 with data range 2 -> 10 log10(4 / 0.01) = 26.02 dB
    p = np.asarray(psnr(x, y))
    assert p[0] > 100 and p[1] == pytest.approx(10 * np.log10(400.0), rel=1e-5)


def test_ssim_identity_and_ordering():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (1, 2, 32, 32)).astype(np.float32))
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-5)
    small = x + 0.05 * jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    big = x + 0.5 * jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    assert 1.0 > float(ssim(x, small)[0]) > float(ssim(x, big)[0]) > -1.0


def test_ssim_matches_a_direct_numpy_evaluation():
    """One 11x11 window at the centre of a 11x11 image: SSIM from the window-weighted moments."""
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (11, 11)).astype(np.float64)
    b = (0.7 * a + 0.2 * rng.uniform(-1, 1, (11, 11))).astype(np.float64)
    r = np.arange(11) - 5
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * a).sum(), (w * b).sum()
    sxx, syy, sxy = (w * a * a).sum() - mx ** 2, (w * b * b).sum() - my ** 2, (w * a * b).sum() - mx * my
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    ref = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    ours = float(ssim(jnp.asarray(a[None, None], jnp.float32), jnp.asarray(b[None, None], jnp.float32))[0])
    assert ours == pytest.approx(ref, abs=1e-5)
