"""A small CT-RATE-layout fixture with awkward rows, prepared end to end."""
import csv
import gzip
import json
import os

import numpy as np
import pytest

from dl_helpers import write_nifti_raw
from ctgen.data.command import main as prepare_main
from ctgen.data.ctrate import CtRateSource
from ctgen.data.features import DatasetConfig
from ctgen.data.preprocess import GridConfig
from ctgen.data.side import open_split
from ctgen.data.writer import PrepareError, build

GRID = GridConfig(shape=(15, 16, 16))
REPORT_COLS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
META_COLS = ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing", "PatientAge", "PatientSex"]


def vol_path(root, name):
    split, patient, scan, _ = name.split("_")
    return os.path.join(root, "dataset", f"{split}_fixed", f"{split}_{patient}", f"{split}_{patient}_{scan}",
                        f"{name}.nii.gz")


@pytest.fixture
def ctrate_root(tmp_path, body_hu):
    root = str(tmp_path / "CT-RATE")
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    raw = (body_hu + 1024).astype(np.int16)  # stored values, no header scaling
    write_nifti_raw(vol_path(root, "train_1_a_1"), raw, aff)
    write_nifti_raw(vol_path(root, "train_1_a_2"), raw, aff, slope=1.0, inter=-1024.0)
    write_nifti_raw(vol_path(root, "train_2_a_1"), body_hu.astype(np.int16), np.eye(4), zooms=(1, 1, 1), geometry=False)
    write_nifti_raw(vol_path(root, "train_3_a_1"), body_hu.astype(np.int16), aff)
    good = write_nifti_raw(vol_path(root, "train_4_a_1"), body_hu.astype(np.int16), aff)
    data = open(good, "rb").read()
    with open(good, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated .nii.gz
    write_nifti_raw(vol_path(root, "train_5_a_1"), body_hu[:, :, :1].astype(np.int16), aff)  # a 2-D image
    nan = body_hu.copy()
    nan[3, 3, 3] = np.nan
    write_nifti_raw(vol_path(root, "train_6_a_1"), nan, aff)
    write_nifti_raw(vol_path(root, "train_7_a_1"), body_hu.astype(np.int16), aff)  # no report
    write_nifti_raw(vol_path(root, "train_9_a_1"), body_hu.astype(np.int16), aff)  # conflicting duplicate rows
    write_nifti_raw(vol_path(root, "valid_1_a_1"), body_hu.astype(np.int16), aff)
    write_nifti_raw(os.path.join(root, "dataset", "train_fixed", "odd", "scan_x.nii.gz"), body_hu.astype(np.int16), aff)
    os.makedirs(os.path.join(root, "dataset", "radiology_text_reports"))
    os.makedirs(os.path.join(root, "dataset", "metadata"))

    def rep(name, imp, findings="Trachea and both main bronchi are open."):
        return [name, "Cough.", "Non-contrast chest CT.", findings, imp]

    reports = [rep("train_1_a_1", "Cardiomegaly."), rep("train_1_a_2", "Cardiomegaly."),
               rep("train_2_a_1", "Ground-glass opacity (right).", "Caf\u00e9 \u201cquoted\u201d finding \u00e7a."),
               rep("train_3_a_1", "x"), rep("train_4_a_1", "x"), rep("train_5_a_1", "x"), rep("train_6_a_1", "x"),
               rep("train_8_a_1", "no volume for this row"), rep("train_9_a_1", "first"), rep("train_9_a_1", "second"),
               rep("train_1_a_1", "Cardiomegaly.")]
    with open(os.path.join(root, "dataset", "radiology_text_reports", "train_reports.csv"), "w", newline="",
              encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(REPORT_COLS)
        w.writerows(reports)
    with open(os.path.join(root, "dataset", "radiology_text_reports", "validation_reports.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(REPORT_COLS)
        w.writerow(rep("valid_1_a_1", "No significant pathology."))
    meta = [["train_1_a_1", "1", "-1024", "[2.0, 2.0]", "3.0", "064Y", "M"],
            ["train_1_a_2", "1", "-1024", "[2.0, 2.0]", "3.0", "064Y", "M"],
            ["train_2_a_1", "1", "-1024", "[0.8, 0.8]", "1.5", "045Y", "F"],
            ["train_3_a_1", "1", "-1024", "[0.75, 0.75]", "1.5", "050Y", "F"],
            ["valid_1_a_1", "1", "-1024", "[2.0, 2.0]", "3.0", "070Y", "M"]]
    with open(os.path.join(root, "dataset", "metadata", "train_metadata.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(META_COLS)
        w.writerows(meta)
    return root


def _manifest(path):
    with open(os.path.join(path, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_ctrate_fixture_prepares_with_one_line_per_problem(ctrate_root, tmp_path, body_hu):
    src = CtRateSource.from_root(ctrate_root)
    cfg = DatasetConfig(name="ctrate_small", grid=GRID)
    summary = build(src, cfg, str(tmp_path / "out"), progress=False, num_workers=2, log=lambda s: None)
    assert summary["counts"]["train"] == 3 and summary["counts"]["validation"] == 1
    entries = _manifest(summary["path"])
    by_id = {}
    for e in entries:
        by_id.setdefault(e["source_id"], []).append(e)

    def problem(sid):
        return " | ".join(e.get("problem", "") for e in by_id[sid])

    assert "inconsistent spacing" in problem("train_3_a_1")
    assert "truncated or corrupt" in problem("train_4_a_1") and "train_4_a_1.nii.gz" in problem("train_4_a_1")
    assert "not a 3-D volume" in problem("train_5_a_1")
    assert "NaN" in problem("train_6_a_1")
    assert "volume without a report" in problem("train_7_a_1")
    assert "without a volume" in problem("train_8_a_1")
    assert "different report" in problem("train_9_a_1")
    assert "split_patient_scan_recon" in problem("scan_x")
    assert "non-ASCII" in problem("train_2_a_1")
    assert any(e["status"] == "warning" and "identical" in e["problem"] for e in by_id["train_1_a_1"])
    written = {e["source_id"]: e for e in entries if e["status"] in ("written", "warning") and "shape" in e}
    assert sorted(written) == ["train_1_a_1", "train_1_a_2", "train_2_a_1", "valid_1_a_1"]
    assert written["train_1_a_1"]["hu_source"].startswith("csv")
    assert written["train_1_a_2"]["hu_source"].startswith("header")
    assert written["train_2_a_1"]["spacing_source"].startswith("csv")
    assert written["train_2_a_1"]["hu_source"].startswith("as stored")
    for e in entries:
        assert e["status"] in ("written", "warning", "skipped")
        if e["status"] != "written":
            assert e["problem"]

    train = open_split(summary["path"], "train")
    ex = {bytes(train[i]["source_id"]).decode(): train[i] for i in range(len(train))}
    a, b = ex["train_1_a_1"], ex["train_1_a_2"]
    np.testing.assert_array_equal(a["volume"], b["volume"])  # CSV rescale == header rescale
    assert a["volume"].min() == -1000 and 15 <= np.median(a["volume"][a["volume"] > -500]) <= 25
    assert a["patient_id"] == b["patient_id"] == b"train_1"
    assert a["prompt"] == b"64 years old male: Cardiomegaly."
    np.testing.assert_allclose(a["original_spacing"], [3.0, 2.0, 2.0])
    c = ex["train_2_a_1"]
    np.testing.assert_allclose(c["original_spacing"], [1.5, 0.8, 0.8])
    assert c["findings"] == 'Caf\u00e9 "quoted" finding \u00e7a.'.encode()
    assert c["prompt"] == b"45 years old female: Ground-glass opacity right."
    val = open_split(summary["path"], "validation")[0]
    assert val["source_id"] == b"valid_1_a_1" and val["age"] == 70 and val["sex"] == b"M"


def test_ctrate_strict_fails_and_rerun_is_idempotent(ctrate_root, tmp_path, capsys):
    out = str(tmp_path / "out")
    code = prepare_main(["--source", "ctrate", "--root", ctrate_root, "--out", out, "--slices", "15",
                         "--resolution", "16", "--strict", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --strict:") and len(err.strip().splitlines()) == 1
    args = ["--source", "ctrate", "--root", ctrate_root, "--out", out, "--slices", "15", "--resolution", "16",
            "--num-workers", "0", "--no-progress"]
    assert prepare_main(args) == 0
    assert prepare_main(args) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert prepare_main(args[:-1] + ["--resolution", "16", "--hu-mode", "none", "--no-progress"]) == 2
    assert "already holds a different dataset" in capsys.readouterr().err


def test_truncated_gzip_is_really_truncated(ctrate_root):
    with pytest.raises((EOFError, OSError)):
        gzip.open(vol_path(ctrate_root, "train_4_a_1")).read()
    with pytest.raises(PrepareError):
        build(CtRateSource.from_root(ctrate_root), DatasetConfig(name="x", grid=GRID), "/nonexistent-unused",
              strict=True, progress=False)


def test_without_valid_volumes_train_patients_are_split(ctrate_root, tmp_path):
    found = CtRateSource.from_root(ctrate_root)
    src = CtRateSource([d for d in found.volume_dirs if d.endswith("train_fixed")], found.reports, found.metadata)
    summary = build(src, DatasetConfig(name="t", grid=GRID), str(tmp_path / "out"), validation_fraction=0.5,
                    split_seed=0, progress=False, log=lambda s: None)
    splits = {}
    for split in ("train", "validation"):
        s = open_split(summary["path"], split)
        splits[split] = {bytes(s[i]["patient_id"]).decode() for i in range(len(s))}
    assert splits["train"] and splits["validation"] and not splits["train"] & splits["validation"]
    assert summary["counts"]["train"] + summary["counts"]["validation"] == 3
