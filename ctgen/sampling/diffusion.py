"""Continuous-time Gaussian diffusion (GenerateCT's `GaussianDiffusionContinuousTimes`) and its samplers.

Pure functions. Time t runs from 1 (noise) to 0 (data); a schedule gives log-SNR(t), and
alpha = sqrt(sigmoid(log_snr)), sigma = sqrt(sigmoid(-log_snr)), x_t = alpha x0 + sigma eps.
The network predicts v = alpha eps - sigma x0 (so x0 = alpha x_t - sigma v) and is called as
`denoise(x_t, log_snr_B) -> v` (a closure over its conditioning).

- `cosine_log_snr`: the image schedule (Nichol & Dhariwal's cosine, s = 0.008).
- `linear_log_snr`: the low-res conditioning augmentation schedule, -log(expm1(1e-4 + 10 t^2)).
- `sample_ancestral`: GenerateCT's sampler: `steps` steps on t = linspace(1, 0, steps + 1), each
  predicting x0, clipping it by dynamic thresholding and drawing from the DDPM posterior
  q(x_next | x_t, x0) (no noise on the last step); the result is clamped to [-1, 1].
- `sample_ddim`: deterministic DDIM (eta = 0) on the same time grid, usable with fewer steps.
Both are deterministic given their noise: `per_sample_noise` derives every sample's noise from
its own key, so a sample does not depend on which batch it was drawn in.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Denoise = Callable[[jax.Array, jax.Array], jax.Array]
"""denoise(x_t (B, ...), log_snr (B,)) -> the v prediction (B, ...)."""
StepNoise = Callable[[jax.Array], jax.Array]
"""step_noise(step index) -> standard normal noise shaped like x for that step."""


# --- schedules -------------------------------------------------------------------------------------
def cosine_log_snr(t: jax.Array, s: float = 0.008) -> jax.Array:
    """log-SNR of the cosine schedule: -log(max(cos((t + s) / (1 + s) pi/2)^-2 - 1, 1e-5))."""
    t = jnp.asarray(t, jnp.float32)
    return -jnp.log(jnp.maximum(jnp.cos((t + s) / (1 + s) * math.pi * 0.5) ** -2 - 1, 1e-5))


def linear_log_snr(t: jax.Array) -> jax.Array:
    """log-SNR of the "linear" (beta-linear) schedule: -log(expm1(1e-4 + 10 t^2))."""
    t = jnp.asarray(t, jnp.float32)
    return -jnp.log(jnp.expm1(1e-4 + 10 * t ** 2))


SCHEDULES = {"cosine": cosine_log_snr, "linear": linear_log_snr}


def alpha_sigma(log_snr: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))


def _per_sample(v_B: jax.Array, like: jax.Array) -> jax.Array:
    """(B,) -> broadcastable against `like` (B, ...)."""
    return v_B.reshape(v_B.shape + (1,) * (like.ndim - v_B.ndim))


def q_sample(x0: jax.Array, log_snr_B: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = alpha x0 + sigma noise."""
    alpha, sigma = alpha_sigma(_per_sample(log_snr_B, x0))
    return alpha * x0 + sigma * noise


def v_target(x0: jax.Array, noise: jax.Array, log_snr_B: jax.Array) -> jax.Array:
    """The v-prediction target alpha noise - sigma x0."""
    alpha, sigma = alpha_sigma(_per_sample(log_snr_B, x0))
    return alpha * noise - sigma * x0


def x0_from_v(x_t: jax.Array, v: jax.Array, log_snr_B: jax.Array) -> jax.Array:
    alpha, sigma = alpha_sigma(_per_sample(log_snr_B, x_t))
    return alpha * x_t - sigma * v


def p2_weight(log_snr_B: jax.Array, gamma: float = 0.5, k: float = 1.0) -> jax.Array:
    """P2 loss weight (Choi et al. 2022): (k + exp(log_snr))^-gamma."""
    return (k + jnp.exp(log_snr_B)) ** -gamma


def dynamic_threshold(x0: jax.Array, percentile: float) -> jax.Array:
    """Imagen's dynamic thresholding: per sample s = max(1, percentile of |x0|) (linear
    interpolation, as torch.quantile), then clip to [-s, s] and divide by s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=-1), 1.0)
    s = _per_sample(s, x0)
    return jnp.clip(x0, -s, s) / s


def clip_x0(x0: jax.Array, threshold: float | None) -> jax.Array:
    """Dynamic thresholding at `threshold` (a percentile in (0, 1)), or plain clipping to [-1, 1]."""
    return dynamic_threshold(x0, threshold) if threshold else jnp.clip(x0, -1.0, 1.0)


def posterior(x0: jax.Array, x_t: jax.Array, log_snr_B: jax.Array,
              log_snr_next_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of q(x_next | x_t, x0) for continuous time (Kingma et al. 2021, eq. 33)."""
    alpha, _ = alpha_sigma(_per_sample(log_snr_B, x_t))
    alpha_next, sigma_next = alpha_sigma(_per_sample(log_snr_next_B, x_t))
    c = -jnp.expm1(_per_sample(log_snr_B - log_snr_next_B, x_t))
    mean = alpha_next * (x_t * (1 - c) / alpha + c * x0)
    return mean, sigma_next ** 2 * c


def sampling_times(steps: int) -> jax.Array:
    """t = linspace(1, 0, steps + 1): step i goes from times[i] to times[i + 1]."""
    return jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)


# --- noise ---------------------------------------------------------------------------------------
def per_sample_noise(keys_B: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, StepNoise]:
    """(x_T, step_noise) for a batch whose sample b draws all its noise from `keys_B[b]`: x_T from
    fold_in(key, 0), step i's noise from fold_in(key, i + 1). `shape` is one sample's shape."""
    def draw(i):
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32))(keys_B)

    return draw(0), lambda i: draw(i + 1)


# --- samplers ------------------------------------------------------------------------------------
def sample_ancestral(denoise: Denoise, x_T: jax.Array, step_noise: StepNoise, *, steps: int = 25,
                     log_snr_fn: Callable[[jax.Array], jax.Array] = cosine_log_snr,
                     threshold: float | None = 0.95) -> jax.Array:
    """GenerateCT's sampler (see module docstring); returns x0 in [-1, 1].

    x_T: the starting noise (B, ...); step_noise(i): the noise of step i (unused on the last).
    threshold: dynamic-thresholding percentile, or None for plain clipping of x0 to [-1, 1].
    """
    times = sampling_times(steps)
    batch = x_T.shape[0]

    def body(i, x):
        t = jnp.full((batch,), times[i])
        t_next = jnp.full((batch,), times[i + 1])
        log_snr, log_snr_next = log_snr_fn(t), log_snr_fn(t_next)
        x0 = clip_x0(x0_from_v(x, denoise(x, log_snr), log_snr), threshold)
        mean, var = posterior(x0, x, log_snr, log_snr_next)
        std = jnp.exp(0.5 * jnp.log(jnp.maximum(var, 1e-20)))
        last = _per_sample((t_next == 0).astype(x.dtype), x)
        return mean + (1 - last) * std * step_noise(i)

    return jnp.clip(jax.lax.fori_loop(0, steps, body, x_T), -1.0, 1.0)


def sample_ddim(denoise: Denoise, x_T: jax.Array, *, steps: int = 10,
                log_snr_fn: Callable[[jax.Array], jax.Array] = cosine_log_snr,
                threshold: float | None = 0.95) -> jax.Array:
    """Deterministic DDIM (eta = 0) on t = linspace(1, 0, steps + 1): x_next = alpha_next x0 +
    sigma_next eps with eps recomputed from the (thresholded) x0; the last step returns x0.
    Returns x0 in [-1, 1]."""
    times = sampling_times(steps)
    batch = x_T.shape[0]

    def body(i, x):
        t = jnp.full((batch,), times[i])
        t_next = jnp.full((batch,), times[i + 1])
        log_snr, log_snr_next = log_snr_fn(t), log_snr_fn(t_next)
        x0 = clip_x0(x0_from_v(x, denoise(x, log_snr), log_snr), threshold)
        alpha, sigma = alpha_sigma(_per_sample(log_snr, x))
        eps = (x - alpha * x0) / sigma
        alpha_next, sigma_next = alpha_sigma(_per_sample(log_snr_next, x))
        last = _per_sample((t_next == 0).astype(x.dtype), x)
        return last * x0 + (1 - last) * (alpha_next * x0 + sigma_next * eps)

    return jnp.clip(jax.lax.fori_loop(0, steps, body, x_T), -1.0, 1.0)


def guided(denoise_cond: Denoise, denoise_null: Denoise, cond_scale: float) -> Denoise:
    """Classifier-free guidance on the v prediction: null + cond_scale (cond - null); the
    conditional network alone when cond_scale == 1 (GenerateCT's inference setting)."""
    if cond_scale == 1.0:
        return denoise_cond
    return lambda x, log_snr: (lambda n: n + cond_scale * (denoise_cond(x, log_snr) - n))(denoise_null(x, log_snr))
