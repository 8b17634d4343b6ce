import json

import numpy as np
import pytest

from ctgen.data.anatomy import LABELS, LOBES, measure
from ctgen.data.phantom import make_phantom

SHAPE = (65, 64, 64)
SPACING = (301.5 / 65, 350 / 64, 350 / 64)
NONE = dict(cardiomegaly=False, effusion={"right_ml": 0.0, "left_ml": 0.0}, nodules=[],
            emphysema={"severity": "none", "bullae": 0}, opacities=[], aortic_calcification=False)


def phantom(seed, **kw):
    return make_phantom(seed, SHAPE, SPACING, **{**NONE, **kw})


def test_same_seed_same_study_and_json_attributes():
    a, b = make_phantom(7, SHAPE, SPACING), make_phantom(7, SHAPE, SPACING)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.report == b.report and a.attributes_json() == b.attributes_json()
    assert json.loads(a.attributes_json())["seed"] == 7
    c = make_phantom(8, SHAPE, SPACING)
    assert not np.array_equal(a.hu, c.hu)
    assert a.hu.dtype == np.int16 and a.labels.dtype == np.uint8 and a.hu.shape == SHAPE


def test_anatomy_is_present_with_realistic_hu():
    p = phantom(3, cardiothoracic_ratio=0.46)
    hu, lab = p.hu.astype(np.float32), p.labels
    for name in ("body", "lung_right", "lung_left", "heart", "airway", "aorta", "vessels", "bone"):
        assert (lab == LABELS[name]).sum() > 20, name
    assert -900 < hu[lab == LABELS["lung_right"]].mean() < -700
    assert 25 < np.median(hu[lab == LABELS["heart"]]) < 60
    assert np.median(hu[lab == LABELS["bone"]]) > 150
    assert np.median(hu[lab == LABELS["background"]]) < -950
    assert np.median(hu[lab == LABELS["airway"]]) < -500
    # Canonical layout: right lung at low W, left lung at high W; spine posterior (high H).
    _, _, ii_r = np.nonzero(lab == LABELS["lung_right"])
    _, _, ii_l = np.nonzero(lab == LABELS["lung_left"])
    assert ii_r.mean() < SHAPE[2] / 2 < ii_l.mean()
    _, jj_heart, ii_heart = np.nonzero(lab == LABELS["heart"])
    assert jj_heart.mean() < SHAPE[1] / 2 and ii_heart.mean() > SHAPE[2] / 2  # anterior, leftward
    assert p.attributes["normal"] and ("No significant pathology" in p.report["impression"]
                                       or "within normal limits" in p.report["impression"])


def test_cardiothoracic_ratio_rises_with_cardiomegaly():
    normal = [phantom(s, cardiothoracic_ratio=0.45).attributes["measured"]["cardiothoracic_ratio"] for s in (1, 2)]
    big = [phantom(s, cardiomegaly=True, cardiothoracic_ratio=0.65) for s in (1, 2)]
    for n, b in zip(normal, big):
        m = b.attributes["measured"]["cardiothoracic_ratio"]
        assert 0.38 < n < 0.52 and m > 0.55 and m > n + 0.1
        assert "Cardiomegaly" in b.report["impression"] and ("enlarged" in b.report["findings"]
                                                             or "increased" in b.report["findings"])


def test_effusion_volume_matches_attribute():
    p = phantom(4, effusion={"right_ml": 600.0, "left_ml": 150.0})
    m = p.attributes["measured"]
    voxel_ml = np.prod(SPACING) / 1000
    assert abs(m["effusion_right_ml"] - 600) <= voxel_ml + 0.1
    assert abs(m["effusion_left_ml"] - 150) <= voxel_ml + 0.1
    assert abs(p.attributes["effusion"]["right_ml"] - m["effusion_right_ml"]) < 0.2
    fluid = p.hu[p.labels == LABELS["effusion"]].astype(np.float32)
    assert -10 < np.median(fluid) < 35
    # dependent: the fluid sits posterior to the lungs' centre
    _, jj, _ = np.nonzero(p.labels == LABELS["effusion"])
    _, jl, _ = np.nonzero(np.isin(p.labels, (LABELS["lung_right"], LABELS["lung_left"])))
    assert jj.mean() > jl.mean()
    assert "Bilateral pleural effusion, more on the right" in p.report["impression"]


def test_emphysema_lowers_lung_density():
    base = phantom(5).attributes["measured"]
    emph = phantom(5, emphysema={"severity": "severe", "bullae": 1})
    m = emph.attributes["measured"]
    assert m["mean_lung_hu"] < base["mean_lung_hu"] - 25
    assert base["laa950_percent"] < 5 < 15 < m["laa950_percent"]
    assert "Emphysema" in emph.report["impression"] and "Severe" in emph.report["findings"]


def test_nodules_and_opacities_follow_attributes():
    nods = [{"lobe": "right lower lobe", "diameter_mm": 16.0}, {"lobe": "left upper lobe", "diameter_mm": 12.0}]
    p = phantom(6, nodules=nods, opacities=[{"kind": "consolidation", "lobe": "left lower lobe", "fraction": 0.4}])
    assert all(n["placed"] for n in p.attributes["nodules"])
    assert p.attributes["measured"]["nodule_count"] == 2
    assert p.attributes["opacities"][0]["volume_ml"] > 10
    for n in p.attributes["nodules"]:
        z, y, x = n["center_mm"]
        assert (x < 0) == n["lobe"].startswith("right")  # x < 0 is the patient's right
    assert "Multiple pulmonary nodules, the largest in the right lower lobe" in p.report["impression"]
    assert "Consolidation in the left lower lobe" in p.report["impression"]
    base = phantom(6)
    lung = np.isin(p.labels, (LABELS["lung_left"],))
    assert p.hu[lung].astype(np.float32).mean() > base.hu[np.isin(base.labels, (LABELS["lung_left"],))].mean() + 50


def test_sampled_reports_agree_with_attributes():
    for seed in range(12):
        p = make_phantom(seed, (33, 32, 32), (9.0, 11.0, 11.0))
        a, imp = p.attributes, p.report["impression"]
        assert ("Cardiomegaly" in imp) == a["cardiomegaly"]
        assert ("pleural effusion" in imp) == (a["effusion"]["right_ml"] > 0 or a["effusion"]["left_ml"] > 0)
        assert ("Emphysema" in imp) == (a["emphysema"]["severity"] != "none")
        assert ("nodule" in imp) == bool(a["nodules"])
        for n in a["nodules"]:
            assert n["lobe"] in p.report["findings"] and n["lobe"] in LOBES
        assert a["normal"] == (imp in ("No significant pathology.", "The overall examination is within normal limits."))
        prompt = p.prompt()
        assert prompt.startswith(f"{a['age']} years old {'male' if a['sex'] == 'M' else 'female'}: ")


def test_measure_on_handmade_labels():
    lab = np.zeros((3, 10, 20), np.uint8)
    lab[1, 2:8, 2:18] = LABELS["lung_right"]
    lab[1, 3:6, 6:12] = LABELS["heart"]
    m = measure(lab, np.full(lab.shape, -900, np.int16), (1, 1, 1))
    assert m["cardiothoracic_ratio"] == pytest.approx(6 / 16)
    assert m["laa950_percent"] == 0 and m["mean_lung_hu"] == -900


def test_supersampled_source_is_the_fine_render_resized_as_sr_inputs_are():
    """`PhantomSource(supersample=K)` at H x W is the K*H x K*W phantom of the same seed resized down the
    way SR pairs and the SR evaluation make their low-res inputs (clip, antialiased resize), so a
    CT-ViT trained on it sees what the cascade later feeds it; labels are the fine labels at the
    coarse voxel centres, the truth is the fine render's."""
    from ctgen.data.preprocess import GridConfig, resize_volume
    from ctgen.data.sources import PhantomSource
    from ctgen.volume import clip_hu, extent_spacing, to_int16_hu

    coarse = PhantomSource(2, 5, GridConfig(shape=(17, 16, 16)), supersample=4)
    fine = PhantomSource(2, 5, GridConfig(shape=(17, 64, 64)))
    native = PhantomSource(2, 5, GridConfig(shape=(17, 16, 16)))
    recs, _ = coarse.scan()
    for rec in recs:
        c, f, n = coarse.load(rec), fine.load(rec), native.load(rec)
        want = to_int16_hu(resize_volume(clip_hu(f["volume_DxHxW"].astype(np.float32)), (17, 16, 16)))
        np.testing.assert_array_equal(c["volume_DxHxW"], want)
        np.testing.assert_array_equal(c["labels"], f["labels"][:, 2::4, 2::4])
        np.testing.assert_allclose(c["spacing"], extent_spacing((17, 16, 16)), rtol=1e-6)
        assert c["attributes"]["measured"] == f["attributes"]["measured"] and c["report"] == f["report"]
        assert c["attributes"]["shape"] == [17, 16, 16] and c["attributes"]["supersample"] == 4
        assert not np.array_equal(c["volume_DxHxW"], n["volume_DxHxW"])  # not the point-sampled render
    assert "supersample" not in native.fingerprint() and coarse.fingerprint()["supersample"] == 4
    with pytest.raises(ValueError, match="supersample"):
        PhantomSource(2, 5, GridConfig(shape=(17, 16, 16)), supersample=0)
