"""DICOM series written in the test: uncompressed, RLE, JPEG 2000, JPEG-LS, JPEG; shuffled files; bad series."""
import csv
import json
import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid)

from ctgen.data.dicom_source import DicomSource
from ctgen.data.features import DatasetConfig
from ctgen.data.preprocess import GridConfig
from ctgen.data.side import open_split
from ctgen.data.writer import build
from ctgen.io.dicom import load_series
from ctgen.volume import VolumeError, to_canonical

SPACING_RC = (0.7, 0.8)  # PixelSpacing: between rows, between columns
STEP = 1.25


def ct_slice(stored, z, series, study, *, patient="P1", modality="CT", slope=1.0, intercept=-1024.0):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientAge, ds.PatientSex = modality, patient, "058Y", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-20.0, -30.0, float(z)]
    ds.PixelSpacing = list(SPACING_RC)
    ds.SliceThickness = STEP
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(stored, np.uint16).tobytes()
    return ds


def anatomy(n, rows=64, cols=48):
    """HU slices (n, rows, cols): air, a water disc, and a bright marker in the first row / column."""
    r = np.arange(rows)[:, None] - rows / 2
    c = np.arange(cols)[None, :] - cols / 2
    sl = np.where(r ** 2 + c ** 2 < 300, 30.0, -1000.0)
    vol = np.repeat(sl[None], n, 0)
    vol += np.arange(n)[:, None, None] * 2.0  # slices differ, so order errors show
    vol[:, 0, 0] = 900
    return vol


def write_series(folder, hu, *, study, series=None, z0=0.0, syntax=None, rng=None, drop=None, dup=None, **kw):
    series = series or generate_uid()
    os.makedirs(folder, exist_ok=True)
    zs = [z0 + k * STEP for k in range(len(hu))]
    items = list(zip(zs, hu))
    if drop is not None:
        items.pop(drop)
    if dup is not None:
        items.append(items[dup])
    names = np.arange(len(items))
    if rng is not None:
        rng.shuffle(names)  # file order unrelated to position
    for name, (z, sl) in zip(names, items):
        ds = ct_slice((sl + 1024).astype(np.uint16), z, series, study, **kw)
        if syntax is not None:
            ds.compress(syntax)
        ds.save_as(os.path.join(folder, f"IM{name:04d}.dcm"), enforce_file_format=True)
    return series


def test_series_load_matches_source_for_every_syntax(tmp_path):
    rng = np.random.default_rng(0)
    hu = anatomy(9)
    for syntax in (None, RLELossless, JPEG2000Lossless):
        d = tmp_path / str(syntax)
        write_series(str(d), hu, study=generate_uid(), syntax=syntax, rng=rng)
        vol_ijk, affine, notes = load_series(sorted(str(p) for p in d.iterdir()), str(d))
        assert notes["slices"] == 9
        canon, spacing, orient = to_canonical(vol_ijk, affine)
        assert orient == "LPS"
        np.testing.assert_allclose(spacing, [STEP, SPACING_RC[0], SPACING_RC[1]])
        np.testing.assert_array_equal(canon, hu.astype(np.float32))


def test_jpeg_ls_and_jpeg_series_decode(tmp_path):
    rng = np.random.default_rng(1)
    for name, slope, inter in (("MR_small_jpeg_ls_lossless.dcm", 1.0, -1100.0), ("JPGExtended.dcm", 20.0, -1000.0)):
        src = pydicom.dcmread(get_testdata_file(name))
        expected = src.pixel_array.astype(np.float32) * slope + inter
        series, study = generate_uid(), generate_uid()
        folder = tmp_path / name
        folder.mkdir()
        for k in rng.permutation(4):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
            ds.SOPInstanceUID = generate_uid()
            ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, float(k) * 2]
            ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = [0.5, 0.5], slope, inter
            ds.save_as(str(folder / f"{k}.dcm"))
        vol_ijk, affine, notes = load_series([str(p) for p in folder.iterdir()], name)
        assert any("JPEG" in s for s in notes["transfer_syntax"])
        canon, spacing, _ = to_canonical(vol_ijk, affine)
        np.testing.assert_allclose(spacing, [2.0, 0.5, 0.5])
        for k in range(4):
            np.testing.assert_array_equal(canon[k], expected)


@pytest.mark.parametrize("kind,match", [("missing", "missing slice"), ("duplicate", "duplicated slice"),
                                        ("mr", "is not CT"), ("single", "not a 3-D series"),
                                        ("irregular", "inconsistent slice spacing")])
def test_bad_series_are_rejected_with_a_clear_reason(tmp_path, kind, match):
    hu = anatomy(8)
    kw = {"missing": dict(drop=4), "duplicate": dict(dup=2), "mr": dict(modality="MR")}.get(kind, {})
    if kind == "single":
        hu = hu[:1]
    write_series(str(tmp_path), hu, study=generate_uid(), **kw)
    files = sorted(str(p) for p in tmp_path.iterdir())
    if kind == "irregular":
        ds = pydicom.dcmread(files[3])
        ds.ImagePositionPatient = [-20.0, -30.0, float(ds.ImagePositionPatient[2]) + 0.3]
        ds.save_as(files[3])
    with pytest.raises(VolumeError, match=match):
        load_series(files, str(tmp_path))


def test_dicom_source_prepares_studies_with_reports(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "pacs"
    hu = anatomy(11)
    studies = {n: generate_uid() for n in ("A", "B", "C", "D")}
    write_series(str(root / "A" / "s1"), hu, study=studies["A"], rng=rng, patient="P1")
    write_series(str(root / "A" / "s2"), hu, study=studies["A"], rng=rng, patient="P1", syntax=RLELossless)
    write_series(str(root / "B" / "s1"), hu, study=studies["B"], rng=rng, patient="P2", syntax=JPEG2000Lossless)
    write_series(str(root / "C" / "s1"), hu, study=studies["C"], rng=rng, patient="P3", drop=5)
    write_series(str(root / "D" / "s1"), hu, study=studies["D"], rng=rng, patient="P4")  # no report
    (root / "notes.txt").write_text("not dicom")
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "findings", "impression"])
        w.writerow([studies["A"], "Heart size is increased.", "Cardiomegaly."])
        w.writerow([studies["B"], "Normal.", "No significant pathology."])
        w.writerow([studies["C"], "x", "x"])
        w.writerow(["1.2.3.999", "x", "orphan report"])
    src = DicomSource(str(root), str(tmp_path / "reports.csv"))
    cfg = DatasetConfig(name="dicom_small", grid=GridConfig(shape=(11, 64, 48)))
    summary = build(src, cfg, str(tmp_path / "out"), validation_fraction=0.0, progress=False, log=lambda s: None)
    assert summary["counts"]["train"] == 3 and summary["counts"]["skipped"] == 3
    lines = [json.loads(x) for x in open(os.path.join(summary["path"], "manifest.jsonl"))]
    problems = " | ".join(e.get("problem", "") for e in lines)
    assert "missing slice" in problems and "has no report" in problems and "without a DICOM series" in problems
    train = open_split(summary["path"], "train")
    for i in range(len(train)):
        ex = train[i]
        np.testing.assert_array_equal(ex["volume"], np.clip(hu, -1000, 1000).astype(np.int16))
        np.testing.assert_allclose(ex["spacing"], [STEP, 0.7, 0.8], rtol=1e-6)
        assert ex["orientation"] == b"LPS" and ex["age"] == 58 and ex["sex"] == b"F"
        assert ex["prompt"] in (b"58 years old female: Cardiomegaly.", b"58 years old female: No significant pathology.")


def test_dicom_report_columns_from_the_command_line(tmp_path):
    import argparse

    from ctgen.data import command

    study = generate_uid()
    write_series(str(tmp_path / "pacs" / "A"), anatomy(9), study=study)
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "impr", "find", "history", "protocol"])
        w.writerow([study, "Cardiomegaly.", "Heart size is increased.", "Dyspnea.", "Non-contrast chest CT."])
    args = command.configure(argparse.ArgumentParser()).parse_args([
        "--source", "dicom", "--root", str(tmp_path / "pacs"), "--reports", str(tmp_path / "reports.csv"),
        "--out", str(tmp_path / "out"), "--key-column", "uid", "--text-column", "impr", "--findings-column", "find",
        "--clinical-column", "history", "--technique-column", "protocol"])
    recs, issues = command.make_source(args, GridConfig(shape=(9, 64, 48))).scan()
    assert not issues and len(recs) == 1
    assert recs[0].payload["report"] == {"impression": "Cardiomegaly.", "findings": "Heart size is increased.",
                                         "clinical": "Dyspnea.", "technique": "Non-contrast chest CT."}


def anonymise(folder, *, keep_demographics=True):
    """Blank the UIDs (and PatientID; age and sex too unless kept) of every file in `folder`, as
    anonymising exports do."""
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(path))
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.PatientID = ""
        if not keep_demographics:
            del ds.PatientAge
            ds.PatientSex = ""
        ds.save_as(str(path))


def test_anonymised_export_without_uids_is_grouped_by_folder_and_geometry(tmp_path):
    import argparse

    from ctgen.data import command
    from ctgen.io.dicom import BY_GEOMETRY, scan_series

    rng = np.random.default_rng(3)
    root = tmp_path / "export"
    hu = anatomy(9)
    for name in ("S1", "S2", "S3"):
        write_series(str(root / name), hu, study=generate_uid(), rng=rng)  # file names unrelated to position
    localizer = ct_slice(np.zeros((32, 40), np.uint16), 0.0, generate_uid(), generate_uid())
    localizer.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal scout in the same folder as S1's slices
    localizer.save_as(str(root / "S1" / "LOC.dcm"), enforce_file_format=True)
    anonymise(root / "S1")
    anonymise(root / "S2", keep_demographics=False)
    anonymise(root / "S3", keep_demographics=False)
    series, problems = scan_series(str(root))
    assert not problems
    assert {uid: len(s.files) for uid, s in series.items()} == {"folder:S1#1": 9, "folder:S1#2": 1,
                                                                 "folder:S2": 9, "folder:S3": 9}
    assert {s.grouped_by for s in series.values()} == {BY_GEOMETRY}
    # CT-RATE's report column names; age and sex in the CSV for series whose header has none.
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["folder", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN", "age", "sex"])
        w.writerow(["S1", "Cough.", "Non-contrast.", "Heart size is increased.", "Cardiomegaly.", "70", "M"])
        w.writerow(["S2", "Fever.", "Non-contrast.", "Normal.", "No acute findings.", "064Y", "M"])
        w.writerow(["S3", "Dyspnea.", "Non-contrast.", "Normal.", "Normal chest CT.", "", ""])
    parser = command.configure(argparse.ArgumentParser())
    args = parser.parse_args(["--source", "dicom", "--root", str(root), "--reports", str(tmp_path / "reports.csv"),
                              "--out", str(tmp_path / "out"), "--key", "folder"])
    src = command.make_source(args, GridConfig(shape=(9, 64, 48)))
    summary = build(src, DatasetConfig(name="anon", grid=GridConfig(shape=(9, 64, 48))), str(tmp_path / "out"),
                    validation_fraction=0.0, progress=False, log=lambda s: None)
    assert summary["counts"]["train"] == 3 and summary["counts"]["skipped"] == 1
    lines = {e["source_id"]: e for e in map(json.loads, open(os.path.join(summary["path"], "manifest.jsonl")))}
    assert "not a 3-D series" in lines["folder:S1#2"]["problem"]  # the scout, kept apart by its orientation
    for sid in ("folder:S1#1", "folder:S2", "folder:S3"):
        assert lines[sid]["status"] == "written" and lines[sid]["grouped_by"] == BY_GEOMETRY
    assert (lines["folder:S1#1"]["age_from"], lines["folder:S2"]["age_from"], lines["folder:S3"]["sex_from"]) == (
        "DICOM header", "reports CSV", "unknown")
    train = open_split(summary["path"], "train")
    got = {train[i]["source_id"].decode(): train[i] for i in range(len(train))}
    for ex in got.values():  # ordered along the slice normal, not by file name
        np.testing.assert_array_equal(ex["volume"], np.clip(hu, -1000, 1000).astype(np.int16))
    assert got["folder:S1#1"]["prompt"] == b"58 years old female: Cardiomegaly."  # the header wins
    assert got["folder:S1#1"]["findings"] == b"Heart size is increased." and got["folder:S1#1"]["clinical"] == b"Cough."
    assert got["folder:S2"]["prompt"] == b"64 years old male: No acute findings." and got["folder:S2"]["age"] == 64
    assert got["folder:S3"]["prompt"] == b"Normal chest CT." and np.isnan(got["folder:S3"]["age"])
    # Matching by StudyInstanceUID cannot work without UIDs: the problem says what to do.
    with open(tmp_path / "by_study.csv", "w", newline="") as f:
        csv.writer(f).writerows([["StudyInstanceUID", "impression"], ["1.2.3", "Cardiomegaly."], ["", "Blank key."]])
    recs, issues = DicomSource(str(root), str(tmp_path / "by_study.csv")).scan()
    assert not recs  # the row with a blank key matches nothing
    assert sum("has no StudyInstanceUID: match reports by folder with --key folder" in i.problem for i in issues) == 4
    assert any("empty 'StudyInstanceUID'; report row skipped" in i.problem for i in issues)
