"""Data sources for `ctgen prepare`: synthetic phantoms and a NIfTI folder described by a CSV.

A source lists its inputs as `writer.Record`s (plus `writer.Issue`s for problems found in the
listings) and loads one record at a time in a worker process. CT-RATE is in `ctrate.py`, DICOM
series in `dicom_source.py`.
"""
from __future__ import annotations

import csv
import glob
import os
import re
from typing import Iterable

import numpy as np

from ctgen.data.phantom import make_phantom
from ctgen.data.preprocess import GridConfig, to_grid
from ctgen.data.writer import Issue, Record
from ctgen.io.nifti import read_nifti
from ctgen.volume import VolumeError, clip_hu, extent_spacing, to_int16_hu


# ----------------------------------------------------------------------------- CSV helpers
def read_csv(path: str) -> tuple[list[dict], list[Issue]]:
    """Rows of a CSV as dicts (UTF-8, BOM tolerated; cp1252 fallback reported as an issue)."""
    issues = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError:
        with open(path, encoding="cp1252", errors="replace", newline="") as f:
            rows = list(csv.DictReader(f))
        issues.append(Issue(path, f"{path}: not valid UTF-8; read as Windows-1252", status="warning"))
    except FileNotFoundError:
        raise VolumeError(f"{path}: CSV file not found") from None
    return [{(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items()} for r in rows], issues


def require_columns(path: str, rows: list[dict], columns: Iterable[str]) -> None:
    have = set(rows[0]) if rows else set()
    missing = [c for c in columns if c and c not in have]
    if rows and missing:
        raise VolumeError(f"{path}: missing column(s) {missing}; found {sorted(have)}")


def parse_floats(text: str) -> list[float]:
    """"[0.75, 0.75]" / "0.75,0.75" / "0.75 0.75" -> [0.75, 0.75] (empty on failure)."""
    try:
        return [float(t) for t in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(text or ""))]
    except ValueError:
        return []


def nifti_stem(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def find_niftis(root: str) -> list[str]:
    pats = ("**/*.nii.gz", "**/*.nii")
    return sorted({os.path.normpath(p) for pat in pats for p in glob.glob(os.path.join(root, pat), recursive=True)})


# ----------------------------------------------------------------------------- phantoms
class PhantomSource:
    """`count` synthetic chest phantoms; phantom i is drawn from seed (seed, i).

    supersample: 1 renders each phantom on the grid itself, every voxel taking the tissue at its
    centre (no partial volume: a 13 mm muscle layer is one or two full-density voxels at 11 mm, or
    missing). K > 1 renders it at K times the in-plane resolution and averages it down with the
    antialiased resize `ctgen prepare` applies to real CT (HU clipped to [-1000, 1000] first), so
    edges are partial-volumed and the voxel noise drops by about K. A phantom prepared at 32 x 32
    with K = 4 is then the 128 x 128 phantom (same seed, same extent) resized to 32 x 32 as
    `ctgen prepare --source sr-pairs` and the SR evaluation make their low-res inputs (up to the
    int16 rounding of storage). Label maps are the fine render's label at each coarse voxel's
    centre; the attributes (the phantom's truth) are measured on the fine render.
    """

    kind = "phantom"

    def __init__(self, count: int, seed: int, grid: GridConfig, p_normal: float = 0.3, supersample: int = 1):
        if count < 1:
            raise ValueError("phantom count must be at least 1")
        if int(supersample) != supersample or supersample < 1:
            raise ValueError(f"phantom supersample must be a whole number >= 1, got {supersample}")
        self.count, self.seed, self.grid, self.p_normal = int(count), int(seed), grid, float(p_normal)
        self.supersample = int(supersample)

    def grid_spacing(self) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        D, H, W = self.grid.shape
        if self.grid.spacing is not None:
            dz, dy, dx = self.grid.spacing
            D = D if D is not None else int(round(300.0 / dz)) | 1
            return (D, H, W), (dz, dy, dx)
        return (D, H, W), extent_spacing((D, H, W))

    def fingerprint(self) -> dict:
        fp = {"kind": self.kind, "count": self.count, "seed": self.seed, "p_normal": self.p_normal}
        if self.supersample > 1:  # absent at 1, so datasets prepared before the option keep their fingerprint
            fp["supersample"] = self.supersample
        return fp

    def scan(self) -> tuple[list[Record], list[Issue]]:
        recs = []
        for i in range(self.count):
            sid = f"phantom_{self.seed}_{i:06d}"
            seed = int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0])
            recs.append(Record(source_id=sid, patient_id=sid, file=f"<phantom seed={self.seed} index={i}>", payload=seed))
        return recs, []

    def load(self, record: Record) -> dict:
        shape, spacing = self.grid_spacing()
        k = self.supersample
        if k == 1:
            ph = make_phantom(record.payload, shape, spacing, p_normal=self.p_normal)
            hu, labels, attributes = ph.hu, ph.labels, ph.attributes
        else:
            (d, h, w), (dz, dy, dx) = shape, spacing
            ph = make_phantom(record.payload, (d, h * k, w * k), (dz, dy / k, dx / k), p_normal=self.p_normal)
            hu = to_int16_hu(to_grid(clip_hu(ph.hu.astype(np.float32)), ph.spacing, self.grid)[0])  # as real CT
            labels = np.ascontiguousarray(ph.labels[:, k // 2::k, k // 2::k])
            attributes = {**ph.attributes, "shape": [int(n) for n in shape], "spacing": [float(x) for x in spacing],
                          "supersample": k}
        return {"volume_DxHxW": hu, "spacing": np.asarray(spacing, np.float32), "labels": labels,
                "attributes": attributes,
                "report": ph.report, "age": attributes["age"], "sex": attributes["sex"], "orientation": "LPS",
                "notes": {"attributes": {"normal": attributes["normal"]}}}


# ----------------------------------------------------------------------------- NIfTI + CSV
def header_spacing_ok(spacing_ijk: np.ndarray, has_geometry: bool) -> bool:
    """False for headers without geometry or with the 1,1,1 placeholder spacing."""
    return bool(has_geometry and np.all(spacing_ijk > 0) and not np.allclose(spacing_ijk, 1.0))


def resolve_spacing(vol, csv_spacing_ijk: list[float] | None, name: str):
    """Spacing to use for a NIfTI, and where it came from; raises on header/CSV disagreement (over 2 %)."""
    header_ok = header_spacing_ok(vol.spacing_ijk, vol.has_geometry)
    if csv_spacing_ijk:
        csv_sp = np.asarray(csv_spacing_ijk, np.float64)
        if header_ok:
            if not np.allclose(np.sort(csv_sp), np.sort(vol.spacing_ijk), rtol=0.02):
                raise VolumeError(f"{name}: inconsistent spacing: header {np.round(vol.spacing_ijk, 4).tolist()} mm "
                                  f"vs CSV {np.round(csv_sp, 4).tolist()} mm")
            return None, "header (agrees with CSV)"
        return csv_sp, "csv (header has none)"
    if not header_ok:
        if not vol.has_geometry:
            raise VolumeError(f"{name}: header has no geometry (qform/sform) and no spacing was given in the CSV")
        return None, "header (1 mm placeholder?)"
    return None, "header"


class NiftiCsvSource:
    """NIfTI files listed in a CSV with a path column and a report text column.

    text_column fills the `impression` (the paper prompt's text); findings_column (optional)
    fills `findings`. Optional columns: id (default: file name), patient (default: id), age, sex,
    spacing (voxel sizes of the file's i, j, k axes in mm, used when the header lacks them).
    Paths are relative to `root` (default: the CSV's folder); NIfTI files under `root` that no
    row names are reported as "volume without a report".
    """

    kind = "nifti"

    def __init__(self, csv_path: str, root: str | None = None, *, path_column: str = "path",
                 text_column: str = "text", findings_column: str | None = None, id_column: str | None = None,
                 patient_column: str | None = None, age_column: str | None = "age",
                 sex_column: str | None = "sex", spacing_column: str | None = "spacing"):
        self.csv_path = os.path.abspath(csv_path)
        self.root = os.path.abspath(root or os.path.dirname(self.csv_path))
        self.cols = {"path": path_column, "text": text_column, "findings": findings_column, "id": id_column,
                     "patient": patient_column, "age": age_column, "sex": sex_column, "spacing": spacing_column}

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "csv": self.csv_path, "root": self.root, "columns": self.cols,
                "csv_mtime": os.path.getmtime(self.csv_path) if os.path.exists(self.csv_path) else None}

    def scan(self) -> tuple[list[Record], list[Issue]]:
        rows, issues = read_csv(self.csv_path)
        c = self.cols
        require_columns(self.csv_path, rows, [c["path"], c["text"]])
        seen: dict[str, int] = {}
        recs: dict[str, Record] = {}
        referenced = set()
        for n, row in enumerate(rows, start=2):  # line 1 is the header
            where = f"{self.csv_path}:{n}"
            rel = row.get(c["path"]) or ""
            if not rel:
                issues.append(Issue(where, f"{where}: empty {c['path']!r}"))
                continue
            path = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(self.root, rel))
            referenced.add(path)
            sid = (row.get(c["id"]) if c["id"] else None) or nifti_stem(path)
            if sid in seen:
                issues.append(Issue(where, f"{where}: duplicate id {sid!r} (first on line {seen[sid]}); both rows skipped", sid))
                recs.pop(sid, None)
                continue
            seen[sid] = n
            if not os.path.exists(path):
                issues.append(Issue(where, f"{where}: report row without a volume: {path} does not exist", sid))
                continue
            text = row.get(c["text"]) or ""
            if not text:
                issues.append(Issue(path, f"{path}: volume without a report (empty {c['text']!r} on line {n})", sid))
                continue
            report = {"impression": text, "findings": row.get(c["findings"], "") if c["findings"] else ""}
            payload = {"path": path, "report": report, "age": row.get(c["age"]) if c["age"] else None,
                       "sex": row.get(c["sex"]) if c["sex"] else None,
                       "spacing": parse_floats(row.get(c["spacing"], "")) if c["spacing"] else []}
            pid = (row.get(c["patient"]) if c["patient"] else None) or sid
            recs[sid] = Record(source_id=sid, patient_id=pid, file=path, payload=payload)
        for path in find_niftis(self.root):
            if path not in referenced:
                issues.append(Issue(path, f"{path}: volume without a report (not listed in {self.csv_path})",
                                    nifti_stem(path)))
        return sorted(recs.values(), key=lambda r: r.source_id), issues

    def load(self, record: Record) -> dict:
        p = record.payload
        vol = read_nifti(p["path"])
        spacing = p["spacing"] if len(p["spacing"]) == 3 else None
        if p["spacing"] and spacing is None:
            raise VolumeError(f"{p['path']}: spacing column {p['spacing']} does not have 3 values")
        sp, sp_src = resolve_spacing(vol, spacing, p["path"])
        return {"hu_ijk": vol.data_ijk, "affine": vol.affine, "spacing_ijk": sp, "report": p["report"],
                "age": p["age"], "sex": p["sex"], "warnings": orientation_warnings(vol),
                "notes": {"spacing_source": sp_src, "hu_source": "header" if vol.header_scaled else "as stored"}}


def orientation_warnings(vol) -> list[str]:
    """A header without qform/sform gives no orientation: say that the axes were assumed RAS."""
    return [] if vol.has_geometry else ["header has no orientation (qform/sform); voxel axes assumed RAS"]
