"""Numeric parity with GenerateCT's PyTorch super-resolution U-Net (runs only with a local checkout).

    CTGEN_GENERATECT_DIR=/path/to/GenerateCT pytest -s tests/convert/test_superres_parity.py

needs torch, einops, einops-exts, beartype, kornia and ema-pytorch==0.8.3 (`pip install -e '.[parity]'`;
see tests/reference/generatect_superres_runtime.py for the runtime CPU adaptations). Skipped otherwise.
The U-Net is GenerateCT's exact configuration (superres.yaml) with random weights, every parameter
moved off its init so that a mix-up of two tensors cannot go unnoticed.
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
import generatect_superres_runtime as rt  # noqa: E402

from ctgen.convert import superres as sv  # noqa: E402
from ctgen.convert.superres_store import export_superres, save_superres_dir  # noqa: E402
from ctgen.convert.torch_files import read_torch_object  # noqa: E402
from ctgen.models.unet import UNetConfig  # noqa: E402
from ctgen.sampling import diffusion as df  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.slow,
              pytest.mark.skipif(rt.skip_reason() is not None, reason=str(rt.skip_reason()))]

TOL = 1e-4
SAMPLE_TOL = 1e-3
TEXT_LEN = 20

_forward = nnx.jit(lambda m, x, ls, low, lls, text, mask: m(x, ls, low, lls, text, mask))


@pytest.fixture(scope="module")
def reference():
    """GenerateCT's Superres (paper U-Net) with perturbed random weights, and ctgen's import of it."""
    ref = rt.build_superres(image_sizes=(32, 128), seed=0)
    torch = rt.load().torch
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.unets[1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sd = {k: v.detach().numpy() for k, v in ref.unets[1].state_dict().items()}
    result = sv.from_generatect(sd)
    assert result.config == UNetConfig.paper()
    return ref, result.model()


def _inputs(size: int, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, size, size)).astype(np.float32)
    low = rng.uniform(-1, 1, (batch, 1, size, size)).astype(np.float32)
    text = rng.standard_normal((batch, TEXT_LEN, 768)).astype(np.float32)
    mask = np.ones((batch, TEXT_LEN), bool)
    mask[1:, TEXT_LEN // 2:] = False  # the second prompt is shorter: padding positions
    return x, low, text, mask


def _reference_forward(ref, unet, x, low, text, mask, t, lowres_t):
    torch = rt.load().torch
    log_snr = ref.noise_schedulers[1].get_condition(torch.tensor(t))
    low_snr = ref.lowres_noise_schedule.get_condition(torch.tensor(lowres_t))
    with torch.no_grad():
        out = unet(torch.tensor(x), log_snr, lowres_cond_img=torch.tensor(low), lowres_noise_times=low_snr,
                   text_embeds=torch.tensor(text), text_mask=torch.tensor(mask)).numpy()
    return out, log_snr.numpy(), low_snr.numpy()


def _ours_forward(model, x, low, text, mask, log_snr, low_snr):
    out = _forward(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(log_snr),
                   jnp.asarray(low.transpose(0, 2, 3, 1)), jnp.asarray(low_snr), jnp.asarray(text), jnp.asarray(mask))
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("size", [64, 128])
def test_unet_forward(reference, size):
    ref, model = reference
    x, low, text, mask = _inputs(size)
    t, lowres_t = np.array([0.3, 0.85], np.float32), np.array([0.1, 0.6], np.float32)
    want, log_snr, low_snr = _reference_forward(ref, ref.unets[1], x, low, text, mask, t, lowres_t)
    got = _ours_forward(model, x, low, text, mask, log_snr, low_snr)
    err = float(np.abs(got - want).max())
    print(f"\nSR U-Net {size}x{size} batch 2: max abs error {err:.2e} (output scale {np.abs(want).max():.2f})")
    assert err <= TOL


def test_sample_25_steps(reference):
    """GenerateCT's p_sample_loop (25 ancestral steps, v-prediction, dynamic thresholding at the 95th
    percentile) against `sample_ancestral` with the same starting and step noise."""
    ref, model = reference
    torch = rt.load().torch
    size, batch, steps = 64, 2, 25
    _, low, text, mask = _inputs(size, batch, seed=3)
    lowres_t = torch.full((batch,), 0.1)
    shape = (batch, 1, size, size)
    torch.manual_seed(7)
    with torch.no_grad():
        want = ref.p_sample_loop(ref.unets[1], shape, noise_scheduler=ref.noise_schedulers[1],
                                 lowres_cond_img=torch.tensor(low), lowres_noise_times=lowres_t,
                                 text_embeds=torch.tensor(text), text_mask=torch.tensor(mask), pred_objective="v",
                                 dynamic_threshold=True, use_tqdm=False).numpy()
    torch.manual_seed(7)  # the loop draws x_T, then one randn_like per step
    noise = np.stack([torch.randn(shape).numpy() for _ in range(steps + 1)]).transpose(0, 1, 3, 4, 2)
    low_snr = ref.lowres_noise_schedule.get_condition(lowres_t).numpy()
    low_j, low_snr_j = jnp.asarray(low.transpose(0, 2, 3, 1)), jnp.asarray(low_snr)

    @nnx.jit
    def run(model, noise):
        den = lambda x, log_snr: model(x, log_snr, low_j, low_snr_j, jnp.asarray(text), jnp.asarray(mask))  # noqa: E731
        return df.sample_ancestral(den, noise[0], lambda i: noise[i + 1], steps=steps, threshold=0.95)

    got = (np.asarray(run(model, jnp.asarray(noise))).transpose(0, 3, 1, 2) + 1) * 0.5
    err = float(np.abs(got - want).max())
    print(f"\n25-step ancestral sample {size}x{size} batch {batch}: max abs error {err:.2e} ([0, 1] range)")
    assert err <= SAMPLE_TOL


def test_export_strict_load(reference, tmp_path):
    """ctgen -> `ctgen export superres` (.pt trainer checkpoint) -> GenerateCT strict loads of `model`
    and `ema` -> the same output as ctgen, from the EMA weights GenerateCT samples with."""
    ref, model = reference
    torch = rt.load().torch
    cfg = UNetConfig.paper()
    params = nnx.state(model, nnx.Param)
    wdir = str(tmp_path / "w")
    save_superres_dir(wdir, cfg, params)
    out = str(tmp_path / "superres.pt")
    export_superres(wdir, out)
    ckpt = read_torch_object(out)
    assert set(ckpt) >= {"model", "ema", "steps", "time_elapsed"}

    fresh = rt.build_superres(image_sizes=(32, 128), seed=5)
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in ckpt["model"].items()}, strict=True)
    emas = rt.ema_modules(fresh)
    emas.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in ckpt["ema"].items()}, strict=True)
    x, low, text, mask = _inputs(64, seed=5)
    t, lowres_t = np.array([0.5, 0.2], np.float32), np.array([0.1, 0.1], np.float32)
    want, log_snr, low_snr = _reference_forward(fresh, emas[1].ema_model.eval(), x, low, text, mask, t, lowres_t)
    got = _ours_forward(model, x, low, text, mask, log_snr, low_snr)
    err = float(np.abs(got - want).max())
    print(f"\nexport -> GenerateCT strict load (ema_model) 64x64: max abs error {err:.2e}")
    assert err <= TOL
