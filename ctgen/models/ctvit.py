"""CT-ViT: GenerateCT's VQ autoencoder for CT volumes (Phenaki C-ViViT derivative), in Flax NNX.

A volume (B, F, H, W) in [-1, 1] with F = 1 + k*pt slices becomes a token grid (B, T, h, w, D),
T = 1 + k, h = H/p, w = W/p: slice 0 alone as p x p patches, the remaining slices as pt x p x p
tubelets (reshape + dense, never a strided convolution). Encoder: spatial transformer over each
slice's h*w tokens with a 2-D continuous position bias, then temporal transformer over T per
(h, w). A cosine-similarity EMA codebook quantises every token. Decoder: temporal, then spatial
transformer, then linear heads back to patches. Parameter-for-parameter equivalent to the
autoencoder of GenerateCT's `CTViT` (see `ctgen.convert.ctvit` for the name map). GenerateCT's
class also owns the VGG16 and the discriminator its losses use; in ctgen those are separate
modules (`ctgen.models.ctvit_losses`) that the CT-ViT training stage holds beside this one, so
loading the tokenizer for later stages or generation never allocates them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ctgen.config_dataclass import build_dataclass
from ctgen.models.attention import ContinuousPositionBias, Transformer
from ctgen.models.layers import Dense, LayerNorm
from ctgen.models.vq import VectorQuantizer
from ctgen.parallel.axes import constrain


@dataclasses.dataclass(frozen=True)
class CTViTConfig:
    """Architecture of a CT-ViT autoencoder. `paper()` is GenerateCT's; `tiny()` trains in seconds
    on a CPU. (The loss networks' sizes are `ctgen.models.ctvit_losses.LossNetworksConfig`.)

    max_slices: the longest volume the model accepts (1 + k*temporal_patch_size); nothing in the
      weights depends on it, it guards inputs.
    remat: recompute transformer activations in the backward pass (less memory);
    remat_policy: "full" (keep only block inputs: least memory) or "projections" (also keep the
      q/kv/feed-forward projection outputs, so only norms, attention and elementwise work are
      recomputed). On XLA:CPU both cost about the same time (the backward pass is bound by other
      work), so "full" is the default.
    dtype: compute dtype of the matmuls ("float32" or "bfloat16"); parameters stay float32.
    vq_dead_code_threshold: 0 (GenerateCT) or the EMA cluster size below which a code is replaced by
      a batch vector in training (`ctgen.models.vq`); the weights' layout does not change.
    """

    dim: int = 512
    codebook_size: int = 8192
    image_size: int = 128
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_depth: int = 4
    temporal_depth: int = 4
    dim_head: int = 32
    heads: int = 8
    ff_mult: float = 4.0
    max_slices: int = 201
    vq_decay: float = 0.8
    vq_dead_code_threshold: float = 0.0
    commitment_weight: float = 1.0
    remat: bool = False
    remat_policy: str = "full"
    dtype: str = "float32"

    @classmethod
    def paper(cls, **overrides: Any) -> "CTViTConfig":
        """GenerateCT's CTViT(dim=512, codebook_size=8192, image_size=128, patch_size=16, ...)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "CTViTConfig":
        base = cls(dim=32, codebook_size=64, image_size=32, patch_size=8, spatial_depth=1, temporal_depth=1,
                   dim_head=8, heads=2, max_slices=17)
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON- and ConfigDict-friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "CTViTConfig":
        """Inverse of `to_dict`; also accepts a ConfigDict or a JSON round trip (lists for tuples)."""
        return build_dataclass(cls, d)

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    def num_groups(self, num_slices: int) -> int:
        """Token-grid length T for a volume of `num_slices` slices (1 + (F-1)/pt)."""
        return 1 + (num_slices - 1) // self.temporal_patch_size

    def num_slices(self, num_groups: int) -> int:
        """Slices of a volume whose token grid has length `num_groups` (1 + (T-1)*pt)."""
        return 1 + (num_groups - 1) * self.temporal_patch_size

    def check_volume_shape(self, shape: tuple[int, ...]) -> None:
        """Raise a ValueError that says what is wrong with a (B, F, H, W) volume shape."""
        if len(shape) != 4:
            raise ValueError(f"CT-ViT expects volumes shaped (batch, slices, height, width); got shape {shape}")
        _, f, h, w = shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"CT-ViT was built for {self.image_size}x{self.image_size} slices; got {h}x{w}. "
                             "Resize the volume in-plane first.")
        pt = self.temporal_patch_size
        if f < 1 or (f - 1) % pt:
            raise ValueError(f"number of slices must be 1 + a multiple of {pt} (e.g. 1, 3, 17, 201); got {f}")
        if f > self.max_slices:
            raise ValueError(f"volume has {f} slices, more than this model's max_slices={self.max_slices}")


class PatchEmbed(nnx.Module):
    """LayerNorm(patch) -> Dense(patch, dim) -> LayerNorm(dim)."""

    def __init__(self, patch_dim: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm_in = LayerNorm(patch_dim)
        self.proj = Dense(patch_dim, dim, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.norm_out = LayerNorm(dim)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.norm_out(self.proj(self.norm_in(patches)))


@dataclasses.dataclass
class CTViTOutput:
    recon_BxFxHxW: jax.Array
    ids_BxTxhxw: jax.Array
    commit_loss: jax.Array
    features_BxTxhxwxD: jax.Array  # decoder output before the pixel heads (for the adaptive GAN weight)
    metrics: dict[str, jax.Array]


class CTViT(nnx.Module):
    """encode(volume) -> ids, decode(ids) -> volume, reconstruct(volume), and the training forward."""

    def __init__(self, cfg: CTViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        d, p, pt = cfg.dim, cfg.patch_size, cfg.temporal_patch_size
        self.pos_bias = ContinuousPositionBias(d, cfg.heads, num_dims=2, rngs=rngs)
        self.first_embed = PatchEmbed(p * p, d, dtype=dtype, rngs=rngs)
        self.rest_embed = PatchEmbed(pt * p * p, d, dtype=dtype, rngs=rngs)

        def transformer(depth):
            return Transformer(d, depth=depth, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult,
                               peg=True, peg_causal=True, remat=cfg.remat, remat_policy=cfg.remat_policy,
                               dtype=dtype, rngs=rngs)

        self.enc_spatial = transformer(cfg.spatial_depth)
        self.enc_temporal = transformer(cfg.temporal_depth)
        self.vq = VectorQuantizer(d, cfg.codebook_size, decay=cfg.vq_decay, commitment_weight=cfg.commitment_weight,
                                  dead_code_threshold=cfg.vq_dead_code_threshold, rngs=rngs)
        self.dec_spatial = transformer(cfg.spatial_depth)
        self.dec_temporal = transformer(cfg.temporal_depth)
        self.first_to_pixels = Dense(d, p * p, axes=("embed", None), dtype=dtype, rngs=rngs)
        self.rest_to_pixels = Dense(d, pt * p * p, axes=("embed", None), dtype=dtype, rngs=rngs)

    # -- patches ---------------------------------------------------------------------------------
    def to_tokens(self, volume_BxFxHxW: jax.Array) -> jax.Array:
        """Patch-embed a volume into the token grid (B, T, h, w, D)."""
        cfg = self.cfg
        cfg.check_volume_shape(volume_BxFxHxW.shape)
        b, f, hh, ww = volume_BxFxHxW.shape
        p, pt = cfg.patch_size, cfg.temporal_patch_size
        h, w = hh // p, ww // p
        v = volume_BxFxHxW.astype(jnp.float32)
        first = v[:, 0].reshape(b, h, p, w, p).transpose(0, 1, 3, 2, 4).reshape(b, 1, h, w, p * p)
        tokens = [self.first_embed(first)]
        if f > 1:
            t = cfg.num_groups(f) - 1
            rest = v[:, 1:].reshape(b, t, pt, h, p, w, p).transpose(0, 1, 3, 5, 2, 4, 6).reshape(b, t, h, w, pt * p * p)
            tokens.append(self.rest_embed(rest))
        grid = jnp.concatenate(tokens, axis=1) if len(tokens) > 1 else tokens[0]
        return constrain(grid, ("batch", None, None, None, "embed"))

    def to_pixels(self, features_BxTxhxwxD: jax.Array, rest_kernel: jax.Array | None = None) -> jax.Array:
        """Linear heads from decoder features back to a volume (B, F, H, W) (no output activation).

        rest_kernel: replaces the rest-slices head's weight (the losses differentiate w.r.t. it)."""
        b, t, h, w, _ = features_BxTxhxwxD.shape
        p, pt = self.cfg.patch_size, self.cfg.temporal_patch_size
        first = self.first_to_pixels(features_BxTxhxwxD[:, :1]).astype(jnp.float32)
        first = first.reshape(b, 1, h, w, p, p).transpose(0, 1, 2, 4, 3, 5).reshape(b, 1, h * p, w * p)
        if t == 1:
            return first
        rest = self.rest_to_pixels(features_BxTxhxwxD[:, 1:], rest_kernel).astype(jnp.float32)
        rest = rest.reshape(b, t - 1, h, w, pt, p, p).transpose(0, 1, 4, 2, 5, 3, 6)
        return jnp.concatenate([first, rest.reshape(b, (t - 1) * pt, h * p, w * p)], axis=1)

    # -- transformers ----------------------------------------------------------------------------
    def spatial_bias(self) -> jax.Array:
        return self.pos_bias(self.cfg.grid_hw)

    def _spatial(self, tr: Transformer, x_BxTxhxwxD: jax.Array, bias: jax.Array) -> jax.Array:
        b, t, h, w, d = x_BxTxhxwxD.shape
        y = tr(x_BxTxhxwxD.reshape(b, t, h * w, d), (b, t, h, w), bias_HxNxN=bias)
        return y.reshape(b, t, h, w, d)

    def _temporal(self, tr: Transformer, x_BxTxhxwxD: jax.Array) -> jax.Array:
        # Memory order (b h w) t d, as GenerateCT; its PEG reinterprets that memory as (b t h w d).
        b, t, h, w, d = x_BxTxhxwxD.shape
        x = x_BxTxhxwxD.transpose(0, 2, 3, 1, 4).reshape(b, h * w, t, d)
        y = tr(x, (b, t, h, w))
        return y.reshape(b, h, w, t, d).transpose(0, 3, 1, 2, 4)

    def encode_tokens(self, tokens_BxTxhxwxD: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        bias = self.spatial_bias() if bias is None else bias
        x = self._spatial(self.enc_spatial, tokens_BxTxhxwxD, bias)
        return self._temporal(self.enc_temporal, x)

    def decode_features(self, codes_BxTxhxwxD: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """Decoder transformers only: codes -> features before the pixel heads."""
        bias = self.spatial_bias() if bias is None else bias
        x = self._temporal(self.dec_temporal, codes_BxTxhxwxD)
        return self._spatial(self.dec_spatial, x, bias)

    # -- public API ------------------------------------------------------------------------------
    def encode(self, volume_BxFxHxW: jax.Array) -> jax.Array:
        """Codebook ids (B, T, h, w) of a volume (eval mode; the codebook is not updated)."""
        z = self.encode_tokens(self.to_tokens(volume_BxFxHxW))
        return self.vq.assign(z)

    def decode(self, ids_BxTxhxw: jax.Array) -> jax.Array:
        """Volume (B, F, H, W), F = 1 + (T-1)*pt, from codebook ids (B, T, h, w)."""
        if ids_BxTxhxw.ndim != 4 or tuple(ids_BxTxhxw.shape[2:]) != self.cfg.grid_hw:
            raise ValueError(f"decode expects ids shaped (batch, groups, {self.cfg.grid_hw[0]}, "
                             f"{self.cfg.grid_hw[1]}); got {ids_BxTxhxw.shape}")
        return self.to_pixels(self.decode_features(self.vq.lookup(ids_BxTxhxw)))

    def reconstruct(self, volume_BxFxHxW: jax.Array) -> jax.Array:
        """encode + quantise + decode in eval mode; the position bias is computed once."""
        return self(volume_BxFxHxW, train=False).recon_BxFxHxW

    def __call__(self, volume_BxFxHxW: jax.Array, *, train: bool = False) -> CTViTOutput:
        """Full autoencoder pass. With train=True the VQ uses the straight-through estimator,
        returns the commitment loss and updates its EMA codebook."""
        bias = self.spatial_bias()
        z = self.encode_tokens(self.to_tokens(volume_BxFxHxW), bias)
        vq = self.vq(z, train=train)
        feats = self.decode_features(vq.quantized.astype(z.dtype), bias)
        return CTViTOutput(self.to_pixels(feats), vq.ids, vq.commit_loss, feats, vq.metrics)
