"""CT-ViT training losses (GenerateCT's) and the networks they use beside the autoencoder.

The losses are pure functions of the modules they need, `(ctvit, [vgg,] discr, batch, rng)`,
returning `(loss, metrics)`. GenerateCT's `CTViT` owns its VGG16 and discriminator; here they
are separate modules (`LossNetworksConfig`) that the CT-ViT stage holds beside the autoencoder.

Generator (GenerateCT `CTViT.forward(video)`):
  recon  = MSE(volume, reconstruction) over the whole volume
  commit = VQ commitment loss (the VQ also updates its EMA codebook: a model-state mutation)
  One random slice per sample (the same index for input and reconstruction) feeds
  perceptual = MSE(VGG16(input slice x3 channels), VGG16(recon slice x3)) (ReLU(fc7) features, no
               ImageNet normalisation or resize; VGG dropout active as in train mode)
  gan        = -mean(D(recon slice))  (hinge generator loss)
  w          = ||d perceptual / d W|| / (||d gan / d W|| + 1e-8), clamped <= 1e4, no gradient,
               W = the rest-slices pixel head's weight (`to_pixels[0].weight`)
  loss = recon + perceptual + commit + w * gan
Discriminator (`forward(video, return_discr_loss=True)`): random slice, reconstruction detached,
  hinge mean(relu(1 + D(fake)) + relu(1 - D(real))) + 10 * mean((||dD(real)/d real||_2 - 1)^2).
The discriminator step runs the autoencoder in train mode too, so it also moves the EMA codebook
(GenerateCT does); `update_codebook_in_discr_step=False` turns that off.
"""
from __future__ import annotations

import dataclasses

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ctgen.config_dataclass import build_dataclass
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.discriminator import Discriminator, DiscriminatorConfig
from ctgen.models.vgg import VGG16, VGGConfig
from ctgen.volume import HU_MAX


@dataclasses.dataclass(frozen=True)
class LossNetworksConfig:
    """Sizes of the VGG16 (perceptual loss) and the discriminator (GAN) a CT-ViT trains with.
    GenerateCT's `CTViT(use_vgg_and_gan=True)` builds both; `paper` sizes are the defaults."""

    vgg: VGGConfig = VGGConfig()
    discr: DiscriminatorConfig = DiscriminatorConfig()

    @classmethod
    def tiny(cls) -> "LossNetworksConfig":
        """Shrunk networks for `CTViTConfig.tiny()` (32x32 slices)."""
        return cls(vgg=VGGConfig(widths=(4, 8, 8, 16, 16), fc_dim=32),
                   discr=DiscriminatorConfig(base_dim=2, image_size=32, attn_heads=2, attn_dim_head=8, max_dim=32))


def split_model_config(d: Any) -> tuple[CTViTConfig, LossNetworksConfig | None]:
    """GenerateCT's flat `CTViT` arguments (the CT-ViT stage's `config.model` section, a CT-ViT
    weights directory's `model_config`) split into the autoencoder's config and its loss
    networks' (None when `use_vgg_and_gan` is off)."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    use_vgg_and_gan = d.pop("use_vgg_and_gan", True)
    vgg, discr = d.pop("vgg", {}), d.pop("discr", {})
    nets = None
    if use_vgg_and_gan:
        nets = LossNetworksConfig(build_dataclass(VGGConfig, vgg, where="vgg"), build_dataclass(DiscriminatorConfig, discr, where="discr"))
    return CTViTConfig.from_dict(d), nets


def model_config_dict(cfg: CTViTConfig, nets: LossNetworksConfig | None) -> dict[str, Any]:
    """Inverse of `split_model_config`: one flat, JSON-able dict."""
    out = {**cfg.to_dict(), "use_vgg_and_gan": nets is not None}
    if nets is not None:
        out.update(vgg=dataclasses.asdict(nets.vgg), discr=dataclasses.asdict(nets.discr))
    return out


@dataclasses.dataclass(frozen=True)
class CTViTLossConfig:
    """Which loss terms are on. Defaults are GenerateCT's.

    perceptual: VGG16 perceptual loss (off when no VGG weights are available).
    gan: hinge GAN loss with the adaptive weight.
    vgg_trainable: the loss provides VGG weight gradients (GenerateCT trains the VGG); when False
      they are not computed (the stage then also freezes the VGG).
    vgg_dropout: VGG dropout active (GenerateCT keeps the VGG in train mode).
    adaptive_weight_ref: loss whose gradient norm scales the GAN loss: "perceptual" (GenerateCT)
      or "recon" (VQGAN-style; used automatically when the perceptual loss is off, since
      GenerateCT's weight would then be 0 and silently disable the GAN).
    soft_tissue_weight: weight of an extra squared error over the voxels whose target lies in
      `soft_tissue_hu` (0: off, GenerateCT). The plain MSE over [-1000, 1000] HU is dominated by
      air/tissue edges; this term makes the tens-of-HU contrasts between soft tissues (fluid ~10 HU,
      blood ~40, fat ~-100) cost as much as an edge. It is the squared error in model units averaged
      over those voxels only, so weight 25 prices an error as the plain MSE would if the window
      (-200, 200) HU spanned [-1, 1]. Not in GenerateCT (an addition of ctgen).
    soft_tissue_hu: (low, high) HU of the target voxels the term covers.
    """

    perceptual: bool = True
    gan: bool = True
    vgg_trainable: bool = True
    vgg_dropout: bool = True
    adaptive_weight_ref: str = "perceptual"
    adaptive_weight_max: float = 1e4
    grad_penalty_weight: float = 10.0
    update_codebook_in_discr_step: bool = True
    soft_tissue_weight: float = 0.0
    soft_tissue_hu: tuple[float, float] = (-200.0, 200.0)

    def __post_init__(self):
        lo, hi = (float(v) for v in self.soft_tissue_hu)
        if self.soft_tissue_weight < 0 or not lo < hi:
            raise UserError(f"loss.soft_tissue_weight must be >= 0 and loss.soft_tissue_hu an increasing (low, high) "
                             f"pair, got {self.soft_tissue_weight}, {self.soft_tissue_hu}")
        object.__setattr__(self, "soft_tissue_hu", (lo, hi))


def soft_tissue_mask(volume: jax.Array, hu_range: tuple[float, float]) -> jax.Array:
    """1.0 where `volume` (model units, HU / 1000) lies in `hu_range` HU, else 0.0 (the CT-ViT term
    reads its target, the SR term its low-res input)."""
    lo, hi = hu_range[0] / HU_MAX, hu_range[1] / HU_MAX
    return ((volume >= lo) & (volume <= hi)).astype(jnp.float32)


def soft_tissue_mse(volume: jax.Array, recon: jax.Array, hu_range: tuple[float, float]) -> jax.Array:
    """Squared error (model units, HU / 1000) averaged over the voxels whose target HU lies in
    `hu_range` (0 if there are none)."""
    inside = soft_tissue_mask(volume, hu_range)
    return jnp.sum(inside * jnp.square(volume - recon)) / jnp.maximum(jnp.sum(inside), 1.0)


def random_slice_indices(rng: jax.Array, batch: int, num_slices: int) -> jax.Array:
    """One uniformly random slice index per sample, (B,) int32."""
    return jax.random.randint(rng, (batch,), 0, num_slices, dtype=jnp.int32)


def pick_slices(volume_BxFxHxW: jax.Array, idx_B: jax.Array) -> jax.Array:
    """Slice idx_B[b] of each sample, as NHWC images (B, H, W, 1)."""
    picked = jnp.take_along_axis(volume_BxFxHxW, idx_B.reshape(-1, 1, 1, 1), axis=1)
    return picked[:, 0, :, :, None]


def _slice_from_head(ctvit: CTViT, feats_BxTxhxwxD: jax.Array, idx_B: jax.Array, kernel: jax.Array) -> jax.Array:
    """Pixels of slice idx_B[b] computed from decoder features with the rest-slices head `kernel`.

    Only the token row that holds each slice is projected, so gradients w.r.t. `kernel` are cheap.
    """
    cfg = ctvit.cfg
    b, _, h, w, _ = feats_BxTxhxwxD.shape
    p, pt = cfg.patch_size, cfg.temporal_patch_size
    row = jnp.where(idx_B == 0, 0, (idx_B - 1) // pt + 1)
    sub = jnp.where(idx_B == 0, 0, (idx_B - 1) % pt)
    tokens = jnp.take_along_axis(feats_BxTxhxwxD, row.reshape(-1, 1, 1, 1, 1), axis=1)[:, 0]
    rest = ctvit.rest_to_pixels(tokens, kernel).astype(jnp.float32)
    rest = rest.reshape(b, h, w, pt, p, p)
    rest = jnp.take_along_axis(rest, sub.reshape(-1, 1, 1, 1, 1, 1), axis=3)[:, :, :, 0]
    rest = rest.transpose(0, 1, 3, 2, 4).reshape(b, h * p, w * p)
    first = ctvit.first_to_pixels(feats_BxTxhxwxD[:, 0]).astype(jnp.float32)
    first = first.reshape(b, h, w, p, p).transpose(0, 1, 3, 2, 4).reshape(b, h * p, w * p)
    return jnp.where((idx_B == 0).reshape(-1, 1, 1), first, rest)[..., None]


def perceptual_loss(vgg: VGG16, real_BxHxWx1: jax.Array, fake_BxHxWx1: jax.Array,
                    dropout_rng: jax.Array | None) -> jax.Array:
    """MSE between VGG16 features of the input and reconstructed slices (grayscale x3 channels).

    Both go through the VGG as one batch (one weight-gradient per layer instead of two); dropout
    masks are still drawn independently per image, as in GenerateCT's two separate calls.
    """
    b = real_BxHxWx1.shape[0]
    both = jnp.repeat(jnp.concatenate([real_BxHxWx1, fake_BxHxWx1], axis=0), 3, axis=-1)
    feats = vgg(both, dropout_rng)
    return jnp.mean(jnp.square(feats[:b] - feats[b:]))


def _surrogate(value: jax.Array, grads, inputs) -> jax.Array:
    """A scalar equal to `value` whose gradient w.r.t. `inputs` is the precomputed `grads`.

    Lets the generator loss backpropagate through the VGG and the discriminator once: their
    vector-Jacobian products are needed in the forward pass anyway (for the adaptive weight), and
    autodiff of the plain expression would redo them.
    """
    sg = jax.lax.stop_gradient
    terms = jax.tree.map(lambda c, x: jnp.sum(sg(c) * (x - sg(x))), grads, inputs)
    return sg(value) + sum(jax.tree.leaves(terms))


def generator_loss(ctvit: CTViT, vgg: VGG16 | None, discr: Discriminator | None, batch: dict, rng: jax.Array,
                   cfg: CTViTLossConfig = CTViTLossConfig(), *,
                   slice_idx: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GenerateCT's CT-ViT generator loss; `batch["volume"]` is (B, F, H, W) in [-1, 1]. Without
    a `vgg` (`discr`) the perceptual (GAN) term is off."""
    volume = batch["volume"].astype(jnp.float32)
    out = ctvit(volume, train=True)
    recon = out.recon_BxFxHxW
    recon_loss = jnp.mean(jnp.square(volume - recon))
    loss = recon_loss + out.commit_loss
    metrics = {"recon_loss": recon_loss, "commit_loss": out.commit_loss, **out.metrics}
    if cfg.soft_tissue_weight:
        soft = soft_tissue_mse(volume, recon, cfg.soft_tissue_hu)
        loss = loss + cfg.soft_tissue_weight * soft
        metrics["soft_tissue_loss"] = soft
    use_perc = cfg.perceptual and vgg is not None
    use_gan = cfg.gan and discr is not None
    if not (use_perc or use_gan):
        return loss, metrics
    k_idx, k_drop = jax.random.split(rng)
    b, f = volume.shape[:2]
    idx = random_slice_indices(k_idx, b, f) if slice_idx is None else slice_idx
    real, fake = pick_slices(volume, idx), pick_slices(recon, idx)
    drop = k_drop if cfg.vgg_dropout else None
    c_perc = c_gan = None
    if use_perc:
        vgg_def, vgg_params, vgg_rest = nnx.split(vgg, nnx.Param, ...)

        def perc_of(fake_slice, params):
            return perceptual_loss(nnx.merge(vgg_def, params, vgg_rest), real, fake_slice, drop)

        if cfg.vgg_trainable:
            perc, vjp = jax.vjp(perc_of, fake, vgg_params)
            c_perc, c_vgg = vjp(jnp.ones_like(perc))
            loss = loss + _surrogate(perc, (c_perc, c_vgg), (fake, vgg_params))
        else:
            perc, vjp = jax.vjp(lambda s: perc_of(s, vgg_params), fake)
            (c_perc,) = vjp(jnp.ones_like(perc))
            loss = loss + _surrogate(perc, (c_perc,), (fake,))
        metrics["perceptual_loss"] = perc
    if use_gan:
        gan, vjp = jax.vjp(lambda s: -jnp.mean(discr(s)), fake)
        (c_gan,) = vjp(jnp.ones_like(gan))
        # Adaptive weight: gradient norms w.r.t. the rest-slices pixel head, from the slice cotangents.
        feats = jax.lax.stop_gradient(out.features_BxTxhxwxD)
        kernel = jax.lax.stop_gradient(ctvit.rest_to_pixels.kernel[...])
        _, head_vjp = jax.vjp(lambda k: _slice_from_head(ctvit, feats, idx, k), kernel)
        g_gan = jnp.linalg.norm(head_vjp(jax.lax.stop_gradient(c_gan))[0])
        if use_perc and cfg.adaptive_weight_ref == "perceptual":
            g_ref = jnp.linalg.norm(head_vjp(jax.lax.stop_gradient(c_perc))[0])
        else:  # recon loss over the whole volume through the same head
            def recon_of(k):
                return jnp.mean(jnp.square(volume - ctvit.to_pixels(feats, rest_kernel=k)))

            g_ref = jnp.linalg.norm(jax.grad(recon_of)(kernel))
        weight = jax.lax.stop_gradient(jnp.minimum(g_ref / (g_gan + 1e-8), cfg.adaptive_weight_max))
        loss = loss + weight * _surrogate(gan, (c_gan,), (fake,))
        metrics.update(gan_loss=gan, adaptive_weight=weight)
    return loss, metrics


def discriminator_loss(ctvit: CTViT, discr: Discriminator, batch: dict, rng: jax.Array,
                       cfg: CTViTLossConfig = CTViTLossConfig(), *,
                       slice_idx: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Hinge discriminator loss + gradient penalty on the real slice (GenerateCT, every step)."""
    volume = batch["volume"].astype(jnp.float32)
    out = ctvit(volume, train=cfg.update_codebook_in_discr_step)
    b, f = volume.shape[:2]
    idx = random_slice_indices(rng, b, f) if slice_idx is None else slice_idx
    real = pick_slices(volume, idx)
    fake = jax.lax.stop_gradient(pick_slices(out.recon_BxFxHxW, idx))
    d_fake = discr(fake)

    def d_real_sum(x):
        logits = discr(x)
        return jnp.sum(logits), logits

    grad_real, d_real = jax.grad(d_real_sum, has_aux=True)(real)
    hinge = jnp.mean(jax.nn.relu(1.0 + d_fake) + jax.nn.relu(1.0 - d_real))
    grad_norm = jnp.sqrt(jnp.sum(jnp.square(grad_real.reshape(b, -1)), axis=-1))
    gp = cfg.grad_penalty_weight * jnp.mean(jnp.square(grad_norm - 1.0))
    metrics = {"discr_hinge": hinge, "grad_penalty": gp, "d_real": jnp.mean(d_real), "d_fake": jnp.mean(d_fake),
               "recon_loss": jnp.mean(jnp.square(volume - jax.lax.stop_gradient(out.recon_BxFxHxW)))}
    return hinge + gp, metrics
