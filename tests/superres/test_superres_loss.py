"""The SR loss's low-res noise augmentation: the level is drawn from [0, diffusion.lowres_aug_max]
(GenerateCT: the whole [0, 1]), and a level outside (0, 1] is refused with the key's name."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctgen.configuration import load
from ctgen.errors import UserError
from ctgen.sampling import diffusion as df
from ctgen.stages import get_stage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "superres.py")


def _stage(**over):
    over = {"data.dir": "unused", **over}
    return get_stage(load(f"{CONFIG}:tiny", [(k, str(v)) for k, v in over.items()]))


def _aug_levels(stage, seeds=range(40)):
    """The augmentation log-SNR the network is given, over one loss call per seed."""
    seen = []

    def spy(x_t, log_snr, low_noisy, aug_log_snr, text, mask, keep):
        seen.append(float(aug_log_snr[0]))
        assert np.all(np.asarray(aug_log_snr) == float(aug_log_snr[0]))  # one level per batch
        return jnp.zeros_like(x_t)

    rng = np.random.default_rng(0)
    batch = {"hires": rng.uniform(size=(2, 32, 32)).astype(np.float32),
             "lowres": rng.uniform(size=(2, 8, 8)).astype(np.float32)}
    for s in seeds:
        stage.loss(spy, batch, jax.random.key(s))
    return np.array(seen)


def test_lowres_augmentation_level_is_bounded_by_lowres_aug_max():
    bound = float(df.linear_log_snr(0.2))  # log-SNR falls as the level rises
    capped = _aug_levels(_stage(**{"diffusion.lowres_aug_max": 0.2}))
    assert capped.min() >= bound - 1e-5, (capped.min(), bound)
    full = _aug_levels(_stage())  # GenerateCT's [0, 1]: most levels are above 0.2
    assert np.mean(full < bound) > 0.5, full


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_lowres_aug_max_outside_0_1_is_refused(bad):
    with pytest.raises(UserError, match="diffusion.lowres_aug_max"):
        _stage(**{"diffusion.lowres_aug_max": bad})


def test_phantom_preset_caps_the_augmentation():
    cfg = load(f"{CONFIG}:phantom", [])
    assert cfg.diffusion.lowres_aug_max == 0.2
    assert load(f"{CONFIG}:paper", []).diffusion.lowres_aug_max == 1.0


def _v_targets(stage, batch, seed=0):
    """(x0 the loss used, v target) of one loss call, recovered from the noised input the network sees."""
    seen = {}

    def spy(x_t, log_snr, low_noisy, aug_log_snr, text, mask, keep):
        seen["x_t"], seen["log_snr"] = x_t, log_snr
        return jnp.zeros_like(x_t)

    loss, aux = stage.loss(spy, batch, jax.random.key(seed))
    return seen, float(aux["mse"])


@pytest.mark.parametrize("residual", [False, True])
def test_the_diffusion_target_is_the_slice_or_its_residual_over_bicubic(residual):
    """With a network that predicts v = 0 the per-sample MSE is mean(v^2) and v = alpha eps - sigma x0;
    recover x0 from x_t and that MSE through the same key's noise, and compare with the definition."""
    from ctgen.sampling.superres import bicubic_upsample

    stage = _stage(**{"model.residual": residual})
    rng = np.random.default_rng(3)
    hires = rng.uniform(size=(2, 32, 32)).astype(np.float32)
    lowres = hires.reshape(2, 8, 4, 8, 4).mean(axis=(2, 4))
    batch = {"hires": hires, "lowres": lowres}
    seen, _ = _v_targets(stage, batch)
    base = np.asarray(bicubic_upsample(jnp.asarray(lowres), (32, 32)))
    want = (hires - base) if residual else hires * 2 - 1
    # x_t = alpha x0 + sigma eps with the loss's own eps: rebuild eps from the key split the loss uses
    k_crop, k_t, k_noise, *_ = jax.random.split(jax.random.key(0), 6)
    noise = np.asarray(jax.random.normal(k_noise, (2, 32, 32, 1)))
    alpha, sigma = (np.asarray(a).reshape(-1, 1, 1, 1) for a in df.alpha_sigma(seen["log_snr"]))
    x0 = (np.asarray(seen["x_t"]) - sigma * noise) / alpha
    np.testing.assert_allclose(x0[..., 0], want, atol=2e-4)
    if residual:  # the residual is small where bicubic is right: far from the slice itself
        assert np.abs(want).mean() < 0.5 * np.abs(hires * 2 - 1).mean()


def test_phantom_preset_generates_the_residual_and_paper_the_slice():
    assert load(f"{CONFIG}:phantom", []).model.residual is True
    assert load(f"{CONFIG}:paper", []).model.residual is False


def _soft_tissue_case(weight, where, lowres_all_soft=False):
    """One loss call of a network that predicts the true v plus 0.5 on the pixels `where` picks
    ("soft": inside -200..200 HU, "air": the others; 4 x 4 blocks, so the 8 x 8 low-res input shows
    the same pattern). lowres_all_soft: a low-res input of soft tissue everywhere instead.
    Returns (loss, metrics, p2 weights, soft-tissue pixels)."""
    stage = _stage(**{"diffusion.soft_tissue_weight": weight, "model.residual": False})
    rng = np.random.default_rng(5)
    blocks = np.repeat(np.repeat(rng.uniform(size=(2, 8, 8)) < 0.4, 4, axis=1), 4, axis=2)
    hu = np.where(blocks, rng.uniform(-150, 150, (2, 32, 32)), rng.uniform(-1000, -400, (2, 32, 32)))
    hires = ((hu + 1000.0) / 2000.0).astype(np.float32)
    soft = blocks[..., None]
    x0 = jnp.asarray(hires * 2 - 1)[..., None]
    seen = {}

    def spy(x_t, log_snr, low_noisy, aug_log_snr, text, mask, keep):
        alpha, sigma = (a.reshape(-1, 1, 1, 1) for a in df.alpha_sigma(log_snr))
        seen["log_snr"] = log_snr
        v = (alpha * x_t - x0) / sigma
        return v + 0.5 * jnp.asarray(soft if where == "soft" else ~soft, jnp.float32)

    lowres = np.full((2, 8, 8), 0.52, np.float32) if lowres_all_soft else hires.reshape(2, 8, 4, 8, 4).mean(axis=(2, 4))
    loss, aux = stage.loss(spy, {"hires": hires, "lowres": lowres}, jax.random.key(1))
    p2 = np.asarray(df.p2_weight(seen["log_snr"], 0.5, 1.0))
    return float(loss), {k: float(v) for k, v in aux.items()}, p2, soft


def test_soft_tissue_term_prices_only_soft_tissue_pixels():
    base, aux0, p2, soft = _soft_tissue_case(0.0, "air")
    assert "soft_tissue_mse" not in aux0  # off: GenerateCT's loss, no extra metric
    loss, aux, _, _ = _soft_tissue_case(5.0, "air")
    assert aux["soft_tissue_mse"] < 1e-8  # errors outside the band cost nothing extra
    np.testing.assert_allclose(loss, base, rtol=1e-5)
    # errors inside the band: the term is their mean square (0.25), weighted by p2 and the weight
    base, aux0, p2, soft = _soft_tissue_case(0.0, "soft")
    loss, aux, _, _ = _soft_tissue_case(5.0, "soft")
    np.testing.assert_allclose(aux["soft_tissue_mse"], 0.25, rtol=1e-4)
    np.testing.assert_allclose(aux0["mse"], 0.25 * soft.mean(), rtol=1e-3)
    np.testing.assert_allclose(loss - base, 5.0 * np.mean(0.25 * p2), rtol=1e-3)


def test_soft_tissue_pixels_are_read_from_the_low_res_input_not_the_target():
    """The weight must not depend on the target (it would bias the minimiser): with a low-res input
    of soft tissue everywhere, every pixel is priced, whatever the high-res slice holds."""
    _, aux, _, soft = _soft_tissue_case(5.0, "air", lowres_all_soft=True)
    np.testing.assert_allclose(aux["soft_tissue_mse"], 0.25 * (~soft).mean(), rtol=1e-3)
    np.testing.assert_allclose(aux["soft_tissue_mse"], aux["mse"], rtol=1e-5)


@pytest.mark.parametrize("over", [{"diffusion.soft_tissue_weight": -1.0},
                                  {"diffusion.soft_tissue_hu": "(200.0, -200.0)"}])
def test_bad_soft_tissue_settings_are_refused(over):
    with pytest.raises(UserError, match="diffusion.soft_tissue"):
        _stage(**over)
