"""GenerateCT's text-conditioned super-resolution U-Net (stage 3) in Flax NNX, NHWC.

The network of GenerateCT's `Superres` cascade (`unets[1]`): it denoises a 2-D slice while seeing
the upsampled low-resolution slice (concatenated as an input channel and again before the last
convolution), the diffusion time and the low-res augmentation level (each as a learned-sinusoidal
embedding -> a conditioning vector and tokens), and the T5 text states (projected, padded with
learned null embeddings, pooled by a Perceiver resampler into tokens and a vector).

Structure (memory-efficient Imagen U-Net): cross-embed input convolution -> resnet block ->
per stage [space-to-depth downsample, resnet block with cross-attention, `num_resnet_blocks`
resnet blocks with global-context gates] -> two middle resnet blocks with cross-attention ->
mirrored up stages (skips concatenated after scaling by 2^-0.5, pixel-shuffle upsampling) ->
final resnet block -> concat low-res -> zero-initialised 3x3 convolution.

`UNetConfig.paper()` is GenerateCT's configuration (22,190,440 parameters), including its quirk:
OmegaConf hands `layer_cross_attns` over as a ListConfig, which the reference does not expand
per stage, so every stage has cross-attention; the published weights have it, so `paper` has it.
Parameter names map to GenerateCT's through `ctgen.convert.superres`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ctgen.config_dataclass import build_dataclass
from ctgen.models.layers import Conv2d, Dense, LayerNorm
from ctgen.models.unet_blocks import (FMAP, CrossEmbed, Downsample, LearnedSinusoidalEmbedding, PerceiverResampler,
                                      PixelShuffleUpsample, ResnetBlock, silu)
from ctgen.parallel.axes import constrain, with_axes


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of the SR U-Net. `paper()` is GenerateCT's; `tiny()` runs in tests in seconds.

    dim_mults: channel multiples of `dim` per stage (one space-to-depth downsample each);
      inputs must be divisible by 2 ** len(dim_mults).
    layer_cross_attns: per stage, whether its first resnet block cross-attends to the
      conditioning tokens (the middle blocks always do).
    cond_dim: width of the conditioning tokens; time_cond_dim = 8 * dim is the conditioning vector.
    max_text_len: text positions after projection (longer prompts are cut, shorter ones padded
      with the learned null embedding).
    dtype: compute dtype of convolutions and matmuls ("float32" or "bfloat16"); parameters and
      norms stay float32.
    remat: recompute each resnet block's activations in the backward pass (training memory).
    residual: what the diffusion generates. False (GenerateCT): the slice itself, in [-1, 1].
      True (beyond the reference; the phantom demo's SR): the residual `slice - bicubic(low-res)` in
      [0, 1] units (so also within [-1, 1]); the sampler adds the bicubic upsampling of the low-res
      input back. The network and its weights are the same either way; only the meaning of its
      output changes, so such weights are not for GenerateCT's sampler (export refuses them).
    """

    dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 4)
    channels: int = 1
    num_resnet_blocks: int = 2
    layer_cross_attns: tuple[bool, ...] = (True, True, True)
    cond_dim: int = 64
    text_embed_dim: int = 768
    max_text_len: int = 256
    num_time_tokens: int = 2
    learned_sinu_dim: int = 16
    attn_heads: int = 8
    attn_dim_head: int = 64
    resnet_groups: int = 8
    init_cross_embed_kernel_sizes: tuple[int, ...] = (3, 7, 15)
    attn_pool_num_latents: int = 32
    attn_pool_num_mean_pooled: int = 4
    attn_pool_depth: int = 2
    attn_pool_max_seq_len: int = 512
    attn_pool_ff_mult: float = 4.0
    use_global_context_attn: bool = True
    scale_skip_connection: bool = True
    final_conv_kernel_size: int = 3
    dtype: str = "float32"
    remat: bool = False
    residual: bool = False

    def __post_init__(self):
        if len(self.layer_cross_attns) != len(self.dim_mults):
            raise ValueError(f"layer_cross_attns {self.layer_cross_attns} needs one entry per stage "
                             f"(dim_mults {self.dim_mults})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def time_cond_dim(self) -> int:
        return 8 * self.dim  # 4 * dim, doubled for the low-res conditioning

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.dim_mults)

    @classmethod
    def paper(cls, **overrides: Any) -> "UNetConfig":
        """GenerateCT's superres.yaml U-Net: dim 64, dim_mults (1, 2, 4), 2 resnet blocks, 8 heads,
        cross-attention in every stage, T5-base text (768)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "UNetConfig":
        """A few thousand parameters, text width 64 (ctgen's built-in test T5)."""
        base = cls(dim=16, dim_mults=(1, 2), num_resnet_blocks=1, layer_cross_attns=(True, True), cond_dim=16,
                   text_embed_dim=64, max_text_len=32, learned_sinu_dim=8, attn_heads=2, attn_dim_head=8,
                   resnet_groups=4, init_cross_embed_kernel_sizes=(3, 7), attn_pool_num_latents=4,
                   attn_pool_num_mean_pooled=2, attn_pool_depth=1, attn_pool_max_seq_len=32)
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "UNetConfig":
        """Inverse of `to_dict`; also a ConfigDict or a JSON round trip (lists for tuples)."""
        return build_dataclass(cls, d)


class TimeConditioning(nnx.Module):
    """A scalar per sample (a log-SNR) -> learned sinusoidal features -> hidden (Dense + SiLU) ->
    conditioning vector (B, T) and `num_tokens` tokens (B, n, cond_dim)."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        t = cfg.time_cond_dim
        self.num_tokens, self.cond_dim = cfg.num_time_tokens, cfg.cond_dim
        self.sinu = LearnedSinusoidalEmbedding(cfg.learned_sinu_dim, rngs=rngs)
        self.to_hidden = Dense(cfg.learned_sinu_dim + 1, t, axes=(None, "mlp"), rngs=rngs)
        self.to_cond = Dense(t, t, axes=("mlp", "embed"), rngs=rngs)
        self.to_tokens = Dense(t, cfg.cond_dim * cfg.num_time_tokens, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, value_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden = silu(self.to_hidden(self.sinu(value_B)))
        tokens = self.to_tokens(hidden).reshape(-1, self.num_tokens, self.cond_dim)
        return self.to_cond(hidden), tokens


class TextConditioning(nnx.Module):
    """T5 states -> conditioning tokens (Perceiver latents) and a vector added to the time vector.
    Positions that are padding (`mask` False) or whose sample drops its text (`keep` False, for
    classifier-free guidance) take the learned null embedding; a dropped sample's vector is the
    learned null vector."""

    def __init__(self, cfg: UNetConfig, *, dtype, rngs: nnx.Rngs):
        t = cfg.time_cond_dim
        self.max_len = cfg.max_text_len
        normal = jax.nn.initializers.normal(1.0)
        self.null_text_embed = nnx.Param(with_axes(normal, "pos", "embed")(rngs.params(),
                                                                           (cfg.max_text_len, cfg.cond_dim)))
        self.null_text_hidden = nnx.Param(with_axes(normal, "embed")(rngs.params(), (t,)))
        self.text_to_cond = Dense(cfg.text_embed_dim, cfg.cond_dim, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.attn_pool = PerceiverResampler(
            cfg.cond_dim, depth=cfg.attn_pool_depth, heads=cfg.attn_heads, dim_head=cfg.attn_dim_head,
            num_latents=cfg.attn_pool_num_latents, num_mean_pooled=cfg.attn_pool_num_mean_pooled,
            max_seq_len=cfg.attn_pool_max_seq_len, ff_mult=cfg.attn_pool_ff_mult, dtype=dtype, rngs=rngs)
        self.hidden_norm = LayerNorm(cfg.cond_dim)
        self.hidden_in = Dense(cfg.cond_dim, t, axes=("embed", "mlp"), rngs=rngs)
        self.hidden_out = Dense(t, t, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, text_BxLxE: jax.Array, mask_BxL: jax.Array, keep_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        tokens = self.text_to_cond(text_BxLxE[:, : self.max_len]).astype(jnp.float32)
        mask = mask_BxL[:, : self.max_len]
        pad = self.max_len - tokens.shape[1]
        if pad:
            tokens = jnp.pad(tokens, ((0, 0), (0, pad), (0, 0)))
            mask = jnp.pad(mask, ((0, 0), (0, pad)))
        use = jnp.logical_and(mask, keep_B[:, None])[..., None]
        tokens = jnp.where(use, tokens, self.null_text_embed[...][None])
        tokens = self.attn_pool(tokens)
        hidden = self.hidden_out(silu(self.hidden_in(self.hidden_norm(jnp.mean(tokens, axis=1)))))
        hidden = jnp.where(keep_B[:, None], hidden, self.null_text_hidden[...][None])
        return tokens, hidden


class DownStage(nnx.Module):
    def __init__(self, c_in: int, c_out: int, cross: bool, cfg: UNetConfig, *, dtype, rngs: nnx.Rngs):
        kw = dict(time_cond_dim=cfg.time_cond_dim, groups=cfg.resnet_groups, heads=cfg.attn_heads,
                  dim_head=cfg.attn_dim_head, dtype=dtype, rngs=rngs)
        self.downsample = Downsample(c_in, c_out, dtype=dtype, rngs=rngs)
        self.init_block = ResnetBlock(c_out, c_out, cond_dim=cfg.cond_dim if cross else None, **kw)
        self.blocks = nnx.List([ResnetBlock(c_out, c_out, use_gca=cfg.use_global_context_attn, **kw)
                                for _ in range(cfg.num_resnet_blocks)])


class UpStage(nnx.Module):
    def __init__(self, c_out: int, skip: int, c_next: int, cross: bool, cfg: UNetConfig, *, dtype, rngs: nnx.Rngs):
        kw = dict(time_cond_dim=cfg.time_cond_dim, groups=cfg.resnet_groups, heads=cfg.attn_heads,
                  dim_head=cfg.attn_dim_head, dtype=dtype, rngs=rngs)
        self.init_block = ResnetBlock(c_out + skip, c_out, cond_dim=cfg.cond_dim if cross else None, **kw)
        self.blocks = nnx.List([ResnetBlock(c_out + skip, c_out, use_gca=cfg.use_global_context_attn, **kw)
                                for _ in range(cfg.num_resnet_blocks)])
        self.upsample = PixelShuffleUpsample(c_out, c_next, dtype=dtype, rngs=rngs)


class UNet(nnx.Module):
    """GenerateCT's SR U-Net; see the module docstring. Returns the network output (GenerateCT
    trains it to predict v) with the shape of `x`."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        dims = [cfg.dim] + [cfg.dim * m for m in cfg.dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        kw = dict(time_cond_dim=cfg.time_cond_dim, groups=cfg.resnet_groups, heads=cfg.attn_heads,
                  dim_head=cfg.attn_dim_head, dtype=dtype, rngs=rngs)
        self.init_conv = CrossEmbed(2 * cfg.channels, cfg.dim, cfg.init_cross_embed_kernel_sizes, dtype=dtype,
                                    rngs=rngs)
        self.time = TimeConditioning(cfg, rngs=rngs)
        self.lowres_time = TimeConditioning(cfg, rngs=rngs)
        self.text = TextConditioning(cfg, dtype=dtype, rngs=rngs)
        self.norm_cond = LayerNorm(cfg.cond_dim)
        self.init_resnet_block = ResnetBlock(cfg.dim, cfg.dim, use_gca=cfg.use_global_context_attn, **kw)
        self.downs = nnx.List([DownStage(a, b, cross, cfg, dtype=dtype, rngs=rngs)
                               for (a, b), cross in zip(in_out, cfg.layer_cross_attns)])
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, cond_dim=cfg.cond_dim, **kw)
        self.mid_block2 = ResnetBlock(mid, mid, cond_dim=cfg.cond_dim, **kw)
        self.ups = nnx.List([UpStage(b, b, a, cross, cfg, dtype=dtype, rngs=rngs)
                             for (a, b), cross in zip(reversed(in_out), reversed(cfg.layer_cross_attns))])
        self.final_res_block = ResnetBlock(cfg.dim, cfg.dim, use_gca=True, **kw)
        k = cfg.final_conv_kernel_size
        self.final_conv = Conv2d(cfg.dim + cfg.channels, cfg.channels, k, padding=k // 2, dtype=dtype, rngs=rngs)
        self.final_conv.kernel[...] = jnp.zeros_like(self.final_conv.kernel[...])
        self.final_conv.bias[...] = jnp.zeros_like(self.final_conv.bias[...])

    def _block(self, block: ResnetBlock) -> Callable[..., jax.Array]:
        """`block`, recomputed in the backward pass when `cfg.remat`."""
        if not self.cfg.remat:
            return block
        graphdef, state = nnx.split(block)

        @jax.checkpoint
        def run(state, *args):
            return nnx.merge(graphdef, state)(*args)

        return lambda *args: run(state, *args)

    def conditioning(self, log_snr_B: jax.Array, lowres_log_snr_B: jax.Array, text_BxLxE: jax.Array,
                     text_mask_BxL: jax.Array, text_keep_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(time vector t (B, 8 dim), normalised conditioning tokens c (B, M, cond_dim))."""
        keep = jnp.ones(log_snr_B.shape, bool) if text_keep_B is None else text_keep_B
        t, time_tokens = self.time(log_snr_B)
        lowres_t, lowres_tokens = self.lowres_time(lowres_log_snr_B)
        text_tokens, text_hidden = self.text(text_BxLxE, text_mask_BxL.astype(bool), keep)
        t = t + lowres_t + text_hidden
        c = layer_norm_tokens(self.norm_cond, jnp.concatenate([time_tokens, lowres_tokens, text_tokens], axis=1))
        return t, c

    def __call__(self, x_BxHxWxC: jax.Array, log_snr_B: jax.Array, lowres_BxHxWxC: jax.Array,
                 lowres_log_snr_B: jax.Array, text_BxLxE: jax.Array, text_mask_BxL: jax.Array,
                 text_keep_B: jax.Array | None = None) -> jax.Array:
        """x: the noisy image in [-1, 1] space; log_snr: the diffusion time as GenerateCT feeds it
        (the noise schedule's log-SNR); lowres: the noised, upsampled low-res image (same H, W);
        lowres_log_snr: its augmentation level's log-SNR (linear schedule); text (B, L, E) with
        mask (B, L) True at real tokens; text_keep (B,) False drops a sample's text (CFG)."""
        cfg = self.cfg
        f = cfg.downsample_factor
        if x_BxHxWxC.shape[1] % f or x_BxHxWxC.shape[2] % f:
            raise ValueError(f"image size {x_BxHxWxC.shape[1:3]} must be divisible by {f}")
        t, c = self.conditioning(log_snr_B, lowres_log_snr_B, text_BxLxE, text_mask_BxL, text_keep_B)
        lowres = lowres_BxHxWxC.astype(jnp.float32)
        x = constrain(self.init_conv(jnp.concatenate([x_BxHxWxC.astype(jnp.float32), lowres], axis=-1)), FMAP)
        x = self._block(self.init_resnet_block)(x, t)
        skips = []
        for stage in self.downs:
            x = stage.downsample(x)
            x = self._block(stage.init_block)(x, t, c)
            for block in stage.blocks:
                x = self._block(block)(x, t)
                skips.append(x)
            skips.append(x)  # GenerateCT's identity "attention" output, a second skip
        x = self._block(self.mid_block1)(x, t, c)
        x = self._block(self.mid_block2)(x, t, c)
        scale = 2 ** -0.5 if cfg.scale_skip_connection else 1.0
        for stage in self.ups:
            x = self._block(stage.init_block)(jnp.concatenate([x, skips.pop() * scale], axis=-1), t, c)
            for block in stage.blocks:
                x = self._block(block)(jnp.concatenate([x, skips.pop() * scale], axis=-1), t)
            x = stage.upsample(x)
        x = self._block(self.final_res_block)(x, t)
        return self.final_conv(jnp.concatenate([x, lowres], axis=-1)).astype(jnp.float32)


def layer_norm_tokens(norm: LayerNorm, tokens: jax.Array) -> jax.Array:
    return norm(tokens.astype(jnp.float32))


def param_count(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
