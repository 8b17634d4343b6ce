"""DICOM series (e.g. a PACS export) as a data source, with reports from a CSV.

Each series under `root` is one volume: a SeriesInstanceUID, or, in anonymised exports whose UIDs
are blank, the files of one folder with one geometry (`ctgen.io.dicom.scan_series`; the manifest's
`grouped_by` says which). Source id = the series UID (or `folder:<path>`); patient id = PatientID,
else StudyInstanceUID, else the series (the top-level folder for series without a UID), so all
series of a patient share a split. The report row is found by the series' StudyInstanceUID
(`key="study"`) or by the name of its top-level folder under `root` (`key="folder"`, the choice for
exports without UIDs); several series of one study share its report.

Report columns: each section is read from the column given, or else from the first present of
its short name and CT-RATE's name (`COLUMN_NAMES`). Age and sex come from the DICOM header
(PatientAge, PatientSex) and, where the header has none, from the CSV's age / sex columns.
"""
from __future__ import annotations

import os

from ctgen.data.ctrate import REPORT_COLUMNS
from ctgen.data.sources import read_csv, require_columns
from ctgen.data.writer import Issue, Record
from ctgen.io.dicom import BY_GEOMETRY, load_series, scan_series
from ctgen.volume import VolumeError

REPORT_FIELDS = ("impression", "findings", "clinical", "technique")
# field -> CSV column names tried in order when no column is given (short name, CT-RATE's name)
COLUMN_NAMES = {**{f: (f, REPORT_COLUMNS[f]) for f in REPORT_FIELDS}, "age": ("age", "PatientAge"),
                "sex": ("sex", "PatientSex")}


def _header_else_csv(header: str, csv: str) -> tuple[str, str]:
    """A demographic value and where it came from."""
    if header:
        return header, "DICOM header"
    return (csv, "reports CSV") if csv else ("", "unknown")


class DicomSource:
    kind = "dicom"

    def __init__(self, root: str, reports_csv: str, *, key: str = "study", key_column: str | None = None,
                 text_column: str | None = None, findings_column: str | None = None,
                 clinical_column: str | None = None, technique_column: str | None = None,
                 age_column: str | None = None, sex_column: str | None = None):
        """Columns left as None are found by `COLUMN_NAMES`; a column given by name must exist."""
        if key not in ("study", "folder"):
            raise ValueError(f"key must be 'study' or 'folder', got {key!r}")
        if not os.path.isdir(root):
            raise VolumeError(f"{root}: DICOM folder not found")
        self.root = os.path.abspath(root)
        self.reports_csv = os.path.abspath(reports_csv)
        self.key = key
        self.cols = {"key": key_column or ("StudyInstanceUID" if key == "study" else "folder"),
                     "impression": text_column, "findings": findings_column, "clinical": clinical_column,
                     "technique": technique_column, "age": age_column, "sex": sex_column}

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "root": self.root, "reports": self.reports_csv, "key": self.key,
                "columns": self.cols, "csv_mtime": os.path.getmtime(self.reports_csv)}

    def _columns(self, rows: list[dict]) -> dict[str, str | None]:
        """The CSV column of every field (None: not in this CSV)."""
        require_columns(self.reports_csv, rows, [c for c in self.cols.values() if c])
        have = set(rows[0]) if rows else set()
        cols = {f: c or next((n for n in COLUMN_NAMES.get(f, ()) if n in have), None) for f, c in self.cols.items()}
        if rows and not cols["impression"]:
            raise VolumeError(f"{self.reports_csv}: no impression column (tried {list(COLUMN_NAMES['impression'])}; "
                              f"name one with --text-column); found {sorted(have)}")
        return cols

    def scan(self) -> tuple[list[Record], list[Issue]]:
        series, problems = scan_series(self.root)
        issues = [Issue(f, p) for f, p in problems]
        rows, iss = read_csv(self.reports_csv)
        issues += iss
        cols = self._columns(rows)
        reports: dict[str, dict] = {}
        for n, row in enumerate(rows, start=2):
            k = row.get(cols["key"]) or ""
            where = f"{self.reports_csv}:{n}"
            if not k:  # would otherwise match every series without a StudyInstanceUID
                issues.append(Issue(where, f"{where}: empty {cols['key']!r}; report row skipped"))
                continue
            if k in reports:
                issues.append(Issue(where, f"{where}: duplicate report key {k!r}; first row used", k, status="warning"))
                continue
            reports[k] = {"report": {f: row.get(cols[f]) or "" for f in REPORT_FIELDS if cols[f]},
                          **{f: (row.get(cols[f]) or "") if cols[f] else "" for f in ("age", "sex")}}
        used = set()
        recs = []
        for uid, s in sorted(series.items()):
            k = s.study_uid if self.key == "study" else s.folder
            where = os.path.dirname(s.files[0])
            if k not in reports:
                hint = (" (the series has no StudyInstanceUID: match reports by folder with --key folder)"
                        if self.key == "study" and not s.study_uid else "")
                issues.append(Issue(where, f"{where}: series {uid} has no report (no row with "
                                           f"{cols['key']} = {k!r} in {self.reports_csv}){hint}", uid))
                continue
            used.add(k)
            age, age_from = _header_else_csv(s.age, reports[k]["age"])
            sex, sex_from = _header_else_csv(s.sex, reports[k]["sex"])
            patient = s.patient_id or s.study_uid or (f"folder:{s.folder}" if s.grouped_by == BY_GEOMETRY else uid)
            recs.append(Record(source_id=uid, patient_id=patient, file=where,
                               payload={"files": sorted(s.files), "report": reports[k]["report"], "age": age,
                                        "sex": sex, "notes": {"grouped_by": s.grouped_by, "age_from": age_from,
                                                              "sex_from": sex_from}}))
        for k in sorted(set(reports) - used):
            issues.append(Issue(self.reports_csv, f"{self.reports_csv}: report row {k!r} without a DICOM series", k))
        return recs, issues

    def load(self, record: Record) -> dict:
        p = record.payload
        hu, affine, notes = load_series(p["files"], record.file)
        return {"hu_ijk": hu, "affine": affine, "report": p["report"], "age": p["age"] or None,
                "sex": p["sex"] or None,
                "notes": {**notes, **p["notes"], "hu_source": "DICOM RescaleSlope/Intercept"}}
