"""Resume / refuse, manifest lines for NIfTI+CSV inputs, strict mode."""
import csv
import json
import os

import numpy as np
import pytest

from dl_helpers import SMALL_GRID, write_nifti_raw
from ctgen.data.features import DatasetConfig, normalize_text, parse_age, text_fields
from ctgen.data.side import open_split
from ctgen.data.sources import NiftiCsvSource, PhantomSource
from ctgen.data.writer import PrepareError, Record, assign_splits, build
from ctgen.text.prompt import build_prompt

CFG = DatasetConfig(name="tiny", grid=SMALL_GRID, phantom=True)


class Interrupting(PhantomSource):
    """A phantom source that is 'killed' when it reaches one record; counts the loads it did."""

    def __init__(self, *a, stop_at=None, **kw):
        super().__init__(*a, **kw)
        self.stop_at, self.loads = stop_at, 0

    def load(self, record):
        if record.source_id == self.stop_at:
            raise KeyboardInterrupt
        self.loads += 1
        return super().load(record)


def _all_examples(path):
    out = {}
    for split in ("train", "validation"):
        src = open_split(path, split)
        for i in range(len(src)):
            ex = src[i]
            out[bytes(ex["source_id"]).decode()] = (split, ex["volume"].tobytes(), ex["labels"].tobytes(), ex["prompt"])
    return out


def test_interrupted_prepare_resumes_to_the_same_dataset(tmp_path):
    quiet = dict(progress=False, log=lambda s: None, validation_fraction=0.25, examples_per_shard=2)
    ref = build(PhantomSource(7, 3, SMALL_GRID), CFG, str(tmp_path / "ref"), **quiet)
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        build(Interrupting(7, 3, SMALL_GRID, stop_at="phantom_3_000004"), CFG, out, **quiet)
    staging = os.path.join(out, "ctgen_ct", "tiny", "1.0.0.incomplete")
    assert os.path.isdir(staging) and not os.path.exists(os.path.join(out, "ctgen_ct", "tiny", "1.0.0"))
    with pytest.raises(PrepareError, match="unfinished run with a different request"):
        build(PhantomSource(8, 3, SMALL_GRID), CFG, out, **quiet)
    logs = []
    resumed = Interrupting(7, 3, SMALL_GRID)
    summary = build(resumed, CFG, out, **{**quiet, "log": logs.append})
    assert any("resuming" in line for line in logs)
    assert 0 < resumed.loads < 7
    assert summary["counts"] == ref["counts"]
    assert _all_examples(summary["path"]) == _all_examples(ref["path"])
    assert not os.path.exists(staging)
    with pytest.raises(PrepareError, match="already holds a different dataset"):
        build(PhantomSource(7, 4, SMALL_GRID), CFG, out, **quiet)
    replaced = build(PhantomSource(7, 4, SMALL_GRID), CFG, out, overwrite=True, **quiet)
    assert replaced["request"]["source"]["seed"] == 4


def test_patient_split_is_disjoint_and_seeded():
    recs = [Record(f"v{i}", f"p{i // 3}", "f") for i in range(30)]
    assign_splits(recs, 0.2, seed=1)
    val = {r.patient_id for r in recs if r.split == "validation"}
    train = {r.patient_id for r in recs if r.split == "train"}
    assert len(val) == 2 and not val & train
    again = [Record(f"v{i}", f"p{i // 3}", "f") for i in range(30)]
    assign_splits(again, 0.2, seed=1)
    assert [r.split for r in again] == [r.split for r in recs]
    chosen = set()
    for seed in range(2, 6):
        other = [Record(f"v{i}", f"p{i // 3}", "f") for i in range(30)]
        assign_splits(other, 0.2, seed=seed)
        chosen.add(frozenset(r.patient_id for r in other if r.split == "validation"))
    assert len(chosen) > 1  # the seed matters
    fixed = [Record("v0", "p0", "f", split="validation"), Record("v1", "p1", "f")]
    assign_splits(fixed, 0.5, seed=0)
    assert fixed[0].split == "validation" and fixed[1].split == "train"  # a source's own split is kept


def test_nifti_csv_bad_inputs_each_get_one_line(tmp_path, body_hu):
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    d = tmp_path / "vols"
    write_nifti_raw(str(d / "a.nii.gz"), body_hu.astype(np.int16), aff)
    write_nifti_raw(str(d / "b.nii.gz"), body_hu.astype(np.int16), aff)
    write_nifti_raw(str(d / "mr.nii.gz"), (np.abs(body_hu) * 2).astype(np.int16), aff)  # no air: not CT in HU
    write_nifti_raw(str(d / "inf.nii.gz"), np.where(body_hu > 500, np.inf, body_hu).astype(np.float32), aff)
    write_nifti_raw(str(d / "unlisted.nii.gz"), body_hu.astype(np.int16), aff)
    write_nifti_raw(str(d / "nogeo.nii.gz"), body_hu.astype(np.int16), np.eye(4), geometry=False)
    (d / "garbage.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    rows = [["vols/a.nii.gz", "Normal study \u2013 no findings.", "040Y", "M", "", "p1"],
            ["vols/b.nii.gz", "", "", "", "", "p2"],
            ["vols/mr.nii.gz", "x", "", "", "", "p3"],
            ["vols/inf.nii.gz", "x", "", "", "", "p4"],
            ["vols/missing.nii.gz", "x", "", "", "", "p5"],
            ["vols/nogeo.nii.gz", "Spacing from the CSV.", "", "", "[0.5, 0.6, 1.5]", "p6"],
            ["vols/garbage.nii.gz", "x", "", "", "", "p7"]]
    with open(tmp_path / "list.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "text", "age", "sex", "spacing", "patient"])
        w.writerows(rows)
    src = NiftiCsvSource(str(tmp_path / "list.csv"), patient_column="patient")
    cfg = DatasetConfig(name="n", grid=SMALL_GRID)
    summary = build(src, cfg, str(tmp_path / "out"), validation_fraction=0.0, progress=False, log=lambda s: None)
    assert summary["counts"]["train"] == 2
    lines = [json.loads(x) for x in open(os.path.join(summary["path"], "manifest.jsonl"))]
    by_file = {os.path.basename(e["file"].split(":")[0]): e for e in lines}
    assert "volume without a report" in by_file["b.nii.gz"]["problem"]
    assert "do not look like CT" in by_file["mr.nii.gz"]["problem"] and "mr.nii.gz" in by_file["mr.nii.gz"]["problem"]
    assert "NaN/inf" in by_file["inf.nii.gz"]["problem"]
    assert "unlisted.nii.gz" in by_file["unlisted.nii.gz"]["problem"]
    assert "cannot read NIfTI" in by_file["garbage.nii.gz"]["problem"] or \
        "corrupt" in by_file["garbage.nii.gz"]["problem"]
    assert any("report row without a volume" in e.get("problem", "") for e in lines)
    assert by_file["nogeo.nii.gz"]["spacing_source"].startswith("csv")
    assert by_file["nogeo.nii.gz"]["status"] == "warning" and "assumed RAS" in by_file["nogeo.nii.gz"]["problem"]
    ex = {bytes(e["source_id"]).decode(): e for e in (open_split(summary["path"], "train")[i] for i in range(2))}
    assert ex["a"]["prompt"] == b"40 years old male: Normal study - no findings."
    np.testing.assert_allclose(ex["nogeo"]["original_spacing"], [1.5, 0.6, 0.5])
    assert sum(e["status"] == "skipped" for e in lines) == summary["counts"]["skipped"] == 6


def test_text_and_age_helpers():
    assert normalize_text("a\u00a0\u201cb\u201d \u2212 c\u00e9") == ('a "b" - c\u00e9', "\u00e9")
    assert parse_age("064Y") == 64 and parse_age("006M") == 0.5 and np.isnan(parse_age("unknown"))


@pytest.mark.parametrize("raw", ["064Y", "64", 64, 64.0, np.float32(64), "006M", "7M", "012W", "030D", "64.5", "",
                                 "unknown", None])
def test_dataset_prompt_and_user_prompt_read_age_alike(raw):
    # The prompt a dataset stores (age parsed by features.parse_age) and build_prompt on the raw
    # value (generation) used to disagree for "006M" ("0" vs "6"), "64.5" and numpy scalars.
    cfg = DatasetConfig(name="x")
    age = parse_age(raw)
    stored, _ = text_fields({"impression": "No findings."}, cfg, age, "M")
    assert stored["prompt"] == build_prompt(age=raw, sex="M", impression="No findings.")
    assert build_prompt(age="064Y", sex="M", impression="No findings.") == "64 years old male: No findings."
