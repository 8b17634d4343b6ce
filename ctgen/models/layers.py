"""Small building blocks shared by ctgen's models: dense layers, layer norms, GEGLU, convolutions.

Every parameter carries logical axis names (`ctgen.parallel.axes`). Layers compute in
`dtype` (float32 unless a config asks for bfloat16) and keep parameters in float32. All
broadcasts are explicit so the code runs under `jax_numpy_rank_promotion="raise"`.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ctgen.parallel.axes import constrain, param, with_axes


def token_axes(ndim: int, *last: str | None) -> tuple[str | None, ...]:
    """Logical names of a token activation (B, ..., N, *last): batch first, the token axis as
    "length", any axes between them unsharded. E.g. token_axes(4, "embed") for (B, T, N, D)."""
    if ndim < len(last) + 2:  # no batch axis
        return ("length",) + tuple(last)
    return ("batch",) + (None,) * (ndim - 2 - len(last)) + ("length",) + tuple(last)


class Buffer(nnx.Variable):
    """Non-trainable state saved with the model (EMA codebooks, counters); never an optimizer target."""


def _chunked_uniform(key: jax.Array, shape: tuple[int, ...], dtype, lo: float, hi: float,
                     max_chunk: int = 1 << 21) -> jax.Array:
    """U(lo, hi) of `shape`, drawn in row blocks when large: threefry on a 100M-element array needs
    ~3x its size in temporaries (the VGG's fc6 would add 1.2 GB to the peak of initialisation)."""
    n, row = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    if n * row <= max_chunk:
        return jax.random.uniform(key, shape, dtype, lo, hi)
    rows = max((r for r in range(1, n + 1) if n % r == 0 and r * row <= max_chunk), default=n)
    keys = jax.random.split(key, n // rows)
    blocks = jax.lax.map(lambda k: jax.random.uniform(k, (rows, *shape[1:]), dtype, lo, hi), keys)
    return blocks.reshape(shape)


def torch_linear_init(fan_in: int):
    """PyTorch's default Linear/Conv init (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / np.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return _chunked_uniform(key, tuple(shape), dtype, -bound, bound)

    return init


def bcast(v: jax.Array, ndim: int) -> jax.Array:
    """Reshape a 1-D vector so it broadcasts against the last axis of an `ndim`-D array."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis, computed in float32 (PyTorch's biased variance)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * bcast(scale.astype(jnp.float32), y.ndim)
    if bias is not None:
        y = y + bcast(bias.astype(jnp.float32), y.ndim)
    return y.astype(dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize).

    The clamp sits inside the square root, so a zero vector (zero-padded text states) has a zero
    gradient like torch's, not the NaN of d||x|| at x = 0."""
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    norm = jnp.sqrt(jnp.maximum(sq, eps * eps))
    return (x / norm.astype(x.dtype)).astype(x.dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel is (in, out), the transpose of a torch Linear weight."""

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str | None, str | None], use_bias: bool = True,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(with_axes(torch_linear_init(d_in), *axes)(rngs.params(), (d_in, d_out)))
        self.bias = (nnx.Param(with_axes(torch_linear_init(d_in), "norm")(rngs.params(), (d_out,)))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        """`kernel`, if given, replaces the stored weight (e.g. to differentiate w.r.t. it alone)."""
        kernel = self.kernel[...] if kernel is None else kernel
        y = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias is not None:
            y = y + bcast(self.bias[...].astype(y.dtype), y.ndim)
        return y


class LayerNorm(nnx.Module):
    """nn.LayerNorm(dim) with learnable scale and bias, eps 1e-5."""

    def __init__(self, dim: int):
        self.scale = param(jnp.ones((dim,), jnp.float32), "norm")
        self.bias = param(jnp.zeros((dim,), jnp.float32), "norm")

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...])


class ScaleNorm(nnx.Module):
    """GenerateCT's attention LayerNorm: learnable gamma, a bias that is a constant zero buffer.

    The zero bias is not stored in ctgen (it never changes); conversion writes it as `beta`.
    """

    def __init__(self, dim: int):
        self.scale = param(jnp.ones((dim,), jnp.float32), "norm")

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], None)


class GEGLUFeedForward(nnx.Module):
    """LayerNorm -> Dense(dim, 2*inner) -> value * gelu(gate) -> Dense(inner, dim); no biases.

    inner = int(mult * 2/3 * dim) (1365 for dim 512); the first half of the projection is the
    value, the second half the gate; GELU is the exact (erf) one.
    """

    def __init__(self, dim: int, mult: float = 4.0, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.inner = int(mult * (2 / 3) * dim)
        self.norm = LayerNorm(dim)
        self.w_in = Dense(dim, 2 * self.inner, axes=("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)
        self.w_out = Dense(self.inner, dim, axes=("mlp", "embed"), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = checkpoint_name(constrain(self.w_in(self.norm(x)), token_axes(x.ndim, "mlp")), "ff_hidden")
        value, gate = h[..., : self.inner], h[..., self.inner:]
        return self.w_out(jax.nn.gelu(gate, approximate=False) * value)


def _shifted_sum(xp: jax.Array, kernel_3x3x3xD: jax.Array, out_shape: tuple[int, ...]) -> jax.Array:
    """sum_k xp[:, kt:kt+T, kh:kh+H, kw:kw+W] * kernel[k]: a valid 3x3x3 depthwise correlation."""
    t, h, w = out_shape[1:4]
    out = None
    for dt in range(3):
        for dh in range(3):
            for dw in range(3):
                term = xp[:, dt:dt + t, dh:dh + h, dw:dw + w, :] * bcast(kernel_3x3x3xD[dt, dh, dw], 5)
                out = term if out is None else out + term
    return out


def _time_pad(causal_time: bool) -> tuple[int, int]:
    return (2, 0) if causal_time else (1, 1)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def depthwise_conv3d(x_BxTxHxWxD: jax.Array, kernel_3x3x3xD: jax.Array, bias_D: jax.Array,
                     causal_time: bool) -> jax.Array:
    """Depthwise 3x3x3 cross-correlation with zero padding (time: 2 before if causal else 1|1).

    Written as 27 shifted multiply-adds, a fused elementwise loop on XLA:CPU (grouped
    convolutions are ~100x slower there). The custom gradient keeps only the input for the
    backward pass (autodiff would save all 27 shifted copies) and computes the input gradient as
    the same loop with the flipped kernel.
    """
    k = kernel_3x3x3xD.astype(x_BxTxHxWxD.dtype)
    xp = jnp.pad(x_BxTxHxWxD, ((0, 0), _time_pad(causal_time), (1, 1), (1, 1), (0, 0)))
    return _shifted_sum(xp, k, x_BxTxHxWxD.shape) + bcast(bias_D.astype(x_BxTxHxWxD.dtype), 5)


def _dwconv_fwd(x, kernel, bias, causal_time):
    return depthwise_conv3d(x, kernel, bias, causal_time), (x, kernel, bias)


def _dwconv_bwd(causal_time, res, dy):
    x, kernel, bias = res
    lo, hi = _time_pad(causal_time)
    # dx[j] = sum_u dy_padded[j + u] * kernel[2 - u], dy padded by (2 - lo, lo) in time, (1, 1) in space.
    dyp = jnp.pad(dy, ((0, 0), (2 - lo, lo), (1, 1), (1, 1), (0, 0)))
    dx = _shifted_sum(dyp, kernel[::-1, ::-1, ::-1].astype(dy.dtype), x.shape)
    xp = jnp.pad(x, ((0, 0), (lo, hi), (1, 1), (1, 1), (0, 0)))

    def tap_grad(offset):
        # A loop (not 27 unrolled reductions), so XLA never holds 27 products at once.
        tap = jax.lax.dynamic_slice(xp, (0, offset[0], offset[1], offset[2], 0), x.shape)
        return jnp.sum((tap * dy).astype(jnp.float32), axis=(0, 1, 2, 3))

    offsets = jnp.asarray(np.array([(a, b, c) for a in range(3) for b in range(3) for c in range(3)], np.int32))
    dkernel = jax.lax.map(tap_grad, offsets).reshape(kernel.shape).astype(kernel.dtype)
    dbias = jnp.sum(dy, axis=(0, 1, 2, 3), dtype=jnp.float32).astype(bias.dtype)
    return dx.astype(x.dtype), dkernel, dbias


depthwise_conv3d.defvjp(_dwconv_fwd, _dwconv_bwd)


class PEG(nnx.Module):
    """Position-generating depthwise 3x3x3 convolution over a (T, H, W) token grid."""

    def __init__(self, dim: int, *, causal: bool, rngs: nnx.Rngs):
        self.causal = causal
        self.kernel = nnx.Param(with_axes(torch_linear_init(27), "conv_k", "conv_k", "conv_k", "embed")(
            rngs.params(), (3, 3, 3, dim)))
        self.bias = nnx.Param(with_axes(torch_linear_init(27), "norm")(rngs.params(), (dim,)))

    def __call__(self, x: jax.Array, grid_BxTxHxW: Sequence[int]) -> jax.Array:
        """Reinterpret `x` row-major as (B, T, H, W, D) (GenerateCT's raw reshape), convolve, restore."""
        shape = x.shape
        y = depthwise_conv3d(x.reshape(*grid_BxTxHxW, shape[-1]), self.kernel[...], self.bias[...], self.causal)
        return y.reshape(shape)


def _lax_conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCinxCout: jax.Array, padding: int) -> jax.Array:
    """XLA's stride-1 NHWC/HWIO cross-correlation with `padding` zeros on every side."""
    return jax.lax.conv_general_dilated(
        x_BxHxWxC, kernel_KxKxCinxCout, window_strides=(1, 1), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Target size of one im2col block in the weight gradient (bytes). At the SR U-Net's shapes one
# output row of patches is 1.2 MB (512 x 9 x 64 floats, likewise 256 x 9 x 128 and 128 x 9 x 256),
# so this gives one row per block; measured at 512^2x64 (load ~5, docs/superres.md): 1 row 0.49-0.56 s,
# 3 rows 0.63 s, 14 rows 0.83 s, the whole 576 MB patch matrix at once 1.34 s.
_WGRAD_BLOCK_BYTES = 2 << 20


def conv2d_weight_grad(x_BxHxWxC: jax.Array, dy_BxHoxWoxCout: jax.Array, k: int, padding: int) -> jax.Array:
    """d/dkernel of sum(dy * conv(x, kernel)) for a stride-1 k x k convolution: (k, k, Cin, Cout).

    dkernel[a, b, i, o] = sum over (n, y, x) of x_padded[n, y + a, x + b, i] * dy[n, y, x, o], i.e.
    one GEMM dy^T (Cout, N) @ patches (N, k*k*Cin) over all N = B*Ho*Wo output positions. The
    positions are taken a block of output rows at a time (about `_WGRAD_BLOCK_BYTES` of patches)
    in a loop that accumulates in float32, so the patch matrix is never materialised whole.
    """
    b, c = x_BxHxWxC.shape[0], x_BxHxWxC.shape[-1]
    ho, wo, c_out = dy_BxHoxWoxCout.shape[1:]
    if dy_BxHoxWoxCout.size == 0 or x_BxHxWxC.size == 0:
        return jnp.zeros((k, k, c, c_out), jnp.float32)
    rows = int(min(ho, max(1, _WGRAD_BLOCK_BYTES // max(1, b * wo * k * k * c * x_BxHxWxC.dtype.itemsize))))
    n_blocks = -(-ho // rows)
    # Zero rows past the end (dy's padding rows contribute nothing); xp has k - 1 more rows than dy.
    xp = jnp.pad(x_BxHxWxC, ((0, 0), (padding, padding + n_blocks * rows - ho), (padding, padding), (0, 0)))
    dy = jnp.pad(dy_BxHoxWoxCout, ((0, 0), (0, n_blocks * rows - ho), (0, 0), (0, 0)))

    def block(i, acc):
        xb = jax.lax.dynamic_slice_in_dim(xp, i * rows, rows + k - 1, axis=1)
        db = jax.lax.dynamic_slice_in_dim(dy, i * rows, rows, axis=1).reshape(b * rows * wo, c_out)
        patches = jnp.concatenate([xb[:, u:u + rows, v:v + wo] for u in range(k) for v in range(k)], axis=-1)
        return acc + jax.lax.dot_general(db, patches.reshape(b * rows * wo, k * k * c), (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    acc = jnp.zeros((c_out, k * k * c), jnp.float32)
    acc = block(0, acc) if n_blocks == 1 else jax.lax.fori_loop(0, n_blocks, block, acc)
    return acc.T.reshape(k, k, c, c_out)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_blocked_wgrad(x_BxHxWxC: jax.Array, kernel_KxKxCinxCout: jax.Array, padding: int) -> jax.Array:
    """`_lax_conv2d` with a hand-written backward pass (x and kernel share a dtype).

    XLA:CPU computes autodiff's kernel gradient as a convolution whose "kernel" is the whole
    output gradient; at the SR U-Net's shapes that ran 3-6x slower than PyTorch's
    (e.g. 2.1-2.7 s vs 0.41-0.64 s at 512^2x64, docs/superres.md). Here the kernel gradient is a blocked im2col GEMM
    (`conv2d_weight_grad`); the input gradient is the usual full correlation of dy with the kernel
    flipped in space and transposed in/out (the same convolution autodiff would emit).
    """
    return _lax_conv2d(x_BxHxWxC, kernel_KxKxCinxCout, padding)


def _conv2d_fwd(x, kernel, padding):
    return _lax_conv2d(x, kernel, padding), (x, kernel)


def _conv2d_bwd(padding, res, dy):
    x, kernel = res
    k = kernel.shape[0]
    dx = _lax_conv2d(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), k - 1 - padding)
    return dx, conv2d_weight_grad(x, dy, k, padding).astype(kernel.dtype)


_conv2d_blocked_wgrad.defvjp(_conv2d_fwd, _conv2d_bwd)


def _blocked_wgrad_backend() -> bool:
    """Whether conv2d's blocked weight gradient is used: on XLA:CPU only (see conv2d)."""
    return jax.default_backend() == "cpu"


def conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCinxCout: jax.Array, bias: jax.Array | None, padding: int) -> jax.Array:
    """Stride-1 NHWC 2-D convolution (cross-correlation, zero padding).

    On XLA:CPU, square kernels with 0 <= padding <= k - 1 (every convolution in ctgen) take the
    custom backward pass of `_conv2d_blocked_wgrad`; values and gradients equal the plain XLA
    convolution's up to float32 summation order. (A custom_vjp has no forward-mode derivative:
    jax.jvp through conv2d raises on CPU; nothing in ctgen uses one.) On GPU and TPU the vendor's
    native convolution backward is the fast one, so autodiff of the plain convolution is kept.
    """
    kernel = kernel_KxKxCinxCout.astype(x_BxHxWxC.dtype)
    k = kernel.shape[0]
    if _blocked_wgrad_backend() and kernel.shape[1] == k and 0 <= padding <= k - 1:
        y = _conv2d_blocked_wgrad(x_BxHxWxC, kernel, padding)
    else:
        y = _lax_conv2d(x_BxHxWxC, kernel, padding)
    if bias is not None:
        y = y + bcast(bias.astype(y.dtype), 4)
    return y


class Conv2d(nnx.Module):
    """NHWC stride-1 2-D convolution; kernel (k, k, in, out) = torch weight (out, in, k, k) permuted."""

    def __init__(self, c_in: int, c_out: int, k: int, *, padding: int, dtype=jnp.float32, rngs: nnx.Rngs):
        fan_in = c_in * k * k
        self.kernel = nnx.Param(with_axes(torch_linear_init(fan_in), "conv_k", "conv_k", "conv_in", "conv_out")(
            rngs.params(), (k, k, c_in, c_out)))
        self.bias = nnx.Param(with_axes(torch_linear_init(fan_in), "norm")(rngs.params(), (c_out,)))
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kernel.shape[0] == 1:  # 1x1: a matmul, no convolution machinery
            y = jnp.matmul(x.astype(self.dtype), self.kernel[...][0, 0].astype(self.dtype))
            return y + bcast(self.bias[...].astype(y.dtype), 4)
        return conv2d(x.astype(self.dtype), self.kernel[...], self.bias[...], self.padding)


def leaky_relu(x: jax.Array, slope: float = 0.1) -> jax.Array:
    return jnp.where(x > 0, x, slope * x)  # derivative at 0 is `slope`, as in torch
