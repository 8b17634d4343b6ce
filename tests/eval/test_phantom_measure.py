"""Label-free phantom measurements against the phantoms' own labels and attributes."""
import math

import numpy as np
import pytest

from ctgen.eval import phantom_measure
from ctgen.eval.phantom_measure import measure_volume
from ctgen.eval.phantom_validate import TOLERANCES, compare, phantom_truth


def _assert_within_tolerances(ph, measured):
    result = compare(measured, phantom_truth(ph.attributes, ph.spacing))
    bad = {k: (c["truth"], c["measured"]) for k, c in result.items() if c["ok"] is False}
    assert not bad, f"seed {ph.attributes['seed']} ({ph.prompt()}): outside {TOLERANCES}: {bad}"
    return result


def test_demo_grid_studies_within_tolerances(measured_studies):
    judged = {k: 0 for k in TOLERANCES}
    for ph, measured in measured_studies:
        for key, c in _assert_within_tolerances(ph, measured).items():
            judged[key] += c["ok"] is not None
    # every tolerance was exercised, effusion volumes on both sides included
    assert all(n >= 2 for n in judged.values()), judged


def test_findings_are_told_apart(measured_studies):
    by_seed = {ph.attributes["seed"]: m for ph, m in measured_studies}
    assert by_seed[1]["cardiothoracic_ratio"] > 0.55 > by_seed[6]["cardiothoracic_ratio"]
    assert [by_seed[s]["effusion_side"] for s in (2, 3, 4, 6)] == ["right", "left", "both", "none"]
    assert by_seed[3]["nodule_count"] == 1 and by_seed[6]["nodule_count"] == 0
    assert by_seed[5]["laa950_percent"] > 15 > by_seed[6]["laa950_percent"]


@pytest.mark.parametrize("shape", [(17, 64, 64), (201, 128, 128)], ids=["17x64x64", "paper-201x128x128"])
def test_other_grids_within_tolerances(shape, make_study):
    spacing = (301.5 / shape[0], 350.0 / shape[1], 350.0 / shape[2])
    ph = make_study(7, dict(cardiomegaly=True, cardiothoracic_ratio=0.62,
                            effusion={"right_ml": 500.0, "left_ml": 0.0}), shape, spacing)
    measured = measure_volume(ph.hu, ph.spacing)
    _assert_within_tolerances(ph, measured)
    assert measured["effusion_side"] == "right" and measured["cardiothoracic_ratio"] > 0.55


def test_no_thorax_gives_nan_with_reasons():
    air = np.full((9, 32, 32), -1000.0, np.float32)
    out = measure_volume(air, (5.0, 5.0, 5.0))
    assert math.isnan(out["cardiothoracic_ratio"]) and math.isnan(out["lung_volume_ml"])
    assert out["effusion_side"] is None and "no body" in out["reasons"]["lung_volume_ml"]
    water = np.full((9, 32, 32), -1000.0, np.float32)
    water[:, 4:28, 4:28] = 0.0
    out = measure_volume(water, (5.0, 5.0, 5.0))
    assert "no air-density region" in out["reasons"]["laa950_percent"]
    assert math.isnan(out["nodule_count"])


def test_lungs_without_heart():
    """Fat body with two air-filled lungs: lungs are measured, the CTR is NaN with a reason."""
    d, h, w = 15, 48, 48
    zz, yy, xx = np.mgrid[:d, :h, :w]
    vol = np.full((d, h, w), -1000.0, np.float32)
    vol[((yy - 24) / 20) ** 2 + ((xx - 24) / 22) ** 2 < 1] = -100.0
    for cx in (14, 34):
        vol[(zz > 1) & (zz < 13) & (((yy - 24) / 14) ** 2 + ((xx - cx) / 8) ** 2 < 1)] = -850.0
    out = measure_volume(vol, (10.0, 5.0, 5.0))
    assert math.isnan(out["cardiothoracic_ratio"]) and "between the lungs" in out["reasons"]["cardiothoracic_ratio"]
    assert out["lung_volume_ml"] > 500 and out["effusion_side"] == "none" and out["nodule_count"] == 0
    assert set(out["reasons"]) == {"cardiothoracic_ratio"}


def test_rejects_non_volumes():
    with pytest.raises(ValueError, match="3-D volume"):
        measure_volume(np.zeros((4, 4)), (1.0, 1.0, 1.0))


def test_validate_entry_point(capsys, tmp_path):
    out = tmp_path / "v.json"
    assert phantom_measure.main(["--validate", "2", "--shape", "17,64,64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 phantoms on 17x64x64" in text and "| cardiothoracic_ratio | +-0.05 |" in text
    assert out.exists()


def test_validate_through_a_ctvit(capsys, tmp_path):
    """--tokenizer: each phantom is measured as the CT-ViT reconstructs it, on the CT-ViT's grid,
    against the phantom's own truth."""
    from flax import nnx

    from ctgen.convert.ctvit_store import save_ctvit_dir
    from ctgen.data.preprocess import resize_volume
    from ctgen.eval.phantom_validate import ctvit_transform
    from ctgen.models.ctvit import CTViT, CTViTConfig
    from ctgen.volume import clip_hu, hu_to_model, model_to_hu

    cfg = CTViTConfig.tiny(max_slices=5)
    ctvit = CTViT(cfg, rngs=nnx.Rngs(0))
    save_ctvit_dir(str(tmp_path / "ctvit"), cfg, nnx.state(ctvit))
    transform = ctvit_transform(str(tmp_path / "ctvit"))
    hu = np.random.default_rng(0).uniform(-1000, 100, (5, 64, 64)).astype(np.float32)
    rec, spacing = transform(hu, np.array([10.0, 2.0, 3.0]))
    want = model_to_hu(np.asarray(ctvit.reconstruct(hu_to_model(resize_volume(clip_hu(hu), (5, 32, 32)))[None]))[0])
    assert rec.shape == (5, 32, 32)
    np.testing.assert_allclose(rec, want, atol=1e-3)
    np.testing.assert_allclose(spacing, [10.0, 4.0, 6.0])

    assert phantom_measure.main(["--validate", "2", "--shape", "5,64,64", "--tokenizer", str(tmp_path / "ctvit")]) == 0
    text = capsys.readouterr().out
    assert "2 phantoms on 5x64x64 (seed 0), reconstructed by the CT-ViT" in text
    assert "| effusion_side | exact |" in text


def test_validate_through_ctvit_and_superres(capsys, tmp_path):
    """--superres: the reconstruction is super-resolved back to the phantom's grid, conditioned on the
    phantom's stored prompt, and measured there; --superres alone is refused."""
    from flax import nnx

    from ctgen.convert.ctvit_store import save_ctvit_dir
    from ctgen.convert.superres_store import save_superres_dir
    from ctgen.data.sources import PhantomSource
    from ctgen.data.preprocess import GridConfig
    from ctgen.eval.phantom_validate import phantom_prompt
    from ctgen.models.ctvit import CTViT, CTViTConfig
    from ctgen.models.unet import UNet, UNetConfig

    cfg = CTViTConfig.tiny(max_slices=5)
    save_ctvit_dir(str(tmp_path / "ctvit"), cfg, nnx.state(CTViT(cfg, rngs=nnx.Rngs(0))))
    unet_cfg = UNetConfig.tiny()
    save_superres_dir(str(tmp_path / "sr"), unet_cfg, nnx.state(UNet(unet_cfg, rngs=nnx.Rngs(0)), nnx.Param))

    src = PhantomSource(1, 0, GridConfig(shape=(5, 64, 64)))
    ph = src.load(src.scan()[0][0])
    assert phantom_prompt(ph).startswith(f"{ph['age']} years old ") and ph["report"]["impression"] in phantom_prompt(ph)

    out = tmp_path / "v.json"
    assert phantom_measure.main(["--validate", "1", "--shape", "5,64,64", "--tokenizer", str(tmp_path / "ctvit"),
                                 "--superres", str(tmp_path / "sr"), "--sr-sampler", "ddim", "--sr-steps", "2",
                                 "--sr-cond-scale", "2", "--sr-average", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(ddim 2 steps, guidance 2, mean of 2 samples)" in text
    assert "super-resolved by" in text and "HU error of the handed-back volume" in text  # same grid: tissue errors
    import json

    record = json.load(open(out))
    assert record["sr_sampler"]["steps"] == 2 and record["sr_sampler"]["cond_scale"] == 2.0
    assert record["sr_sampler"]["average"] == 2
    assert record["superres"] == str(tmp_path / "sr")
    assert record["tissue"]["body"]["voxels"] > 0
    with pytest.raises(SystemExit):
        phantom_measure.main(["--validate", "1", "--superres", str(tmp_path / "sr")])


def test_validate_through_ctvit_and_bicubic(capsys, tmp_path):
    """--superres bicubic: the reconstruction upsampled bicubically to the phantom's grid (the SR's
    baseline), measured there."""
    import jax.numpy as jnp
    from flax import nnx

    from ctgen.convert.ctvit_store import save_ctvit_dir
    from ctgen.eval.phantom_validate import bicubic_transform, ctvit_transform
    from ctgen.models.ctvit import CTViT, CTViTConfig
    from ctgen.sampling.superres import bicubic_upsample
    from ctgen.volume import hu_to_sr, sr_to_hu

    cfg = CTViTConfig.tiny(max_slices=5)
    save_ctvit_dir(str(tmp_path / "ctvit"), cfg, nnx.state(CTViT(cfg, rngs=nnx.Rngs(0))))
    hu = np.random.default_rng(1).uniform(-1000, 100, (5, 64, 64)).astype(np.float32)
    spacing = np.array([10.0, 2.0, 3.0])
    low, _ = ctvit_transform(str(tmp_path / "ctvit"))(hu, spacing)
    up, sp = bicubic_transform(str(tmp_path / "ctvit"))(hu, spacing)
    assert up.shape == (5, 64, 64)
    np.testing.assert_allclose(sp, spacing)  # back on the phantom's grid
    want = sr_to_hu(np.asarray(bicubic_upsample(jnp.asarray(hu_to_sr(low)), (64, 64))))
    np.testing.assert_allclose(up, want, atol=1e-3)
    # not the nearest-neighbour copy of the reconstruction: bicubic interpolates between its pixels
    assert np.abs(up - np.repeat(np.repeat(low, 2, axis=1), 2, axis=2)).max() > 1.0

    assert phantom_measure.main(["--validate", "1", "--shape", "5,64,64", "--tokenizer", str(tmp_path / "ctvit"),
                                 "--superres", "bicubic"]) == 0
    text = capsys.readouterr().out
    assert "upsampled bicubically" in text and "HU error of the handed-back volume" in text


def test_validate_reports_tissue_errors_of_a_transform():
    """A transform that adds 10 HU everywhere: every label's interior reads bias 10, sd 0 (voxels
    clipped at 1000 HU aside), and the measurements see the shifted volume."""
    from ctgen.eval.phantom_validate import summarize_tissue, tissue_table, validate

    rows = validate(2, (5, 64, 64), transform=lambda hu, sp, ph: (np.asarray(hu, np.float32) + 10.0, sp))
    tissue = summarize_tissue(rows)
    assert {"heart", "lung_right", "lung_left", "body"} <= set(tissue)
    for name in ("heart", "aorta", "effusion"):  # soft tissue: nowhere near the clipping
        if name in tissue:
            assert tissue[name]["voxels"] > 0
            assert tissue[name]["bias_hu"] == pytest.approx(10.0, abs=1e-6) and tissue[name]["sd_hu"] < 1e-3
    assert tissue["lung_right"]["bias_hu"] == pytest.approx(10.0, abs=0.1)  # a few voxels below -1000 HU
    assert "| heart |" in tissue_table(tissue)
    assert "tissue" not in validate(1, (5, 64, 64))[0]  # no transform, no tissue errors
