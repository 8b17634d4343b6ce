"""Building blocks of GenerateCT's super-resolution U-Net (an Imagen-pytorch derivative), in NNX, NHWC.

Each block computes what the same-named module of GenerateCT's `superres_pytorch.py` computes;
`ctgen.convert.superres` maps their parameters. Differences are in layout and in the order of
operations only:
- feature maps are NHWC (B, H, W, C); convolution kernels are (k, k, in, out);
- space-to-depth downsampling is a 2x2 stride-2 convolution written as reshape + matmul, and the
  pixel-shuffle upsampling's 1x1 convolution emits its channels in (row, column, channel) order, so
  neither needs a transpose of the feature map (the converter permutes the PyTorch weights);
- cross-attention attends to ~41 context tokens, so its query and output projections are folded
  into the keys and values (`CrossAttention`): two matmuls per pixel instead of four.
Norms are computed in float32; convolutions and matmuls in `dtype` (float32 or bfloat16).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ctgen.models.layers import Conv2d, Dense, LayerNorm, ScaleNorm, bcast, torch_linear_init
from ctgen.parallel.axes import constrain, param, with_axes

FMAP = ("batch", None, None, None)  # logical axes of a feature map (B, H, W, C): split over the batch only


def silu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def kaiming_uniform(fan_in: int):
    """torch.nn.init.kaiming_uniform_ with its defaults (a=0): U(-sqrt(6/fan_in), +)."""
    bound = math.sqrt(6.0 / max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class GroupNorm(nnx.Module):
    """nn.GroupNorm(groups, C) over NHWC feature maps (eps 1e-5, computed in float32)."""

    def __init__(self, groups: int, channels: int):
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        self.groups = groups
        self.scale = param(jnp.ones((channels,), jnp.float32), "norm")
        self.bias = param(jnp.zeros((channels,), jnp.float32), "norm")

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        b, h, w, c = x_BxHxWxC.shape
        x = x_BxHxWxC.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(x, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 4), keepdims=True)
        y = ((x - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(b, h, w, c)
        return y * bcast(self.scale[...], 4) + bcast(self.bias[...], 4)


class Block(nnx.Module):
    """GroupNorm -> optional (scale + 1, shift) from the time vector -> SiLU -> 3x3 convolution."""

    def __init__(self, c_in: int, c_out: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.groupnorm = GroupNorm(groups, c_in)
        self.project = Conv2d(c_in, c_out, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, scale_shift: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        h = self.groupnorm(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            h = h * (scale[:, None, None, :] + 1.0) + shift[:, None, None, :]
        return self.project(silu(h).astype(self.project.dtype))


class GlobalContext(nnx.Module):
    """Global-context gate: softmax(1x1 conv) pooling over pixels -> 1x1 conv, SiLU, 1x1 conv -> sigmoid."""

    def __init__(self, c_in: int, c_out: int, *, dtype, rngs: nnx.Rngs):
        hidden = max(3, c_out // 2)
        self.to_k = Conv2d(c_in, 1, 1, padding=0, dtype=dtype, rngs=rngs)
        self.net_in = Conv2d(c_in, hidden, 1, padding=0, dtype=dtype, rngs=rngs)
        self.net_out = Conv2d(hidden, c_out, 1, padding=0, dtype=dtype, rngs=rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """The gate (B, 1, 1, C_out) in float32."""
        b, h, w, c = x_BxHxWxC.shape
        logits = self.to_k(x_BxHxWxC).astype(jnp.float32).reshape(b, h * w)
        weights = jax.nn.softmax(logits, axis=-1).astype(x_BxHxWxC.dtype)
        pooled = jnp.einsum("bn,bnc->bc", weights, x_BxHxWxC.reshape(b, h * w, c),
                            preferred_element_type=jnp.float32)
        hidden = silu(_dense_1x1(self.net_in, pooled))
        return jax.nn.sigmoid(_dense_1x1(self.net_out, hidden)).reshape(b, 1, 1, -1)


def _dense_1x1(conv: Conv2d, x_BxC: jax.Array) -> jax.Array:
    """A 1x1 convolution applied to a vector per sample (float32)."""
    y = jnp.matmul(x_BxC.astype(jnp.float32), conv.kernel[...][0, 0].astype(jnp.float32))
    return y + bcast(conv.bias[...], 2)


class CrossAttention(nnx.Module):
    """Pre-norm multi-head attention of every pixel to the conditioning tokens plus one learned
    null key/value (shared by all heads); no mask; output projection followed by a gain-only norm.

    The context is short (GenerateCT: 2 time + 2 low-res time + 36 text tokens), so the query
    projection is folded into the keys (logits = x_n (W_q k^T)) and the output projection into
    the values (out = attn (v W_out)): two matmuls of width heads * (1 + M) per pixel instead of
    four of width heads * dim_head, with the same parameters and the same result.
    """

    def __init__(self, dim: int, context_dim: int, *, heads: int, dim_head: int, dtype, rngs: nnx.Rngs):
        inner = heads * dim_head
        self.heads, self.dim_head, self.dtype = heads, dim_head, dtype
        self.norm = ScaleNorm(dim)
        self.null_kv = nnx.Param(with_axes(jax.nn.initializers.normal(1.0), None, "kv")(rngs.params(), (2, dim_head)))
        self.to_q = Dense(dim, inner, axes=("embed", "joined_kv"), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_kv = Dense(context_dim, 2 * inner, axes=("embed", "joined_kv"), use_bias=False, dtype=dtype,
                           rngs=rngs)
        self.to_out = Dense(inner, dim, axes=("joined_kv", "embed"), use_bias=False, dtype=dtype, rngs=rngs)
        self.out_norm = ScaleNorm(dim)

    def __call__(self, x_BxNxC: jax.Array, context_BxMxD: jax.Array) -> jax.Array:
        b, n, c = x_BxNxC.shape
        h, dh = self.heads, self.dim_head
        xn = self.norm(x_BxNxC).astype(self.dtype)
        kv = self.to_kv(context_BxMxD).astype(jnp.float32)
        k, v = kv[..., : h * dh], kv[..., h * dh:]
        m = context_BxMxD.shape[1]
        k = k.reshape(b, m, h, dh)
        v = v.reshape(b, m, h, dh)
        null_k = jnp.broadcast_to(self.null_kv[...][0].reshape(1, 1, 1, dh), (b, 1, h, dh))
        null_v = jnp.broadcast_to(self.null_kv[...][1].reshape(1, 1, 1, dh), (b, 1, h, dh))
        k = jnp.concatenate([null_k, k], axis=1)  # (B, 1+M, h, dh): the null token first, as GenerateCT
        v = jnp.concatenate([null_v, v], axis=1)
        w_q = self.to_q.kernel[...].astype(jnp.float32).reshape(c, h, dh)
        w_out = self.to_out.kernel[...].astype(jnp.float32).reshape(h, dh, c)
        keys_BxCxHxM = jnp.einsum("chd,bmhd->bchm", w_q, k) * (dh ** -0.5)
        values_BxHxMxC = jnp.einsum("bmhd,hdc->bhmc", v, w_out)
        logits = jnp.einsum("bnc,bchm->bnhm", xn, keys_BxCxHxM.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bnhm,bhmc->bnc", attn, values_BxHxMxC.astype(self.dtype),
                         preferred_element_type=jnp.float32)
        return self.out_norm(out)


class ResnetBlock(nnx.Module):
    """GenerateCT's ResnetBlock: block1 -> [+ cross-attention] -> block2 with (scale, shift) from
    the time vector -> [x global-context gate] -> + residual (1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int, *, time_cond_dim: int, groups: int, cond_dim: int | None = None,
                 heads: int = 8, dim_head: int = 64, use_gca: bool = False, dtype, rngs: nnx.Rngs):
        self.time_mlp = Dense(time_cond_dim, 2 * c_out, axes=("mlp", "embed"), rngs=rngs)
        self.cross_attn = (CrossAttention(c_out, cond_dim, heads=heads, dim_head=dim_head, dtype=dtype, rngs=rngs)
                           if cond_dim else None)
        self.block1 = Block(c_in, c_out, groups, dtype=dtype, rngs=rngs)
        self.block2 = Block(c_out, c_out, groups, dtype=dtype, rngs=rngs)
        self.gca = GlobalContext(c_out, c_out, dtype=dtype, rngs=rngs) if use_gca else None
        self.res_conv = Conv2d(c_in, c_out, 1, padding=0, dtype=dtype, rngs=rngs) if c_in != c_out else None
        self.c_out = c_out

    def __call__(self, x_BxHxWxC: jax.Array, t_BxT: jax.Array, cond_BxMxD: jax.Array | None = None) -> jax.Array:
        ss = self.time_mlp(silu(t_BxT)).astype(jnp.float32)
        scale_shift = (ss[:, : self.c_out], ss[:, self.c_out:])
        h = self.block1(x_BxHxWxC)
        if self.cross_attn is not None:
            b, hh, ww, c = h.shape
            flat = h.reshape(b, hh * ww, c)
            h = (self.cross_attn(flat, cond_BxMxD) + flat.astype(jnp.float32)).reshape(b, hh, ww, c)
        h = self.block2(h, scale_shift)
        if self.gca is not None:
            h = h * self.gca(h).astype(h.dtype)
        res = x_BxHxWxC if self.res_conv is None else self.res_conv(x_BxHxWxC)
        return constrain(h.astype(jnp.float32) + res.astype(jnp.float32), FMAP)


class Downsample(nnx.Module):
    """Space-to-depth 2x2 followed by a 1x1 convolution = a 2x2 convolution of stride 2, computed
    as reshape + matmul. kernel (2, 2, C_in, C_out) (GenerateCT's (C_out, 4 C_in, 1, 1) with its
    input channels in (c, row, column) order, permuted by the converter)."""

    def __init__(self, c_in: int, c_out: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(with_axes(torch_linear_init(4 * c_in), "conv_k", "conv_k", "conv_in", "conv_out")(
            rngs.params(), (2, 2, c_in, c_out)))
        self.bias = nnx.Param(with_axes(torch_linear_init(4 * c_in), "norm")(rngs.params(), (c_out,)))
        self.dtype = dtype

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        b, h, w, c = x_BxHxWxC.shape
        x = x_BxHxWxC.astype(self.dtype).reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
        y = jnp.matmul(x.reshape(b, h // 2, w // 2, 4 * c), self.kernel[...].reshape(4 * c, -1).astype(self.dtype))
        return y + bcast(self.bias[...].astype(y.dtype), 4)


class PixelShuffleUpsample(nnx.Module):
    """1x1 convolution to 4 C_out channels, SiLU, depth-to-space 2x2. The convolution's outputs
    are in (row, column, channel) order (the converter permutes GenerateCT's (channel, row,
    column) order); initialised like GenerateCT: one kaiming-uniform kernel repeated for the four
    sub-pixels, zero bias."""

    def __init__(self, c_in: int, c_out: int, *, dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(c_in, 4 * c_out, 1, padding=0, dtype=dtype, rngs=rngs)
        base = kaiming_uniform(c_in)(rngs.params(), (1, 1, c_in, c_out))
        self.conv.kernel[...] = jnp.tile(base, (1, 1, 1, 4))  # the same kernel for every (row, column)
        self.conv.bias[...] = jnp.zeros((4 * c_out,), jnp.float32)
        self.c_out = c_out

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        b, h, w, _ = x_BxHxWxC.shape
        y = silu(self.conv(x_BxHxWxC)).reshape(b, h, w, 2, 2, self.c_out)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, self.c_out)


class CrossEmbed(nnx.Module):
    """Convolutions of several kernel sizes (stride 1, 'same' padding) concatenated along channels:
    for 64 outputs and kernels (3, 7, 15), 32 + 16 + 16 channels."""

    def __init__(self, c_in: int, c_out: int, kernel_sizes: tuple[int, ...], *, dtype, rngs: nnx.Rngs):
        kernel_sizes = tuple(sorted(kernel_sizes))
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"cross-embed kernels must be odd, got {kernel_sizes}")
        widths = [int(c_out / 2 ** i) for i in range(1, len(kernel_sizes))]
        widths.append(c_out - sum(widths))
        self.convs = nnx.List([Conv2d(c_in, w, k, padding=(k - 1) // 2, dtype=dtype, rngs=rngs)
                               for k, w in zip(kernel_sizes, widths)])

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        return jnp.concatenate([conv(x_BxHxWxC) for conv in self.convs], axis=-1)


class LearnedSinusoidalEmbedding(nnx.Module):
    """x -> [x, sin(2 pi x w), cos(2 pi x w)] with learned frequencies w (crowsonkb's v-diffusion)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        if dim % 2:
            raise ValueError(f"learned sinusoidal dimension must be even, got {dim}")
        self.weights = nnx.Param(with_axes(jax.nn.initializers.normal(1.0), None)(rngs.params(), (dim // 2,)))

    def __call__(self, x_B: jax.Array) -> jax.Array:
        x = x_B.astype(jnp.float32)[:, None]
        freqs = x * self.weights[...][None, :] * (2 * math.pi)
        return jnp.concatenate([x, jnp.sin(freqs), jnp.cos(freqs)], axis=-1)


class FeedForward(nnx.Module):
    """Gain-only LayerNorm -> Dense -> GELU (erf) -> gain-only LayerNorm -> Dense; no biases."""

    def __init__(self, dim: int, mult: float, *, dtype, rngs: nnx.Rngs):
        hidden = int(dim * mult)
        self.norm_in = ScaleNorm(dim)
        self.w_in = Dense(dim, hidden, axes=("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)
        self.norm_hidden = ScaleNorm(hidden)
        self.w_out = Dense(hidden, dim, axes=("mlp", "embed"), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.w_in(self.norm_in(x)).astype(jnp.float32), approximate=False)
        return self.w_out(self.norm_hidden(h)).astype(jnp.float32)


class PerceiverAttention(nnx.Module):
    """Latents attend to [sequence, latents] (Flamingo-style); LayerNorms with bias; no mask."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, dtype, rngs: nnx.Rngs):
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm = LayerNorm(dim)
        self.norm_latents = LayerNorm(dim)
        self.to_q = Dense(dim, inner, axes=("embed", "joined_kv"), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_kv = Dense(dim, 2 * inner, axes=("embed", "joined_kv"), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_out = Dense(inner, dim, axes=("joined_kv", "embed"), use_bias=False, dtype=dtype, rngs=rngs)
        self.out_norm = LayerNorm(dim)

    def __call__(self, x_BxNxD: jax.Array, latents_BxKxD: jax.Array) -> jax.Array:
        b, k, _ = latents_BxKxD.shape
        h, dh = self.heads, self.dim_head
        x = self.norm(x_BxNxD)
        lat = self.norm_latents(latents_BxKxD)
        q = self.to_q(lat).astype(jnp.float32).reshape(b, k, h, dh) * (dh ** -0.5)
        kv = self.to_kv(jnp.concatenate([x, lat], axis=1)).astype(jnp.float32)
        keys = kv[..., : h * dh].reshape(b, -1, h, dh)
        values = kv[..., h * dh:].reshape(b, -1, h, dh)
        attn = jax.nn.softmax(jnp.einsum("bkhd,bnhd->bhkn", q, keys), axis=-1)
        out = jnp.einsum("bhkn,bnhd->bkhd", attn, values).reshape(b, k, h * dh)
        return self.out_norm(self.to_out(out).astype(jnp.float32))


class PerceiverResampler(nnx.Module):
    """Text tokens (B, N, D) -> `num_latents` + `num_mean_pooled` latents (B, K, D): learned
    latents plus latents projected from the sequence mean, refined by `depth` rounds of
    attention to [sequence + positions, latents] and a feed-forward, both residual."""

    def __init__(self, dim: int, *, depth: int, heads: int, dim_head: int, num_latents: int, num_mean_pooled: int,
                 max_seq_len: int, ff_mult: float, dtype, rngs: nnx.Rngs):
        self.pos_emb = nnx.Param(with_axes(jax.nn.initializers.normal(1.0), "pos", "embed")(
            rngs.params(), (max_seq_len, dim)))
        self.latents = nnx.Param(with_axes(jax.nn.initializers.normal(1.0), None, "embed")(
            rngs.params(), (num_latents, dim)))
        self.mean_pooled_norm = ScaleNorm(dim)
        self.to_mean_pooled = Dense(dim, dim * num_mean_pooled, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.num_mean_pooled = num_mean_pooled
        self.attn = nnx.List([PerceiverAttention(dim, heads=heads, dim_head=dim_head, dtype=dtype, rngs=rngs)
                              for _ in range(depth)])
        self.ff = nnx.List([FeedForward(dim, ff_mult, dtype=dtype, rngs=rngs) for _ in range(depth)])

    def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
        b, n, d = x_BxNxD.shape
        x_with_pos = x_BxNxD + self.pos_emb[...][None, :n]
        # GenerateCT's mean is over every position (its text mask is not passed to the resampler).
        mean = self.to_mean_pooled(self.mean_pooled_norm(jnp.mean(x_BxNxD, axis=1))).astype(jnp.float32)
        latents = jnp.concatenate([mean.reshape(b, self.num_mean_pooled, d),
                                   jnp.broadcast_to(self.latents[...][None], (b, *self.latents.shape))], axis=1)
        for attn, ff in zip(self.attn, self.ff):
            latents = attn(x_with_pos, latents) + latents
            latents = ff(latents) + latents
        return latents

