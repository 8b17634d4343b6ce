"""The super-resolution stage of the shared training loop: GenerateCT's text-conditioned SR diffusion.

Training examples are slices: the original slice (`hires`, e.g. 512x512, in [0, 1]), its low-res
counterpart (`lowres`, e.g. 128x128) and the prompt's T5 states. The paper's low-res input is the
CT-ViT reconstruction of the whole volume, made once by `ctgen prepare --source sr-pairs` into a
side dataset (`data.pairs_dir`); without it the low-res slice is a plain downsample (logged).
Text comes from a T5 embedding cache (`data.embeddings_dir`, `ctgen prepare --source
embeddings`); without one every sample sees only the null text embedding (logged).

Loss (GenerateCT's `Superres.p_losses`): x0 = 2 hires - 1 (with `model.residual`, beyond the
reference: x0 = hires - bicubic(low-res), see `UNetConfig.residual`); the low-res slice is upsampled by
nearest neighbour, clamped to [0, 1], mapped to [-1, 1] and noised at one random level of the
linear schedule per (micro-)batch, whose log-SNR the network sees (the level is uniform in
[0, `diffusion.lowres_aug_max`]; GenerateCT: 1.0, and above ~0.3 the input is mostly noise);
t ~ U(0, 1) per sample on the cosine schedule; the network predicts v; per-sample MSE times the p2 weight
(1 + exp(log_snr))^-0.5; text dropped with probability `diffusion.cond_drop_prob` (0.1) for
classifier-free guidance. `data.random_crop` > 0 trains on random crops of that size (the same
window of image, low-res image and noise).

Eval: each eval slice is super-resolved with the configured sampler (`sample.*`; by default
GenerateCT's 25-step ancestral sampler) and scored against the original by PSNR and SSIM (data
range 1), next to bicubic upsampling of the same low-res input. With `tokenizer.weights` set and
no `data.pairs_dir`, the eval and preview low-res inputs are the frozen CT-ViT's reconstructions
of the downsampled slices (each as a one-slice volume), so eval measures super-resolution of
CT-ViT outputs. Previews: per slice, low-res (nearest), bicubic, SR output, original.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ctgen.config_dataclass import build_dataclass
from ctgen.data.pipelines import LoaderOptions, ReconstructionLowRes, sr_pipeline
from ctgen.errors import UserError
from ctgen.eval.image_metrics import psnr, ssim
from ctgen.models.ctvit_losses import soft_tissue_mask
from ctgen.models.unet import UNet, UNetConfig
from ctgen.sampling import diffusion as df
from ctgen.sampling.superres import SamplerConfig, bicubic_upsample, diffusion_x0, nearest_upsample, sample_slices
from ctgen.train.stage import FrozenModel, Phase, mean_metrics, valid_rows

log = logging.getLogger(__name__)

PREVIEW_SLICES = 4


def random_crops(arrays_BxHxWxC: list[jax.Array], size: int, key: jax.Array) -> list[jax.Array]:
    """The same random `size` x `size` window of every array, one window per sample."""
    b, h, w, _ = arrays_BxHxWxC[0].shape
    if size > min(h, w):
        raise UserError(f"data.random_crop={size} is larger than the {h}x{w} slices")
    ky, kx = jax.random.split(key)
    ys = jax.random.randint(ky, (b,), 0, h - size + 1)
    xs = jax.random.randint(kx, (b,), 0, w - size + 1)

    def crop(x):
        return jax.vmap(lambda im, y, x0: jax.lax.dynamic_slice(im, (y, x0, 0), (size, size, im.shape[-1])))(x, ys, xs)

    return [crop(a) for a in arrays_BxHxWxC]


class SuperresStage:
    def __init__(self, config):
        self.config = config
        self.cfg = build_dataclass(UNetConfig, config.model, where="config.model")
        self.sampler = build_dataclass(SamplerConfig, config.sample, where="config.sample")
        self.aug_max = float(config.diffusion.get("lowres_aug_max", 1.0))
        if not 0.0 < self.aug_max <= 1.0:
            raise UserError(f"diffusion.lowres_aug_max={self.aug_max} must be in (0, 1]")
        self.soft_weight = float(config.diffusion.get("soft_tissue_weight", 0.0))
        self.soft_hu = tuple(float(v) for v in config.diffusion.get("soft_tissue_hu", (-200.0, 200.0)))
        if self.soft_weight < 0 or len(self.soft_hu) != 2 or not self.soft_hu[0] < self.soft_hu[1]:
            raise UserError(f"diffusion.soft_tissue_weight={self.soft_weight} must be >= 0 and "
                            f"diffusion.soft_tissue_hu={self.soft_hu} an increasing (low, high) HU pair")
        d = config.data
        if not d.embeddings_dir:
            log.warning("no data.embeddings_dir (T5 embedding cache): the U-Net sees only its null text embedding")
        if not d.pairs_dir:
            log.warning("no data.pairs_dir (CT-ViT reconstructions from `ctgen prepare --source sr-pairs`): "
                        "training on plainly downsampled low-res slices, not the paper's CT-ViT reconstructions")

    # -- model ------------------------------------------------------------------------------------
    def build_model(self, rngs: nnx.Rngs) -> UNet:
        return UNet(self.cfg, rngs=rngs)

    def _text(self, batch, n: int) -> tuple[jax.Array, jax.Array]:
        if "text_embedding" in batch:
            return batch["text_embedding"], batch["text_mask"]
        return jnp.zeros((n, 1, self.cfg.text_embed_dim), jnp.float32), jnp.zeros((n, 1), bool)

    def loss(self, model: UNet, batch, rng: jax.Array):
        dc = self.config.diffusion
        hires = batch["hires"].astype(jnp.float32)
        n, h, w = hires.shape
        k_crop, k_t, k_noise, k_aug, k_aug_noise, k_drop = jax.random.split(rng, 6)
        x0 = diffusion_x0(hires, batch["lowres"], self.cfg.residual)
        # GenerateCT resizes the low-res image with clamping to the [0, 1] input range.
        low = nearest_upsample(jnp.clip(batch["lowres"].astype(jnp.float32), 0.0, 1.0)[..., None], (h, w)) * 2 - 1
        # Soft-tissue pixels as the clean low-res input shows them (low is in HU / 1000), not as the target
        # does: a weight that depends on the target would move the loss's minimiser off the conditional
        # mean (towards soft tissue wherever a pixel is uncertain); a fine-tune weighted by the target
        # fell from 25.0 to 21.8 dB in 500 steps (docs/superres.md).
        soft = soft_tissue_mask(low, self.soft_hu)
        if self.config.data.random_crop:
            x0, low, soft = random_crops([x0, low, soft], self.config.data.random_crop, k_crop)
        log_snr = df.cosine_log_snr(jax.random.uniform(k_t, (n,)))
        noise = jax.random.normal(k_noise, x0.shape)
        x_t = df.q_sample(x0, log_snr, noise)
        aug_level = jax.random.uniform(k_aug, (), maxval=self.aug_max)  # one level per batch
        aug_log_snr = jnp.full((n,), df.linear_log_snr(aug_level))
        low_noisy = df.q_sample(low, aug_log_snr, jax.random.normal(k_aug_noise, low.shape))
        keep = jax.random.uniform(k_drop, (n,)) >= dc.cond_drop_prob
        text, mask = self._text(batch, n)
        pred = model(x_t, log_snr, low_noisy, aug_log_snr, text, mask, keep)
        sq = jnp.square(pred - df.v_target(x0, noise, log_snr))
        mse = jnp.mean(sq, axis=(1, 2, 3))
        metrics = {"mse": jnp.mean(mse)}
        per_sample = mse
        if self.soft_weight > 0:
            soft_mse = jnp.sum(soft * sq, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(soft, axis=(1, 2, 3)), 1.0)
            per_sample = mse + self.soft_weight * soft_mse
            metrics["soft_tissue_mse"] = jnp.mean(soft_mse)
        loss = jnp.mean(per_sample * df.p2_weight(log_snr, dc.p2_loss_weight_gamma, dc.p2_loss_weight_k))
        return loss, metrics

    def phases(self):
        return [Phase("main", self.loss)]

    # -- data -------------------------------------------------------------------------------------
    def _options(self) -> LoaderOptions:
        return LoaderOptions.from_config(self.config.data)

    def _pipeline(self, split: str, *, batch: int, slices: int, train: bool, process_index: int,
                  process_count: int, seed: int = 0):
        d = self.config.data
        if not d.dir:
            raise UserError("set data.dir to a dataset prepared at the high resolution (ctgen prepare --resolution 512)")
        lowres_fn = ReconstructionLowRes(d.pairs_dir, split) if d.pairs_dir else None
        return sr_pipeline(d.dir, split, global_batch_size=batch, process_index=process_index,
                           process_count=process_count, seed=seed, slices_per_volume=slices, lowres_fn=lowres_fn,
                           lowres_size=(d.lowres_size, d.lowres_size), train=train,
                           embeddings_dir=d.embeddings_dir or None, max_text_length=d.max_text_length,
                           options=self._options())

    def train_data(self, process_index: int, process_count: int, seed: int):
        return self._pipeline(self.config.data.train_split, batch=self.config.train.batch_size,
                              slices=self.config.data.slices_per_volume, train=True, process_index=process_index,
                              process_count=process_count, seed=seed)

    def eval_data(self, process_index: int, process_count: int):
        d = self.config.data
        if not d.eval_split:
            return None
        stage = self

        class _Eval:  # re-iterable: the loop evaluates several times
            def __iter__(self):
                return stage._pipeline(d.eval_split, batch=d.eval_batch_size, slices=d.eval_slices_per_volume,
                                       train=False, process_index=process_index, process_count=process_count)

        return _Eval()

    # -- frozen CT-ViT, eval, previews ------------------------------------------------------------
    def frozen_models(self) -> dict[str, FrozenModel]:
        weights = self.config.tokenizer.weights
        if not weights or self.config.data.pairs_dir:  # the pairs already hold its reconstructions
            return {}
        return {"tokenizer": FrozenModel(weights, self._load_tokenizer)}

    def _load_tokenizer(self, weights: str, mesh, rules):
        from ctgen.convert.ctvit_store import load_ctvit

        return load_ctvit(weights, mesh=mesh, rules=rules)

    def _lowres(self, frozen, batch) -> jax.Array:
        """The eval/preview low-res input in [0, 1]: the batch's, or the frozen CT-ViT's
        reconstruction of it (see the module docstring)."""
        lowres = batch["lowres"].astype(jnp.float32)
        if "tokenizer" not in frozen:
            return lowres
        ctvit = frozen["tokenizer"]
        if lowres.shape[1:] != (ctvit.cfg.image_size, ctvit.cfg.image_size):
            raise UserError(f"the tokenizer takes {ctvit.cfg.image_size}x{ctvit.cfg.image_size} slices, the low-res "
                            f"slices are {lowres.shape[1]}x{lowres.shape[2]} (data.lowres_size)")
        rec = ctvit.reconstruct(lowres[:, None] * 2.0 - 1.0)[:, 0]
        return jnp.clip((rec + 1.0) * 0.5, 0.0, 1.0)

    def _sample(self, model: UNet, lowres, batch) -> jax.Array:
        n, h, w = batch["hires"].shape
        text, mask = self._text(batch, n)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(self.config.seed), i))(jnp.arange(n))
        return sample_slices(model, lowres, text, mask, keys, (h, w), self.sampler)

    def eval_step(self, model: UNet, frozen, batch) -> dict[str, jax.Array]:
        """Sums over the valid slices of PSNR / SSIM of the SR output and of bicubic upsampling."""
        hires = batch["hires"].astype(jnp.float32)
        n, h, w = hires.shape
        lowres = self._lowres(frozen, batch)
        sr = self._sample(model, lowres, batch)
        bicubic = bicubic_upsample(lowres, (h, w))
        valid = valid_rows(batch, n)
        target = hires[:, None]
        out = {"count": jnp.sum(valid)}
        for name, img in (("sr", sr), ("bicubic", bicubic)):
            out[f"psnr_{name}"] = jnp.sum(psnr(img[:, None], target, data_range=1.0) * valid)
            out[f"ssim_{name}"] = jnp.sum(ssim(img[:, None], target, data_range=1.0) * valid)
        return out

    def eval_metrics(self, totals) -> dict[str, float]:
        return mean_metrics(totals)

    def preview_step(self, model: UNet, frozen, batch) -> dict[str, jax.Array]:
        k = min(PREVIEW_SLICES, batch["hires"].shape[0])
        sub = {key: v[:k] for key, v in batch.items()}
        _, h, w = sub["hires"].shape
        lowres = self._lowres(frozen, sub)
        return {"lowres": nearest_upsample(lowres[..., None], (h, w))[..., 0], "bicubic": bicubic_upsample(lowres, (h, w)),
                "sr": self._sample(model, lowres, sub), "hires": sub["hires"]}

    def write_preview(self, outputs, batch, out_dir: str, step: int) -> None:
        from ctgen.io.preview import write_image_rows

        names = ("lowres", "bicubic", "sr", "hires")
        rows = [[outputs[n][i] * 2.0 - 1.0 for n in names] for i in range(outputs["sr"].shape[0])]
        sid = batch["source_id"][0] if "source_id" in batch else ""
        write_image_rows(os.path.join(out_dir, "superres.png"), rows,
                         caption=f"step {step} {sid}: low-res, bicubic, SR, original")


def make_stage(config) -> SuperresStage:
    return SuperresStage(config)

