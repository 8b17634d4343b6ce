"""The CT-ViT stage of the shared training loop: GenerateCT's VQ autoencoder with its GAN.

The model the loop trains is a `CTViTTrainer`: the autoencoder (`ctvit`) beside the networks its
losses use (`vgg`, `discr`). `config.model` keeps GenerateCT's flat `CTViT` arguments
(`dim`, ..., `use_vgg_and_gan`, `vgg.*`, `discr.*`); the stage splits them.

Phases (config.train.phase_cycle, GenerateCT: generator x3, discriminator):
  generator      recon + perceptual + commitment + adaptive-weight GAN loss; trains every
                 parameter but the discriminator's (and the VGG's only if the perceptual loss is on
                 and loss.vgg_trainable); moves the EMA codebook (model state)
  discriminator  hinge + gradient penalty; trains the discriminator only (GenerateCT's step also
                 moves the codebook: loss.update_codebook_in_discr_step)
Perceptual-loss weights: loss.vgg_weights (a torchvision VGG16 file), or the VGG inside an
imported GenerateCT checkpoint given as init_from; with neither the perceptual loss is off (logged).
Eval: reconstruction PSNR/SSIM/MSE and codebook usage on the eval split, or on NIfTI files
(data.eval_nifti, comma-separated: read, resized in-plane, centred window of eval_num_slices);
previews: PNGs of input vs reconstruction in three planes.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctgen.convert.ctvit import load_torchvision_vgg16
from ctgen.data.pipelines import LoaderOptions, volume_pipeline
from ctgen.errors import UserError
from ctgen.eval.image_metrics import psnr, ssim
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.ctvit_losses import (CTViTLossConfig, LossNetworksConfig, discriminator_loss, generator_loss,
                                       soft_tissue_mask, split_model_config)
from ctgen.models.discriminator import Discriminator
from ctgen.models.vgg import VGG16
from ctgen.models.vq import codebook_metrics
from ctgen.train.stage import Phase, mean_metrics, valid_rows
from ctgen.volume import HU_MAX
from ctgen.weights import flatten_state, unflatten_state

log = logging.getLogger(__name__)


def loss_config(config) -> CTViTLossConfig:
    names = {f.name for f in dataclasses.fields(CTViTLossConfig)}
    return CTViTLossConfig(**{k: v for k, v in config.loss.to_dict().items() if k in names})


class CTViTTrainer(nnx.Module):
    """What the CT-ViT stage trains: the autoencoder `ctvit` and the networks its losses use,
    `vgg` and `discr` (None without `use_vgg_and_gan`). Its state tree {"ctvit", "vgg", "discr"}
    is the layout of CT-ViT weights directories (`ctgen.convert.ctvit_store`)."""

    def __init__(self, cfg: CTViTConfig, nets: LossNetworksConfig | None, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.ctvit = CTViT(cfg, rngs=rngs)
        self.vgg = VGG16(nets.vgg, dtype=dtype, rngs=rngs) if nets else None
        self.discr = Discriminator(nets.discr, dtype=dtype, rngs=rngs) if nets else None


class CTViTStage:
    def __init__(self, config):
        self.config = config
        self.cfg, self.nets = split_model_config(config.model)
        lc = loss_config(config)
        self.vgg_weights = config.loss.vgg_weights
        self.init_from = config.init_from
        has_vgg = self.nets is not None
        if lc.perceptual and has_vgg and not (self.vgg_weights or self.init_from):
            log.warning("perceptual loss OFF: no VGG16 weights (set loss.vgg_weights to a torchvision "
                        "vgg16 .pth/.safetensors, or init_from to an imported GenerateCT checkpoint)")
            lc = dataclasses.replace(lc, perceptual=False)
        if lc.perceptual and has_vgg:
            log.info("perceptual loss on, VGG16 weights from %s", self.vgg_weights or f"init_from={self.init_from}")
        if lc.gan and not lc.perceptual and lc.adaptive_weight_ref == "perceptual":
            log.info("adaptive GAN weight uses the reconstruction loss's gradient (no perceptual loss)")
            lc = dataclasses.replace(lc, adaptive_weight_ref="recon")
        self.loss_cfg = lc
        self._vgg_arrays = None
        if self.vgg_weights and has_vgg:
            self._vgg_arrays = load_torchvision_vgg16(self.vgg_weights, self.nets.vgg)

    # -- model ------------------------------------------------------------------------------------
    def build_model(self, rngs: nnx.Rngs) -> CTViTTrainer:
        model = CTViTTrainer(self.cfg, self.nets, rngs=rngs)
        if self._vgg_arrays is not None:
            _assign_from_host(model.vgg, self._vgg_arrays)
        return model

    def phases(self):
        lc = self.loss_cfg  # the effective settings (perceptual off without VGG weights)
        discr = nnx.PathContains("discr")
        # The VGG gets gradients only from the perceptual loss: without it, training it would only
        # hold optimizer state (~1 GB at the paper size).
        train_vgg = lc.perceptual and lc.vgg_trainable
        frozen = discr if train_vgg else nnx.Any(discr, nnx.PathContains("vgg"))

        def gen(model: CTViTTrainer, batch, rng):
            return generator_loss(model.ctvit, model.vgg, model.discr, batch, rng, lc)

        def dis(model: CTViTTrainer, batch, rng):
            return discriminator_loss(model.ctvit, model.discr, batch, rng, lc)

        phases = [Phase("generator", gen, trains=nnx.All(nnx.Param, nnx.Not(frozen)))]
        if self.nets is not None:
            phases.append(Phase("discriminator", dis, trains=nnx.All(nnx.Param, discr),
                                update_state=lc.update_codebook_in_discr_step))
        return phases

    # -- data -------------------------------------------------------------------------------------
    def _options(self) -> LoaderOptions:
        return LoaderOptions.from_config(self.config.data)

    def _check_dir(self):
        if not self.config.data.dir:
            raise UserError("set data.dir to a dataset prepared with `ctgen prepare` (e.g. --source phantom)")

    def train_data(self, process_index: int, process_count: int, seed: int):
        self._check_dir()
        d = self.config.data
        return volume_pipeline(d.dir, d.train_split, global_batch_size=self.config.train.batch_size,
                               process_index=process_index, process_count=process_count, seed=seed,
                               num_slices=d.num_slices, slice_sampling=d.slice_sampling, train=True,
                               options=self._options())

    def eval_data(self, process_index: int, process_count: int):
        d = self.config.data
        if d.eval_nifti:
            from ctgen.eval.ctvit_eval import NiftiEvalData

            paths = [p.strip() for p in d.eval_nifti.split(",") if p.strip()]
            return NiftiEvalData(paths, self.cfg, d.eval_num_slices or d.num_slices, d.eval_batch_size,
                                 process_index, process_count)
        if not d.eval_split:
            return None
        self._check_dir()
        cfg = self

        class _Eval:  # re-iterable: the loop evaluates several times
            def __iter__(self):
                return volume_pipeline(d.dir, d.eval_split, global_batch_size=d.eval_batch_size,
                                       process_index=process_index, process_count=process_count,
                                       num_slices=d.eval_num_slices or d.num_slices, train=False,
                                       options=cfg._options())

        return _Eval()

    # -- eval / previews --------------------------------------------------------------------------
    def frozen_models(self) -> dict:
        return {}

    def eval_step(self, model: CTViTTrainer, frozen, batch) -> dict[str, jax.Array]:
        """Sums over the valid volumes of PSNR, SSIM, MSE and the soft-tissue mean absolute error in HU
        (over the voxels whose target lies in loss.soft_tissue_hu), and the code histogram of their tokens."""
        vol = batch["volume"]
        out = model.ctvit(vol, train=False)
        valid = valid_rows(batch, vol.shape[0])
        recon = jnp.clip(out.recon_BxFxHxW, -1.0, 1.0)
        mse = jnp.mean(jnp.square(out.recon_BxFxHxW - vol), axis=(1, 2, 3))
        inside = soft_tissue_mask(vol, self.loss_cfg.soft_tissue_hu)
        soft_mae = (jnp.sum(inside * jnp.abs(recon - vol), axis=(1, 2, 3))
                    / jnp.maximum(jnp.sum(inside, axis=(1, 2, 3)), 1.0) * HU_MAX)
        weights = jnp.broadcast_to(valid.reshape(-1, 1, 1, 1), out.ids_BxTxhxw.shape).reshape(-1)
        bins = jax.ops.segment_sum(weights, out.ids_BxTxhxw.reshape(-1), num_segments=self.cfg.codebook_size)
        return {"psnr": jnp.sum(psnr(recon, vol) * valid), "ssim": jnp.sum(ssim(recon, vol) * valid),
                "recon_mse": jnp.sum(mse * valid), "soft_tissue_mae_hu": jnp.sum(soft_mae * valid),
                "count": jnp.sum(valid), "code_counts": bins}

    def eval_metrics(self, totals) -> dict[str, float]:
        """Means over the split's volumes; codebook usage/perplexity of the split's whole histogram."""
        usage = codebook_metrics(jnp.asarray(totals["code_counts"], jnp.float32))
        return {**mean_metrics(totals, skip=("code_counts",)), **{k: float(v) for k, v in usage.items()}}

    def preview_step(self, model: CTViTTrainer, frozen, batch) -> dict[str, jax.Array]:
        vol = batch["volume"][:1]
        return {"input": vol, "recon": model.ctvit.reconstruct(vol)}

    def write_preview(self, outputs, batch, out_dir: str, step: int) -> None:
        from ctgen.io.preview import write_three_planes

        name = batch["source_id"][0] if "source_id" in batch else "volume"
        write_three_planes(os.path.join(out_dir, "ctvit_recon.png"), outputs["input"][0], outputs["recon"][0],
                           title=f"step {step}: {name}")


def _assign_from_host(module: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
    """Set a module's parameters to host arrays without baking them into the jitted init as
    constants (a host callback supplies them)."""
    state = nnx.state(module, nnx.Param)
    paths = sorted(flatten_state(nnx.to_pure_dict(state)))
    missing = sorted(set(paths) - set(arrays))
    if missing:
        raise UserError(f"VGG16 weights lack {missing[:5]}")
    shapes = [jax.ShapeDtypeStruct(arrays[p].shape, jnp.float32) for p in paths]
    values = jax.pure_callback(lambda: [arrays[p] for p in paths], shapes)
    nnx.update(module, unflatten_state(dict(zip(paths, values))))


def make_stage(config) -> CTViTStage:
    return CTViTStage(config)
