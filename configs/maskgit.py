"""MaskGIT (stage 2): text-conditioned masked-token transformer over CT-ViT ids, GenerateCT's stage 2.

    ctgen prepare --source tokens --dataset data/ctgen_ct/<name>/1.0.0 --tokenizer runs/ctvit --out data/tokens
    ctgen prepare --source embeddings --dataset data/ctgen_ct/<name>/1.0.0 --out data/t5
    ctgen train --config configs/maskgit.py:paper --workdir runs/maskgit \\
        --config.data.tokens_dir=data/tokens --config.data.embeddings_dir=data/t5 \\
        --config.tokenizer.weights=runs/ctvit
    ctgen train --config configs/maskgit.py:tiny,steps=50 --workdir /tmp/maskgit_tiny --config.data...

Variants:
  paper  GenerateCT exactly: MaskGit(num_tokens 8192, max_seq_len 10000, dim 512, depth 6, 8 heads x 64,
         text width 768), cosine masking over 18 levels, cross-entropy on the masked ids, Adam(0.9, 0.99)
         3e-5 with 10k linear warm-up then cosine over 4M steps, gradient clipping 2.0; one volume per
         device (GenerateCT: batch 1 per process; 8 here). Text dropout 0.25 (see below).
  demo   dim 256, depth 4, 4 heads x 64, for the `small` CT-ViT (codebook 512, 64x64 slices): a
         17-slice grid of 9x8x8 tokens, batch 8.
  phantom  the built-in demo cascade's MaskGIT (docs/demo_cascade.md): dim 192, depth 4, 4 heads x 48,
         for the `phantom` CT-ViT (codebook 2048, 17 x 32 x 32 -> 9 x 8 x 8 tokens) and the built-in
         T5 (width 64); batch 8, Adam 5e-4 with warm-up and cosine decay over 4000 steps.
  tiny   dim 32, depth 2, for the `tiny` CT-ViT (codebook 64, 32x32 slices): tests.
Settings after the variant (0 = the variant's value): batch=N (train and eval), steps=N.

The token grid, and so the sequence length, is the token dataset's (the slice count it was encoded
at); model.max_seq_len bounds it. model.dim_context=0 takes the text width from data.embeddings_dir.
config.tokenizer.weights (a CT-ViT weights directory, workdir or GenerateCT file) is the frozen
CT-ViT that previews decode samples with; without it previews keep the sampled ids only.

Departures from GenerateCT, each a switch:
  loss.cond_drop_prob=0.25: text dropout for classifier-free guidance really happens. GenerateCT's
      `MaskGITTransformer.forward` sets cond_drop_prob to 0 before reading its 0.25 default, so it
      never trained the null prompt its sampler guides with; loss.reference_exact=True does the same.
  model.spacing_tokens=N (0 in every variant): the voxel spacing as N extra context tokens, so a
      model can be asked for a slice thickness (data from `ctgen prepare --source tokens`).
  model.attention: "auto" computes long-sequence attention block by block (fused on GPU/TPU); same
      numbers as GenerateCT's dense attention within float32 rounding.
Findings + impression prompts: prepare the volumes with `--prompt-template findings` (or any template)
and build the embedding cache from them; generation must use the same template.
"""
import dataclasses

import ml_collections

from ctgen.configuration import parse_arg
from ctgen.models.maskgit import MaskGITConfig
from ctgen.sampling.maskgit import SampleConfig
from ctgen.train.config import base_config
from ctgen.train.optim import optimizer_config


def get_config(arg: str = "paper"):
    a = parse_arg(arg, variants=("paper", "demo", "phantom", "tiny"), batch=0, steps=0)
    c = base_config()
    c.stage = "maskgit"
    if a.variant == "paper":
        model = MaskGITConfig.paper(dim_context=0)
    elif a.variant == "demo":
        model = MaskGITConfig.paper(num_tokens=512, max_seq_len=1024, dim=256, depth=4, heads=4, dim_head=64,
                                    dim_context=0)
    elif a.variant == "phantom":
        # dense attention: at its 576 tokens "auto" picks the blocked form (576^2 pairs > DENSE_MAX_PAIRS),
        # whose per-block rematerialisation made the training step slower on the 2-core CPU (batch 8:
        # 4.3 -> 4.0 s with XLA's default flags, 3.8 -> 3.0 s with those of docs/demo_cascade.md)
        model = MaskGITConfig.paper(num_tokens=2048, max_seq_len=1024, dim=192, depth=4, heads=4, dim_head=48,
                                    dim_context=0, attention="dense")
    else:
        model = MaskGITConfig.tiny(dim_context=0)
    c.model = ml_collections.ConfigDict(model.to_dict())
    c.tokenizer = ml_collections.ConfigDict({"weights": ""})

    d = c.data
    d.tokens_dir = ""
    d.embeddings_dir = ""
    d.train_split = "train"
    d.eval_split = "validation"  # "" = no eval
    d.eval_batch_size = 8
    d.max_text_length = 256  # T5 tokens (GenerateCT truncates at 256)
    d.worker_count = 0
    d.read_threads = 2
    d.prefetch_batches = 2

    loss = c.loss = ml_collections.ConfigDict()
    loss.cond_drop_prob = 0.25
    loss.reference_exact = False  # True: GenerateCT's bug, no text dropout at all
    loss.mask_steps = 18
    loss.mask_schedule = "cosine"

    c.eval = ml_collections.ConfigDict({"mask_fractions": (1.0, 0.5, 0.15), "seed": 0})
    c.sample = ml_collections.ConfigDict(dataclasses.asdict(SampleConfig()))  # preview decoding (GenerateCT's)

    c.optim.main = optimizer_config(learning_rate=3e-5, b1=0.9, b2=0.99, eps=1e-8, schedule="warmup_cosine",
                                    warmup_steps=10_000, decay_steps=4_000_000, grad_clip_norm=2.0)
    t = c.train
    t.batch_size = 8
    t.steps = 4_010_000
    t.log_every = 50
    t.checkpoint_every = 2000  # GenerateCT: 2000
    t.eval_every = 2000
    t.eval_batches = 8
    t.preview_every = 2000  # GenerateCT samples a 201-slice volume every 100 steps

    if a.variant == "demo":
        t.steps = 20_000
        c.optim.main.learning_rate = 3e-4
        c.optim.main.warmup_steps = 500
        c.optim.main.decay_steps = 0
        t.checkpoint_every = t.eval_every = t.preview_every = 1000
        t.eval_batches = 4
    elif a.variant == "phantom":
        d.max_text_length = 128  # phantom prompts: up to ~105 built-in T5 tokens
        t.steps = 4000
        c.optim.main.learning_rate = 5e-4
        c.optim.main.warmup_steps = 300
        c.optim.main.decay_steps = 0  # until train.steps (3700 here; steps=N moves the end with the run)
        c.optim.main.end_learning_rate_factor = 0.05
        t.log_every = 50
        t.checkpoint_every = 250
        t.eval_every = t.preview_every = 1000
        t.eval_batches = 0
    elif a.variant == "tiny":
        t.steps = 40
        t.log_every = 5
        t.checkpoint_every = t.eval_every = t.preview_every = 20
        t.eval_batches = 1
        c.optim.main.learning_rate = 3e-3
        c.optim.main.warmup_steps = 5
        c.optim.main.decay_steps = 0
        c.sample.steps = 6
    if a.batch:
        t.batch_size = d.eval_batch_size = a.batch
    if a.steps:
        t.steps = a.steps
    return c
