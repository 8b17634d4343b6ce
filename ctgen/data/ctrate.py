"""CT-RATE as a data source: reports CSV, metadata CSV, `<split>_fixed/<patient>/<study>/<volume>.nii.gz`.

Volume names are `split_patient_scan_recon` (e.g. `train_123_a_1`); the patient id is
`split_patient`, and CT-RATE's own train / valid split is kept (all reconstructions of one
patient stay together); without any `valid_*` volume, train patients are split by the
validation fraction instead. HU: `hu_mode="auto"` uses the header's scaling when it has one, applies
the metadata's RescaleSlope / RescaleIntercept when the stored values have no air below -200
(raw detector values), and otherwise takes the data as already in HU; each example's manifest
line says which. Spacing comes from the header unless it lacks one (no qform/sform, or the
1, 1, 1 placeholder of CT-RATE's first release), then from `XYSpacing` / `ZSpacing`; a header
that disagrees with the CSV is reported as inconsistent and the volume skipped.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np

from ctgen.data.sources import (find_niftis, nifti_stem, orientation_warnings, parse_floats, read_csv, require_columns,
                                resolve_spacing)
from ctgen.data.writer import Issue, Record
from ctgen.io.nifti import read_nifti
from ctgen.volume import VolumeError, apply_rescale

NAME_RE = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)$")
REPORT_COLUMNS = {"clinical": "ClinicalInformation_EN", "technique": "Technique_EN",
                  "findings": "Findings_EN", "impression": "Impressions_EN"}


def discover(root: str) -> dict[str, list[str]]:
    """Find CT-RATE's volume folders and CSVs under `root` (the dataset's top folder)."""
    def g(*pats):
        return sorted({p for pat in pats for p in glob.glob(os.path.join(root, pat), recursive=True)})
    return {
        "volumes": g("*_fixed", "dataset/*_fixed"),
        "reports": g("**/radiology_text_reports/*reports*.csv", "*reports*.csv"),
        "metadata": g("**/metadata/*metadata*.csv", "*metadata*.csv"),
    }


def _rows_by_name(paths: list[str], kind: str, issues: list[Issue], required: list[str],
                  origin: dict[str, str] | None = None) -> dict[str, dict | None]:
    """Rows keyed by VolumeName; a name with conflicting duplicate rows maps to None (skip).

    origin: filled with "csv:line" of each name's first row."""
    out: dict[str, dict] = {}
    origin = {} if origin is None else origin
    conflicted: set[str] = set()
    for path in paths:
        rows, iss = read_csv(path)
        issues += iss
        require_columns(path, rows, ["VolumeName"] + required)
        for n, row in enumerate(rows, start=2):
            name = nifti_stem(row.get("VolumeName") or "")
            where = f"{path}:{n}"
            if not name:
                issues.append(Issue(where, f"{where}: {kind} row without a VolumeName"))
                continue
            if name in out:
                if row == out[name]:
                    issues.append(Issue(where, f"{where}: duplicate VolumeName {name!r} (identical to {origin[name]}); "
                                               "used once", name, status="warning"))
                else:
                    issues.append(Issue(where, f"{where}: duplicate VolumeName {name!r} with a different {kind} than "
                                               f"{origin[name]}; volume skipped", name))
                    conflicted.add(name)
                continue
            out[name], origin[name] = row, where
    for name in conflicted:
        out[name] = None  # marks "skip"
    return out


class CtRateSource:
    """CT-RATE layout. `volume_dirs`: `*_fixed` folders (searched recursively for `*.nii.gz`)."""

    kind = "ctrate"

    def __init__(self, volume_dirs: list[str], reports: list[str], metadata: list[str], *, hu_mode: str = "auto"):
        if hu_mode not in ("auto", "csv", "header", "none"):
            raise ValueError(f"hu_mode must be auto|csv|header|none, got {hu_mode!r}")
        if not volume_dirs:
            raise VolumeError("no CT-RATE volume folder (*_fixed) given or found")
        if not reports:
            raise VolumeError("no CT-RATE reports CSV given or found")
        self.volume_dirs = [os.path.abspath(p) for p in volume_dirs]
        self.reports = [os.path.abspath(p) for p in reports]
        self.metadata = [os.path.abspath(p) for p in metadata]
        self.hu_mode = hu_mode

    @classmethod
    def from_root(cls, root: str, **kw) -> "CtRateSource":
        found = discover(root)
        return cls(found["volumes"], found["reports"], found["metadata"], **kw)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "volumes": self.volume_dirs, "reports": self.reports,
                "metadata": self.metadata, "hu_mode": self.hu_mode,
                "mtimes": [os.path.getmtime(p) for p in self.reports + self.metadata if os.path.exists(p)]}

    def scan(self) -> tuple[list[Record], list[Issue]]:
        issues: list[Issue] = []
        where: dict[str, str] = {}
        reports = _rows_by_name(self.reports, "report", issues, list(REPORT_COLUMNS.values()), where)
        meta = _rows_by_name(self.metadata, "metadata", issues, [])
        files: dict[str, str] = {}
        for d in self.volume_dirs:
            for path in find_niftis(d):
                name = nifti_stem(path)
                if name in files:
                    issues.append(Issue(path, f"{path}: duplicate volume {name!r} (also {files[name]}); skipped", name))
                    files[name] = ""
                    continue
                files[name] = path
        recs = []
        for name, path in sorted(files.items()):
            if not path:
                continue
            m = NAME_RE.match(name)
            if not m:
                issues.append(Issue(path, f"{path}: name does not follow CT-RATE's split_patient_scan_recon "
                                          "(e.g. train_123_a_1); skipped", name))
                continue
            if name not in reports:
                issues.append(Issue(path, f"{path}: volume without a report (no row in {', '.join(self.reports)})", name))
                continue
            if reports[name] is None or meta.get(name, {}) is None:
                continue  # conflicting duplicates, already reported
            rep = {k: reports[name].get(col, "") for k, col in REPORT_COLUMNS.items()}
            if not (rep["impression"] or rep["findings"]):
                issues.append(Issue(path, f"{path}: report row has neither findings nor impression; skipped", name))
                continue
            split = "train" if m.group(1) == "train" else "validation"
            recs.append(Record(source_id=name, patient_id=f"{m.group(1)}_{m.group(2)}", file=path, split=split,
                               payload={"path": path, "report": rep, "meta": meta.get(name)}))
        if recs and not any(r.split == "validation" for r in recs):
            for r in recs:  # no valid_* volumes given: split train patients by --validation-fraction
                r.split = None
        for name in sorted(set(reports) - set(files)):
            issues.append(Issue(where[name], f"{where[name]}: report row for {name!r} without a volume "
                                             f"(no {name}.nii.gz under {', '.join(self.volume_dirs)})", name))
        return recs, issues

    def load(self, record: Record) -> dict:
        p = record.payload
        path, meta = p["path"], p["meta"] or {}
        vol = read_nifti(path)
        warnings = orientation_warnings(vol)
        if not p["meta"]:
            warnings.append("no metadata row; spacing and HU from the header only")
        xy, zs = parse_floats(meta.get("XYSpacing", "")), parse_floats(meta.get("ZSpacing", ""))
        csv_sp = [xy[1], xy[0], zs[0]] if len(xy) == 2 and len(zs) == 1 else None  # PixelSpacing is (row, col)
        spacing, sp_src = resolve_spacing(vol, csv_sp, path)
        data, hu_src = self._to_hu(vol, meta, path)
        return {"hu_ijk": data, "affine": vol.affine, "spacing_ijk": spacing, "report": p["report"],
                "age": meta.get("PatientAge"), "sex": meta.get("PatientSex"), "warnings": warnings,
                "notes": {"spacing_source": sp_src, "hu_source": hu_src}}

    def _to_hu(self, vol, meta: dict, path: str):
        slope, inter = parse_floats(meta.get("RescaleSlope", "")), parse_floats(meta.get("RescaleIntercept", ""))
        have_csv = len(slope) == 1 and len(inter) == 1
        mode = self.hu_mode
        if mode == "auto":
            if vol.header_scaled:
                mode = "header"
            else:
                sample = vol.data_ijk[..., :: max(1, vol.data_ijk.shape[-1] // 16)]
                finite = sample[np.isfinite(sample)]
                no_air = finite.size > 0 and float(np.percentile(finite, 1)) > -200
                mode = "csv" if (no_air and have_csv) else "none"
        if mode == "csv":
            if not have_csv:
                raise VolumeError(f"{path}: --hu-mode csv but the metadata row has no RescaleSlope/RescaleIntercept")
            return apply_rescale(vol.data_ijk, slope[0], inter[0]), f"csv (slope {slope[0]:g}, intercept {inter[0]:g})"
        return vol.data_ijk, ("header scl_slope/scl_inter" if mode == "header" else "as stored (already HU)")
