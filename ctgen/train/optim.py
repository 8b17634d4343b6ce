"""Optimizers and learning-rate schedules from a config block (`config.optim.<phase>`)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ctgen.errors import UserError


def optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults for one phase's optimizer (GenerateCT uses Adam 0.9/0.99, eps 1e-8)."""
    c = ml_collections.ConfigDict()
    c.name = "adam"  # adam | adamw
    c.learning_rate = 3e-5
    c.b1 = 0.9
    c.b2 = 0.99
    c.eps = 1e-8
    c.weight_decay = 0.0  # adamw only
    c.schedule = "constant"  # constant | warmup_constant | warmup_cosine | warmup_linear | constant_cosine
    c.warmup_steps = 0
    c.hold_steps = 0  # constant_cosine: updates at the full rate before the cosine decay starts
    c.decay_steps = 0  # cosine/linear decay length after warmup (or hold); 0 = until train.steps
    c.end_learning_rate_factor = 0.0  # final lr = factor * learning_rate
    c.grad_clip_norm = 0.0  # 0 = off
    c.ema_decay = 0.0  # 0 = no EMA of this phase's parameters
    c.ema_start = 0  # phase update count before which the EMA just copies the parameters
    c.update_every = 1  # EMA update period (in this phase's updates)
    c.ema_warmup_power = 0.0  # >0: decay warms up as 1 - (1 + n / ema_inv_gamma) ** -power (ema-pytorch),
    c.ema_inv_gamma = 1.0  #     n = updates since ema_start, capped at ema_decay; 0 = constant decay
    c.update(overrides)
    return c


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    lr, warm = float(cfg.learning_rate), int(cfg.warmup_steps)
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    decay = int(cfg.decay_steps) or max(total_steps - warm, 1)
    end = lr * float(cfg.end_learning_rate_factor)
    if cfg.schedule == "warmup_constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr)], [warm]
        )
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, warm + decay, end)
    if cfg.schedule == "constant_cosine":  # a cool-down: held, then cosine to the end rate
        hold = int(cfg.get("hold_steps", 0))
        length = int(cfg.decay_steps) or max(total_steps - hold, 1)
        return optax.join_schedules(
            [optax.constant_schedule(lr), optax.cosine_decay_schedule(lr, length, float(cfg.end_learning_rate_factor))],
            [hold],
        )
    if cfg.schedule == "warmup_linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warm, 1)), optax.linear_schedule(lr, end, decay)], [warm]
        )
    raise UserError(
        f"unknown learning-rate schedule {cfg.schedule!r}; use constant, warmup_constant, "
        "warmup_cosine, warmup_linear or constant_cosine"
    )


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Clip (optional) -> Adam/AdamW with the schedule."""
    lr = schedule(cfg, total_steps)
    if cfg.name == "adam":
        opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        raise UserError(f"unknown optimizer {cfg.name!r}; use adam or adamw")
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
    return opt


def ema_update(ema, params, decay: float, count: jax.Array, start: int, every: int, warmup_power: float = 0.0,
               inv_gamma: float = 1.0):
    """EMA of parameters; copies until `start` updates, then updates every `every` updates.

    warmup_power > 0: the decay at update `count` is min(decay, 1 - (1 + n / inv_gamma) ** -power)
    with n = count - start + 1 (ema-pytorch's warm-up, which GenerateCT's SR trainer uses)."""
    copy = count < start
    do = jnp.logical_or(copy, (count % every) == 0)
    if warmup_power > 0:
        n = jnp.maximum(count - start + 1, 0).astype(jnp.float32)
        decay = jnp.minimum(decay, 1.0 - (1.0 + n / inv_gamma) ** -warmup_power)
    d = jnp.where(copy, 0.0, decay)

    def one(e, p):
        new = d * e + (1.0 - d) * p.astype(e.dtype)
        return jnp.where(do, new, e)

    return jax.tree.map(one, ema, params)
