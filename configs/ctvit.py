"""CT-ViT tokenizer (stage 1): GenerateCT's VQ autoencoder with VGG perceptual and hinge-GAN losses.

    ctgen prepare --source phantom --count 200 --out data/
    ctgen train --config configs/ctvit.py:paper --workdir runs/ctvit --config.data.dir=data/ctgen_ct/<name>/1.0.0
    ctgen train --config configs/ctvit.py:demo  --workdir runs/ctvit_demo --config.data.dir=...
    ctgen train --config configs/ctvit.py:tiny  --workdir /tmp/ctvit_tiny --config.data.dir=...
    ctgen train --config configs/ctvit.py:small,res=64,slices=17 --workdir runs/small --config.data.dir=...

Variants:
  paper  GenerateCT exactly: CTViT(dim 512, codebook 8192, 128x128, patch 16, temporal patch 2,
         depth 4+4, 8 heads x 32), 201 slices, batch 4, Adam(0.9, 0.99) 3e-5 with clipping 0.5 for the
         generator (VGG16 included, trainable), 3e-7 without clipping for the discriminator, phase
         cycle G,G,G,D, recon + perceptual + commitment + adaptive-weight hinge GAN, gradient
         penalty 10 every discriminator step, EMA codebook decay 0.8.
  demo   a narrower CT-ViT (dim 256, codebook 1024, depth 2+2, torchvision-size VGG16) on 17-slice
         windows, batch 2: learns visibly on one CPU host within hours.
  small  tiny's layout at 64x64 widened to dim 128, codebook 512, 4 heads x 32, on 17-slice windows,
         batch 4, 300 steps with eval/previews/checkpoints every 100: what `ctgen demo` trains.
  phantom  the built-in demo cascade's tokenizer (docs/demo_cascade.md): dim 128, codebook 2048 with
         dead-code expiry (model.vq_dead_code_threshold=0.1), depth 2+2, patch 4 on 17x32x32
         phantoms (9x8x8 ids), no VGG/GAN (reconstruction + commitment only, which is what the PSNR
         bar measures), batch 8, Adam 1e-3 with warm-up and cosine decay over 4000 steps.
  tiny   a 32x32 toy (dim 32, codebook 64, patch 8, depth 1+1, VGG/discriminator shrunk) for tests.
Settings after the variant, comma-separated (0 or absent = the variant's value):
  res=N     slice size N x N (model.image_size and the discriminator's)
  slices=N  slices per training volume (data.num_slices; model.max_slices is raised to it if lower)
  batch=N   global batch for training and eval (train.batch_size, data.eval_batch_size)
  steps=N   train.steps
  e.g. configs/ctvit.py:small,res=32,slices=5,steps=40
Perceptual loss: set loss.vgg_weights to torchvision's vgg16 weights (`vgg16-397923af.pth`, any
torchvision-layout VGG16 state_dict, .pth or .safetensors), or warm-start from an imported
GenerateCT checkpoint (`ctgen import generatect-ctvit ctvit_pretrained.pt --out DIR`, then
--config.init_from=DIR), whose VGG is used. Without either the run logs that the perceptual loss
is off, and the adaptive GAN weight then uses the reconstruction loss's gradient.

Departures from GenerateCT, each a switch (the paper variant keeps GenerateCT's behaviour):
  model.remat=True (all variants): recompute transformer activations in the backward pass.
      Same numbers; ~1/3 more transformer compute for ~5x less activation memory (201 slices:
      step peak 4 GB instead of 9).
  model.vq_dead_code_threshold=0 (0.1 in `phantom`): above 0, codes whose EMA cluster size falls
      below it are replaced by batch vectors in training (vector-quantize-pytorch's
      threshold_ema_dead_code); the weights keep GenerateCT's layout.
  loss.adaptive_weight_ref="recon" is used automatically when there is no perceptual loss,
      because GenerateCT's weight ||dL_perc/dW|| / ||dL_gan/dW|| would be 0 and silently turn
      the GAN off.
  Not reproduced: GenerateCT clips the generator's gradient norm over *all* parameters, including
      the discriminator's gradients of the generator loss, which its optimizer never zeroes, so
      they accumulate over the three generator steps; ctgen clips the generator's own gradients.
"""
import dataclasses

import ml_collections

from ctgen.configuration import parse_arg
from ctgen.models.ctvit import CTViTConfig
from ctgen.models.ctvit_losses import LossNetworksConfig, model_config_dict
from ctgen.train.config import base_config
from ctgen.train.optim import optimizer_config


def get_config(arg: str = "paper"):
    a = parse_arg(arg, variants=("paper", "demo", "small", "phantom", "tiny"), res=0, slices=0, batch=0, steps=0)
    c = base_config()
    c.stage = "ctvit"
    variant = a.variant
    nets = LossNetworksConfig()
    if variant == "paper":
        model = CTViTConfig.paper(max_slices=201, remat=True)
    elif variant == "demo":
        model = CTViTConfig.paper(dim=256, codebook_size=1024, spatial_depth=2, temporal_depth=2, max_slices=201,
                                  remat=True)
    elif variant == "small":
        model = CTViTConfig.tiny(dim=128, codebook_size=512, heads=4, dim_head=32, image_size=64, max_slices=17,
                                 remat=True)
        tiny = LossNetworksConfig.tiny()
        nets = dataclasses.replace(tiny, discr=dataclasses.replace(tiny.discr, image_size=64))
    elif variant == "phantom":
        # Codebook 2048 with dead-code expiry: the first run (512 codes, no expiry, 3000 steps) used 48%
        # of its codes and reached 27.1 dB held-out PSNR at step 2500, under the 28 dB bar.
        model = CTViTConfig.tiny(dim=128, codebook_size=2048, heads=4, dim_head=32, image_size=32, patch_size=4,
                                 max_slices=17, spatial_depth=2, temporal_depth=2, remat=False,
                                 vq_dead_code_threshold=0.1)
        nets = None
    else:
        model, nets = CTViTConfig.tiny(max_slices=17, remat=True), LossNetworksConfig.tiny()
    # GenerateCT's flat CTViT arguments: the autoencoder's, use_vgg_and_gan, vgg.*, discr.*
    c.model = ml_collections.ConfigDict(model_config_dict(model, nets))

    loss = c.loss = ml_collections.ConfigDict()
    loss.perceptual = True  # needs VGG16 weights (loss.vgg_weights or init_from); off otherwise
    loss.gan = True
    loss.vgg_weights = ""
    loss.vgg_trainable = True  # GenerateCT puts the VGG16 in the generator's optimizer
    loss.vgg_dropout = True  # GenerateCT keeps the VGG in train mode
    loss.adaptive_weight_ref = "perceptual"
    loss.adaptive_weight_max = 1e4
    loss.grad_penalty_weight = 10.0
    loss.update_codebook_in_discr_step = True  # GenerateCT's discriminator step runs the VQ in train mode
    loss.soft_tissue_weight = 0.0  # extra squared error over soft-tissue voxels (ctgen addition; 0 = GenerateCT)
    loss.soft_tissue_hu = (-200.0, 200.0)  # target HU range that term (and the eval's soft_tissue_mae_hu) covers

    d = c.data
    d.dir = ""
    d.train_split = "train"
    d.eval_split = "validation"  # "" = no eval
    d.num_slices = 201
    d.eval_num_slices = 0  # 0 = num_slices
    d.eval_nifti = ""  # comma-separated NIfTI files to evaluate on instead of eval_split
    d.slice_sampling = "random"
    d.eval_batch_size = 4
    d.worker_count = 0
    d.read_threads = 2
    d.prefetch_batches = 2

    c.optim.generator = optimizer_config(learning_rate=3e-5, b1=0.9, b2=0.99, eps=1e-8, grad_clip_norm=0.5)
    c.optim.discriminator = optimizer_config(learning_rate=3e-7, b1=0.9, b2=0.99, eps=1e-8)
    del c.optim["main"]

    t = c.train
    t.phase_cycle = ("generator", "generator", "generator", "discriminator")
    t.batch_size = 4
    t.steps = 400_000  # loop steps = 100k GenerateCT iterations of 3 generator + 1 discriminator update
    t.log_every = 20
    t.checkpoint_every = 1000  # GenerateCT: 250 iterations
    t.eval_every = 2000
    t.eval_batches = 8
    t.preview_every = 2000

    if variant == "demo":
        d.num_slices = 17
        d.eval_batch_size = 2
        t.batch_size = 2
        t.steps = 20_000
        t.checkpoint_every = 500
        t.eval_every = t.preview_every = 500
        t.eval_batches = 4
    elif variant == "small":
        d.num_slices = 17
        d.eval_batch_size = t.batch_size = 4
        t.steps = 300
        t.log_every = 25
        t.checkpoint_every = 100
        t.eval_every = t.preview_every = 100
        t.eval_batches = 0
    elif variant == "tiny":
        d.num_slices = 9
        d.eval_batch_size = 8
        t.batch_size = 8
        t.steps = 40
        t.log_every = 4
        t.checkpoint_every = 20
        t.eval_every = t.preview_every = 20
        t.eval_batches = 1
    elif variant == "phantom":
        loss.perceptual = loss.gan = False
        t.phase_cycle = ("generator",)
        d.num_slices = 17
        d.eval_batch_size = t.batch_size = 8
        t.steps = 4000
        t.log_every = 50
        t.checkpoint_every = 250
        t.eval_every = t.preview_every = 500
        t.eval_batches = 0
        c.optim.generator = optimizer_config(learning_rate=1e-3, b1=0.9, b2=0.99, eps=1e-8, grad_clip_norm=1.0,
                                             schedule="warmup_cosine", warmup_steps=200, decay_steps=3800,
                                             end_learning_rate_factor=0.05)
        del c.optim["discriminator"]
    if variant in ("small", "tiny"):
        c.optim.generator.learning_rate = 2e-3
        c.optim.discriminator.learning_rate = 1e-4

    # Keyword settings (0 = the variant's own value).
    if a.res:
        c.model.image_size = a.res
        if "discr" in c.model:
            c.model.discr.image_size = a.res
    if a.slices:
        d.num_slices = a.slices
        c.model.max_slices = max(c.model.max_slices, a.slices)
    if a.batch:
        t.batch_size = d.eval_batch_size = a.batch
    if a.steps:
        t.steps = a.steps
    return c
