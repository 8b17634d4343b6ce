"""Super-resolution diffusion (stage 3): GenerateCT's text-conditioned SR U-Net, 128x128 -> 512x512 slices.

    ctgen prepare --source ctrate --root CT-RATE/dataset --resolution 512 --out data/          # high-res slices
    ctgen prepare --source embeddings --dataset data/ctgen_ct/<name>/1.0.0 --out data/t5 --encoder t5-v1_1-base
    ctgen prepare --source sr-pairs --dataset data/ctgen_ct/<name>/1.0.0 --tokenizer runs/ctvit --out data/sr_pairs
    ctgen train --config configs/superres.py:paper --workdir runs/superres --config.data.dir=data/ctgen_ct/<name>/1.0.0 \\
        --config.data.embeddings_dir=data/t5 --config.data.pairs_dir=data/sr_pairs
    ctgen train --config configs/superres.py:tiny --workdir /tmp/sr_tiny --config.data.dir=...     # tests

Variants:
  paper  GenerateCT exactly: UNetConfig.paper() (dim 64, mults 1-2-4, 2 resnet blocks per stage,
         cross-attention in every stage, 22.19 M parameters), 512x512 slices from 128x128 CT-ViT
         reconstructions, v-prediction on the cosine schedule with p2 weighting (gamma 0.5), low-res
         augmentation on the linear schedule (one level per micro-batch; 0.1 when sampling), text
         dropout 0.1, Adam(0.9, 0.99, eps 1e-8) 5e-4 constant, EMA of the weights as ema-pytorch's
         defaults (beta 0.9999 with its 2/3-power warm-up, copying for the first 100 updates, every
         10 updates) used for eval and sampling; sampling: 25 ancestral steps, dynamic
         thresholding at the 95th percentile, no guidance.
         GenerateCT's step is all 201 slices of one volume in chunks of 15; here 192 slices of one
         volume in 12 micro-batches of 16 (a batch that splits over 1, 2, 4, 8 or 16 devices).
         Remat of the resnet blocks is on (for accelerator memory); on a CPU host pass
         --config.model.remat=false (XLA:CPU saves no memory with it and the step is ~24% slower).
  demo   a narrower U-Net (dim 32) on 128x128 slices from 32x32, 16 slices of 2 volumes per step, no
         remat: learns visibly on one CPU host within hours.
  phantom  the built-in demo cascade's SR (docs/demo_cascade.md): the paper U-Net at dim 16, 32x32
         CT-ViT reconstructions -> 128x128 phantom slices (4x, as GenerateCT's 128 -> 512), text
         width 64 (the built-in T5), generating the residual over bicubic upsampling (model.residual;
         GenerateCT generates the slice), trained on random 64x64 crops, 16 slices of 2 volumes per
         step, 4000 steps, Adam 1e-3 (constant to step 3000, then a cosine to 0), EMA 0.999, low-res
         noise augmentation up to level 0.2 (diffusion.lowres_aug_max; GenerateCT 1.0).
  tiny   UNetConfig.tiny() on 32x32 slices from 8x8, text width 64 (ctgen's built-in test T5), 8
         slices per step, 4 sampling steps: for tests.
Settings after the variant, comma-separated (0 or absent = the variant's value):
  lowres=N     low-res slice size (the CT-ViT's input size; data.lowres_size)
  batch=N      slices per step (train.batch_size; data.slices_per_volume and train.accum_steps shrink
               to divisors of it)
  steps=N      train.steps
  text_dim=N   T5 width (model.text_embed_dim: 768 for T5 v1.1 base, 64 for the built-in encoder)
  sample_steps=N  sampler steps for eval and previews
  e.g. configs/superres.py:demo,text_dim=64,steps=2000
Low-res inputs: data.pairs_dir (the paper's CT-ViT reconstructions), else a plain downsample
(logged); tokenizer.weights (a CT-ViT workdir or weights directory) then makes the eval/preview
low-res inputs CT-ViT reconstructions. Text: data.embeddings_dir, else the null text embedding
only (logged).
"""
import math

import ml_collections

from ctgen.configuration import parse_arg
from ctgen.models.unet import UNetConfig
from ctgen.train.config import base_config
from ctgen.train.optim import optimizer_config


def get_config(arg: str = "paper"):
    a = parse_arg(arg, variants=("paper", "demo", "phantom", "tiny"), lowres=0, batch=0, steps=0, text_dim=0,
                  sample_steps=0)
    c = base_config()
    c.stage = "superres"
    variant = a.variant
    if variant == "paper":
        # remat on: for accelerators, where XLA honours it (16 slices of 512^2 per device in a micro-batch
        # on one device). On XLA:CPU it saves no memory and costs ~24% time: --config.model.remat=false there
        # (docs/superres.md, "Remat").
        model, lowres = UNetConfig.paper(remat=True), 128
    elif variant == "demo":
        model, lowres = UNetConfig.paper(dim=32, remat=False), 32  # a CPU preset: remat would only cost time
    elif variant == "phantom":
        # residual: generates slice - bicubic(low-res) (UNetConfig.residual); the first demo SR, which generated
        # the slice as GenerateCT does, was still 0.13 dB under bicubic after 4250 steps (docs/demo_cascade.md)
        model, lowres = UNetConfig.paper(dim=16, text_embed_dim=64, remat=False, residual=True), 32
    else:
        model, lowres = UNetConfig.tiny(), 8
    if a.text_dim:
        model = UNetConfig.from_dict({**model.to_dict(), "text_embed_dim": a.text_dim})
    c.model = ml_collections.ConfigDict(model.to_dict())

    dc = c.diffusion = ml_collections.ConfigDict()
    dc.cond_drop_prob = 0.1  # text dropout for classifier-free guidance
    dc.p2_loss_weight_gamma = 0.5
    dc.p2_loss_weight_k = 1.0
    # Low-res noise augmentation: one level per batch, uniform in [0, lowres_aug_max] of the linear
    # schedule (GenerateCT: 1.0; the level sampled at inference is sample.noise_level).
    dc.lowres_aug_max = 1.0
    # ctgen addition, off by default (GenerateCT has no such term): extra squared v-error averaged over
    # the pixels the clean low-res input shows in soft_tissue_hu HU, times soft_tissue_weight
    # (docs/superres.md, "Soft-tissue term"; the CT-ViT's loss.soft_tissue_weight is the same idea).
    dc.soft_tissue_weight = 0.0
    dc.soft_tissue_hu = (-200.0, 200.0)

    s = c.sample = ml_collections.ConfigDict()  # eval and previews
    s.sampler = "ancestral"  # ancestral (GenerateCT) | ddim
    s.steps = 25
    s.noise_level = 0.1
    s.cond_scale = 1.0
    s.threshold = 0.95
    s.average = 1  # samples per slice averaged (SamplerConfig.average)

    c.tokenizer = ml_collections.ConfigDict({"weights": ""})  # frozen CT-ViT (see docstring)

    d = c.data
    d.dir = ""
    d.train_split = "train"
    d.eval_split = "validation"  # "" = no eval
    d.pairs_dir = ""  # side dataset of CT-ViT reconstructions (prepare --source sr-pairs)
    d.embeddings_dir = ""  # T5 embedding cache (prepare --source embeddings)
    d.max_text_length = 256
    d.lowres_size = lowres
    d.slices_per_volume = 192
    d.eval_slices_per_volume = 4
    d.eval_batch_size = 8
    d.random_crop = 0  # >0: train on random crops of this size (GenerateCT: off)
    d.worker_count = 0
    d.read_threads = 2
    d.prefetch_batches = 2

    c.optim.main = optimizer_config(learning_rate=5e-4, b1=0.9, b2=0.99, eps=1e-8, ema_decay=0.9999, ema_start=101,
                                    update_every=10, ema_warmup_power=2 / 3, ema_inv_gamma=1.0)

    t = c.train
    t.batch_size = 192
    t.accum_steps = 12
    t.steps = 100_000
    t.log_every = 20
    t.checkpoint_every = 200  # GenerateCT: every 200 steps
    t.eval_every = 2000
    t.eval_batches = 1
    t.preview_every = 2000

    if variant == "demo":
        d.slices_per_volume = 8
        t.batch_size, t.accum_steps = 16, 1
        t.steps = 20_000
        t.checkpoint_every = 500
        t.eval_every = t.preview_every = 1000
        c.optim.main.ema_start = 11
        c.optim.main.update_every = 1
    elif variant == "phantom":
        d.slices_per_volume = 8
        d.random_crop = 64
        d.max_text_length = 128  # phantom prompts: up to ~105 built-in T5 tokens
        t.batch_size, t.accum_steps = 16, 1
        t.steps = 4000
        t.log_every = 50
        t.checkpoint_every = 250
        t.eval_every = t.preview_every = 500
        s.steps = 25
        # Above ~0.3 the low-res input is mostly noise, which a dim-16 U-Net on a few thousand steps cannot
        # afford (docs/demo_cascade.md).
        dc.lowres_aug_max = 0.2
        c.optim.main.learning_rate = 1e-3
        # constant, then a cosine cool-down over the last 1000 steps
        c.optim.main.schedule, c.optim.main.hold_steps = "constant_cosine", 3000
        c.optim.main.ema_decay = 0.999
        c.optim.main.ema_start = 11
        c.optim.main.update_every = 1
    elif variant == "tiny":
        d.slices_per_volume = 4
        d.eval_slices_per_volume = 2
        d.max_text_length = 32
        t.batch_size, t.accum_steps = 8, 1
        t.steps = 20
        t.log_every = 5
        t.checkpoint_every = 10
        t.eval_every = t.preview_every = 10
        s.steps = 4
        c.optim.main.learning_rate = 2e-3
        c.optim.main.ema_start = 2
        c.optim.main.update_every = 1

    # Keyword settings (0 = the variant's own value).
    if a.lowres:
        d.lowres_size = a.lowres
    if a.batch:
        t.batch_size = a.batch
        d.slices_per_volume = math.gcd(a.batch, d.slices_per_volume)
        t.accum_steps = math.gcd(a.batch, t.accum_steps)
    if a.steps:
        t.steps = a.steps
    if a.sample_steps:
        s.steps = a.sample_steps
    return c
