"""The two real CT volumes (TotalSegmentator test files, see tests/data/real_ct/ATTRIBUTION.md)."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from ctgen.data.features import DatasetConfig
from ctgen.data.preprocess import GridConfig, preprocess
from ctgen.data.side import open_split
from ctgen.data.sources import NiftiCsvSource
from ctgen.data.writer import build
from ctgen.io.nifti import read_nifti, write_nifti
from ctgen.volume import to_canonical


@pytest.fixture
def real(data_dir):
    return {n: os.path.join(data_dir, "real_ct", n) for n in ("example_ct.nii.gz", "example_ct_sm.nii.gz")}


def test_read_hu_spacing_orientation(real):
    v = read_nifti(real["example_ct.nii.gz"])
    assert v.data_ijk.shape == (122, 101, 112)
    assert -1300 < v.data_ijk.min() < -1000 and 3000 < v.data_ijk.max() < 3500
    np.testing.assert_allclose(v.spacing_ijk, [3, 3, 3])
    vol, spacing, orient = to_canonical(v.data_ijk, v.affine)
    assert orient == "RAS" and vol.shape == (112, 101, 122)
    np.testing.assert_allclose(spacing, [3, 3, 3])
    D, H, W = vol.shape
    # Anatomy in the canonical layout: spine posterior (high H), liver on the patient's right (low W)
    # in the most superior slices (high D).
    upper = vol[D // 2:]
    _, jj, ii = np.nonzero(upper > 250)
    assert jj.mean() > 0.55 * H and abs(ii.mean() - W / 2) < 0.1 * W
    top = vol[-15:]
    liver_like = (top > 30) & (top < 90)
    assert liver_like[:, :, : W // 2].sum() > 1.3 * liver_like[:, :, W // 2:].sum()
    sm = read_nifti(real["example_ct_sm.nii.gz"])
    assert sm.data_ijk.shape == (122, 101, 30)


def _prepare(rows, tmp_path, grid, name):
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text", "age", "sex"])
        w.writerows(rows)
    src = NiftiCsvSource(str(tmp_path / "list.csv"))
    cfg = DatasetConfig(name=name, grid=grid)
    return build(src, cfg, str(tmp_path / "out"), validation_fraction=0.0, progress=False, log=lambda s: None)


def _rows(real):
    return [[real["example_ct.nii.gz"], "No acute abdominal findings.", "064Y", "M"],
            [real["example_ct_sm.nii.gz"], "Abdomen without pathology (partial).", "", "F"]]


def test_prepare_without_resampling_is_lossless_in_hu(real, tmp_path):
    grid = GridConfig(shape=(30, 101, 122), odd_slices=False)
    summary = _prepare(_rows(real)[1:], tmp_path, grid, "native")
    ex = open_split(summary["path"], "train")[0]
    v = read_nifti(real["example_ct_sm.nii.gz"])
    want, _, _ = to_canonical(np.clip(v.data_ijk, -1000, 1000), v.affine)
    np.testing.assert_array_equal(ex["volume"], np.rint(want).astype(np.int16))
    np.testing.assert_allclose(ex["spacing"], [3, 3, 3])
    assert ex["orientation"] == b"RAS"


def _pil_paper_resize(hu_DxHxW, shape):
    """docs/data.md's paper resampling done independently with PIL's bilinear resize (anti-aliased
    when shrinking, as GenerateCT resizes slices): each axial slice to (H, W), then the slice axis
    as the height of (D, H) images."""
    D, H, W = shape
    axial = np.stack([np.asarray(Image.fromarray(s).resize((W, H), Image.BILINEAR)) for s in hu_DxHxW])
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(axial[:, :, w])).resize((H, D), Image.BILINEAR))
                     for w in range(W)], axis=2)


def test_prepare_paper_grid_matches_documented_resampling(real, tmp_path):
    grid = GridConfig(shape=(33, 64, 64))
    summary = _prepare(_rows(real), tmp_path, grid, "paper")
    assert summary["counts"]["train"] == 2 and summary["counts"]["skipped"] == 0
    src = open_split(summary["path"], "train")
    got = {bytes(src[i]["source_id"]).decode(): src[i] for i in range(len(src))}
    ex = got["example_ct"]
    v = read_nifti(real["example_ct.nii.gz"])
    want = preprocess(v.data_ijk, v.affine, grid, name="x")
    np.testing.assert_array_equal(ex["volume"], want["volume"])  # the writer stores what preprocess gives
    # Independent of preprocess: the file is RAS, so canonical (D, H, W) = (S, P, L) is the (k, j, i)
    # transpose with i and j flipped; clip, resize as documented, round.
    hu = np.clip(v.data_ijk, -1000, 1000).astype(np.float32)[::-1, ::-1, :].transpose(2, 1, 0)
    ref = np.rint(_pil_paper_resize(np.ascontiguousarray(hu), grid.shape)).astype(np.int16)
    diff = np.abs(ex["volume"].astype(np.int32) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding only
    np.testing.assert_allclose(ex["spacing"], [3 * 112 / 33, 3 * 101 / 64, 3 * 122 / 64], rtol=1e-5)
    np.testing.assert_array_equal(ex["original_shape"], [112, 101, 122])
    assert ex["volume"].min() == -1000 and ex["volume"].max() <= 1000
    assert ex["prompt"] == b"64 years old male: No acute abdominal findings."
    assert np.isnan(got["example_ct_sm"]["age"]) and got["example_ct_sm"]["sex"] == b"F"
    assert got["example_ct_sm"]["prompt"].startswith(b"female: Abdomen without pathology partial")  # age unknown


def test_write_nifti_round_trip(tmp_path, real):
    v = read_nifti(real["example_ct_sm.nii.gz"])
    vol, spacing, _ = to_canonical(v.data_ijk, v.affine)
    write_nifti(str(tmp_path / "x.nii.gz"), vol.astype(np.int16), spacing)
    back = read_nifti(str(tmp_path / "x.nii.gz"))
    vol2, spacing2, orient = to_canonical(back.data_ijk, back.affine)
    assert orient == "LPS"
    np.testing.assert_array_equal(vol2, vol)
    np.testing.assert_allclose(spacing2, spacing)
