"""Toy regression stage: the shared loop's own test and smoke-test config (not a CT model).

Variant `tiny` (the default; a few hundred steps in seconds) with switches, comma-separated:
`two_phase` (adds an "aux" phase every third step, like a GAN's discriminator updates), `ema`
(EMA of the main phase's parameters, used for eval); e.g. `configs/toy.py:tiny,two_phase,ema`.

    ctgen train --config configs/toy.py:tiny --workdir /tmp/toy --config.train.steps=200
"""
import ml_collections

from ctgen.configuration import parse_arg
from ctgen.train.config import base_config
from ctgen.train.optim import optimizer_config


def get_config(arg: str = "tiny"):
    c = base_config()
    c.stage = "toy"
    c.model.in_dim = 16
    c.model.hidden = 64
    c.model.out_dim = 8
    c.model.momentum = 0.9
    c.data.num_train = 512
    c.data.num_eval = 64
    c.data.eval_batch_size = 16
    c.data.data_seed = 7
    # A frozen upstream model (stage docstring): weights of a toy run with the same model config.
    c.teacher = ml_collections.ConfigDict({"weights": ""})

    c.optim.main = optimizer_config(name="adamw", learning_rate=3e-3, b2=0.99, weight_decay=1e-4,
                                    schedule="warmup_cosine", warmup_steps=10, grad_clip_norm=1.0)
    c.optim.aux = optimizer_config(learning_rate=1e-3)
    c.train.steps = 200
    c.train.batch_size = 16
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.train.eval_every = 100
    c.train.preview_every = -1

    a = parse_arg(arg, variants=("tiny",), two_phase=False, ema=False)
    if a.two_phase:
        c.train.phase_cycle = ("main", "main", "aux")
    if a.ema:
        c.optim.main.ema_decay = 0.9
    return c
