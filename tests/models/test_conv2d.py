"""conv2d's custom backward pass (blocked im2col weight gradient) against autodiff of XLA's convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctgen.models import layers
from ctgen.models.layers import Conv2d, conv2d


def _plain(x, kernel, bias, padding):
    """The reference: jax.lax.conv_general_dilated with autodiff's gradients."""
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), ((padding, padding), (padding, padding)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(y.dtype).reshape(1, 1, 1, -1)


def _grads(fn, x, kernel, bias, padding, cotangent):
    y, vjp = jax.vjp(lambda x, k, b: fn(x, k, b, padding), x, kernel, bias)
    return (y, *vjp(cotangent.astype(y.dtype)))


def _max_rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


# (kernel, padding, H): H makes the output height odd so that 2-row blocks leave a remainder.
CASES = [(1, 0, 9), (3, 1, 9), (3, 0, 9), (3, 2, 9), (7, 3, 9), (7, 0, 13)]


@pytest.mark.parametrize("blocks", ["one", "two-row"])
@pytest.mark.parametrize("k,padding,h", CASES)
def test_conv2d_matches_lax_conv_values_and_gradients(k, padding, h, blocks, monkeypatch):
    b, w, c_in, c_out = 2, h - 1, 3, 5  # H != W and Cin != Cout: a transposed axis cannot go unnoticed
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    if blocks == "two-row":  # several loop iterations, the last one partly zero padding
        monkeypatch.setattr(layers, "_WGRAD_BLOCK_BYTES", 2 * b * wo * k * k * c_in * 4)
        assert ho % 2 == 1 and ho > 2
    kx, kk, kb, kc = jax.random.split(jax.random.key(k * 10 + padding), 4)
    x = jax.random.normal(kx, (b, h, w, c_in))
    kernel = jax.random.normal(kk, (k, k, c_in, c_out))
    bias = jax.random.normal(kb, (c_out,))
    cot = jax.random.normal(kc, (b, ho, wo, c_out))

    y, dx, dk, db = _grads(conv2d, x, kernel, bias, padding, cot)
    y_ref, dx_ref, dk_ref, db_ref = _grads(_plain, x, kernel, bias, padding, cot)
    assert y.shape == (b, ho, wo, c_out) and dk.shape == kernel.shape and dk.dtype == kernel.dtype
    for ours, ref in ((y, y_ref), (dx, dx_ref), (dk, dk_ref), (db, db_ref)):
        assert _max_rel_err(ours, ref) < 1e-5
    if k > 1:  # the tolerance is tight enough to catch a spatially flipped or in/out-swapped kernel gradient
        assert _max_rel_err(dk, jnp.flip(dk_ref, (0, 1))) > 1e-2
        assert _max_rel_err(dx, _grads(lambda x, kn, bb, p: _plain(x, jnp.flip(kn, (0, 1)), bb, p),
                                       x, kernel, bias, padding, cot)[1]) > 1e-2


def test_conv2d_gradients_under_jit_and_in_bfloat16():
    x = jax.random.normal(jax.random.key(0), (1, 8, 7, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 6)) * 0.3
    bias = jnp.zeros((6,))
    cot = jax.random.normal(jax.random.key(2), (1, 8, 7, 6))

    f32 = jax.jit(lambda x, k: _grads(conv2d, x, k, bias, 1, cot)[1:3])(x, kernel)
    f32_ref = _grads(_plain, x, kernel, bias, 1, cot)[1:3]
    for ours, ref in zip(f32, f32_ref):
        assert _max_rel_err(ours, ref) < 1e-5

    # bfloat16 compute, float32 parameters (Conv2d's dtype="bfloat16"): gradients come back in the
    # parameters' dtype and agree with the plain bfloat16 convolution's to bfloat16 rounding.
    xb = x.astype(jnp.bfloat16)
    y, dx, dk, _ = _grads(conv2d, xb, kernel, bias, 1, cot)
    y_ref, dx_ref, dk_ref, _ = _grads(_plain, xb, kernel, bias, 1, cot)
    assert y.dtype == dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for ours, ref in ((dx, dx_ref), (dk, dk_ref)):
        assert _max_rel_err(ours, ref) < 2e-2


def test_conv2d_module_gradient_matches_plain_conv():
    from flax import nnx

    conv = Conv2d(3, 4, 3, padding=1, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 3))

    def loss(m, use_plain):
        y = _plain(x, m.kernel[...], m.bias[...], 1) if use_plain else m(x)
        return jnp.sum(jnp.sin(y))

    ours = nnx.grad(lambda m: loss(m, False))(conv)
    ref = nnx.grad(lambda m: loss(m, True))(conv)
    assert _max_rel_err(ours.kernel[...], ref.kernel[...]) < 1e-5
    assert _max_rel_err(ours.bias[...], ref.bias[...]) < 1e-5


def test_conv2d_custom_backward_only_on_cpu(monkeypatch):
    """Off XLA:CPU (GPU/TPU) conv2d is the plain convolution with autodiff's gradients: forward-mode
    works there, while the CPU path's custom_vjp has none (the switch really changes the path)."""
    x = jax.random.normal(jax.random.key(4), (1, 6, 5, 2))
    kernel = jax.random.normal(jax.random.key(5), (3, 3, 2, 3))
    tangent = jnp.ones_like(x)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: conv2d(x, kernel, None, 1), (x,), (tangent,))
    monkeypatch.setattr(layers, "_blocked_wgrad_backend", lambda: False)
    y, dy = jax.jvp(lambda x: conv2d(x, kernel, None, 1), (x,), (tangent,))
    y_ref, dy_ref = jax.jvp(lambda x: _plain(x, kernel, jnp.zeros(3), 1), (x,), (tangent,))
    assert _max_rel_err(y, y_ref) < 1e-6 and _max_rel_err(dy, dy_ref) < 1e-6
