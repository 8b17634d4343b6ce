"""DICOM series (e.g. a PACS export) as a data source, with reports from a CSV.

Each SeriesInstanceUID under `root` is one volume (source id = the series UID; patient id =
PatientID, so all series of a patient share a split). The report row is found by the series'
StudyInstanceUID (`key="study"`) or by the name of its top-level folder under `root`
(`key="folder"`); several series of one study share its report.
"""
from __future__ import annotations

import os

from ctgen.data.sources import read_csv, require_columns
from ctgen.data.writer import Issue, Record
from ctgen.io.dicom import load_series, scan_series
from ctgen.volume import VolumeError


class DicomSource:
    kind = "dicom"

    def __init__(self, root: str, reports_csv: str, *, key: str = "study", key_column: str | None = None,
                 text_column: str = "impression", findings_column: str | None = "findings",
                 clinical_column: str | None = None, technique_column: str | None = None):
        if key not in ("study", "folder"):
            raise ValueError(f"key must be 'study' or 'folder', got {key!r}")
        if not os.path.isdir(root):
            raise VolumeError(f"{root}: DICOM folder not found")
        self.root = os.path.abspath(root)
        self.reports_csv = os.path.abspath(reports_csv)
        self.key = key
        self.cols = {"key": key_column or ("StudyInstanceUID" if key == "study" else "folder"),
                     "impression": text_column, "findings": findings_column,
                     "clinical": clinical_column, "technique": technique_column}

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "root": self.root, "reports": self.reports_csv, "key": self.key,
                "columns": self.cols, "csv_mtime": os.path.getmtime(self.reports_csv)}

    def scan(self) -> tuple[list[Record], list[Issue]]:
        series, problems = scan_series(self.root)
        issues = [Issue(f, p) for f, p in problems]
        rows, iss = read_csv(self.reports_csv)
        issues += iss
        require_columns(self.reports_csv, rows, [self.cols["key"], self.cols["impression"]])
        reports: dict[str, dict] = {}
        for n, row in enumerate(rows, start=2):
            k = row.get(self.cols["key"]) or ""
            where = f"{self.reports_csv}:{n}"
            if k in reports:
                issues.append(Issue(where, f"{where}: duplicate report key {k!r}; first row used", k, status="warning"))
                continue
            reports[k] = {f: (row.get(c) or "") for f, c in self.cols.items() if f != "key" and c}
        used = set()
        recs = []
        for uid, s in sorted(series.items()):
            k = s.study_uid if self.key == "study" else s.folder
            where = os.path.dirname(s.files[0])
            if k not in reports:
                issues.append(Issue(where, f"{where}: series {uid} has no report (no row with "
                                           f"{self.cols['key']} = {k!r} in {self.reports_csv})", uid))
                continue
            used.add(k)
            recs.append(Record(source_id=uid, patient_id=s.patient_id or s.study_uid or uid, file=where,
                               payload={"files": sorted(s.files), "report": reports[k], "age": s.age, "sex": s.sex}))
        for k in sorted(set(reports) - used):
            issues.append(Issue(self.reports_csv, f"{self.reports_csv}: report row {k!r} without a DICOM series", k))
        return recs, issues

    def load(self, record: Record) -> dict:
        p = record.payload
        hu, affine, notes = load_series(p["files"], record.file)
        return {"hu_ijk": hu, "affine": affine, "report": p["report"], "age": p["age"] or None,
                "sex": p["sex"] or None, "notes": {**notes, "hu_source": "DICOM RescaleSlope/Intercept"}}
