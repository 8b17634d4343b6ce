"""Mask schedules of masked-token models: which fraction of the tokens is masked at a time r in [0, 1].

GenerateCT (like MaskGIT) uses the cosine schedule cos(pi/2 * r) both for training (a random level
s of `steps`, r = s / steps) and for decoding (step s of `steps` re-masks that fraction). Every
schedule is 1 at r = 0 (decoding starts from an all-masked grid) and falls towards 0 at r = 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "linear", "square", "cubic", "sqrt")


def mask_fraction(schedule: str, r):
    """Fraction of masked tokens at time `r` (numpy or JAX array, float in [0, 1])."""
    xp = jnp if isinstance(r, jax.Array) else np
    if schedule == "cosine":
        return xp.cos(r * (np.pi * 0.5))
    if schedule == "linear":
        return 1.0 - r
    if schedule == "square":
        return 1.0 - r ** 2
    if schedule == "cubic":
        return 1.0 - r ** 3
    if schedule == "sqrt":
        return 1.0 - xp.sqrt(r)
    raise ValueError(f"unknown mask schedule {schedule!r}; choose one of {SCHEDULES}")


def decoding_counts(schedule: str, steps: int, num_tokens: int) -> np.ndarray:
    """Tokens masked at each of `steps` decoding steps: round(N * fraction(s / steps)), at least 1
    (rounding half to even, like torch.round); the first step masks all N."""
    if steps < 1:
        raise ValueError(f"decoding needs at least one step, got {steps}")
    r = np.arange(steps, dtype=np.float64) / steps
    return np.maximum(np.round(num_tokens * mask_fraction(schedule, r)), 1).astype(np.int32)


def training_mask(key: jax.Array, batch: int, num_tokens: int, steps: int = 18,
                  schedule: str = "cosine") -> jax.Array:
    """GenerateCT's training mask (B, N) bool: per row a level s ~ U{0..steps-1}, then
    max(1, round(N * fraction(s / steps))) positions chosen uniformly at random."""
    k_level, k_perm = jax.random.split(key)
    level = jax.random.randint(k_level, (batch,), 0, steps)
    fraction = mask_fraction(schedule, level.astype(jnp.float32) / steps)
    count = jnp.maximum(jnp.round(fraction * num_tokens), 1)
    return fixed_count_mask(k_perm, count.astype(jnp.int32), num_tokens)


def fixed_count_mask(key: jax.Array, count_B: jax.Array, num_tokens: int) -> jax.Array:
    """(B, N) bool with exactly count_B[b] True positions per row, uniformly at random."""
    rank = jnp.argsort(jax.random.uniform(key, (count_B.shape[0], num_tokens)), axis=-1)
    return rank < count_B[:, None]
