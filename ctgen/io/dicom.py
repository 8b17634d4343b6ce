"""DICOM CT series: find series in a folder tree, check them, and load them as HU with real geometry.

Slices are grouped by SeriesInstanceUID and ordered by ImagePositionPatient projected on the slice
normal (row direction x column direction), never by file name or InstanceNumber. Files whose
SeriesInstanceUID is blank (anonymised exports) are grouped by folder and geometry instead: files
in one folder with the same ImageOrientationPatient, PixelSpacing and matrix size form a series
(so a localizer beside the axial slices becomes a series of its own). Compressed
transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) decode through pydicom's pixel-data plugins
(pylibjpeg with its openjpeg and libjpeg back-ends, installed with ctgen).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ctgen.volume import VolumeError, apply_rescale


BY_UID = "SeriesInstanceUID"
BY_GEOMETRY = "folder and geometry (no SeriesInstanceUID)"


@dataclasses.dataclass
class Series:
    """The files of one series and the header fields that sources need.

    uid: the SeriesInstanceUID, or for files without one `folder:<path under root>` (with `#<n>`
      when one folder holds several geometries); grouped_by says which (BY_UID / BY_GEOMETRY).
    folder: the top-level folder under the scanned root (the study folder of a PACS export).
    """

    uid: str
    files: list[str]
    study_uid: str = ""
    patient_id: str = ""
    age: str = ""
    sex: str = ""
    folder: str = ""
    grouped_by: str = BY_UID


def _text(ds, keyword: str) -> str:
    """A header string, "" when absent or empty (anonymisers blank or remove tags)."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _geometry(ds) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
    """(ImageOrientationPatient, PixelSpacing, (Rows, Columns)) of a header, None if any is missing."""
    try:
        iop = np.asarray([float(x) for x in ds.ImageOrientationPatient], np.float64)
        spacing = np.asarray([float(x) for x in ds.PixelSpacing], np.float64)
        shape = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError):
        return None
    return (iop, spacing, shape) if iop.shape == (6,) and spacing.shape == (2,) else None


def _same_geometry(a, b) -> bool:
    """The tolerances `load_series` accepts within one series."""
    return a[2] == b[2] and np.allclose(a[0], b[0], atol=1e-4) and np.allclose(a[1], b[1], rtol=1e-3)


def scan_series(root: str) -> tuple[dict[str, Series], list[tuple[str, str]]]:
    """All series under `root` and (file, problem) pairs for DICOM-looking files that cannot be used."""
    series: dict[str, Series] = {}
    unnamed: dict[str, list[tuple[tuple, Series]]] = {}  # folder -> (geometry, series) of files without a UID
    problems = []
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        for n in sorted(names):
            path = os.path.join(dirpath, n)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:
                if n.lower().endswith((".dcm", ".dicom")):
                    problems.append((path, f"{path}: not a readable DICOM file"))
                continue
            except Exception as e:
                problems.append((path, f"{path}: cannot read DICOM header ({type(e).__name__}: {e})"))
                continue
            uid = _text(ds, "SeriesInstanceUID")
            fields = dict(study_uid=_text(ds, "StudyInstanceUID"), patient_id=_text(ds, "PatientID"),
                          age=_text(ds, "PatientAge"), sex=_text(ds, "PatientSex"),
                          folder=rel.split(os.sep)[0] if rel != "." else os.path.basename(root))
            if uid:
                series.setdefault(uid, Series(uid=uid, files=[], **fields)).files.append(path)
                continue
            geometry = _geometry(ds)
            if geometry is None:
                problems.append((path, f"{path}: no SeriesInstanceUID, and no ImageOrientationPatient / PixelSpacing / "
                                       "Rows / Columns to group it by"))
                continue
            groups = unnamed.setdefault(rel, [])
            match = next((s for g, s in groups if _same_geometry(g, geometry)), None)
            if match is None:
                match = Series(uid="", files=[], grouped_by=BY_GEOMETRY, **fields)
                groups.append((geometry, match))
            match.files.append(path)
    for rel, groups in unnamed.items():
        name = "folder:" + (os.path.basename(os.path.abspath(root)) if rel == "." else rel.replace(os.sep, "/"))
        for k, (_, s) in enumerate(groups, start=1):
            s.uid = name if len(groups) == 1 else f"{name}#{k}"
            series[s.uid] = s
    return series, problems


def _vec(ds, tag: str, n: int, path: str) -> np.ndarray:
    v = ds.get(tag)
    if v is None or len(v) != n:
        raise VolumeError(f"{path}: missing or malformed {tag}")
    return np.asarray([float(x) for x in v], np.float64)


def load_series(files: Sequence[str], name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read one CT series. Returns (HU float32 array in (i=col, j=row, k=slice) order, voxel-to-RAS affine, notes).

    Raises VolumeError for: non-CT modality, single 2-D images, mixed orientation or matrix size,
    duplicated slices, missing slices (a gap above 1.5x the usual step) and otherwise irregular
    slice spacing (steps differing by more than 5 % of the usual step).
    """
    if len(files) < 2:
        raise VolumeError(f"{name}: a single image ({files[0] if files else 'no file'}), not a 3-D series")
    dss = []
    for f in files:
        try:
            dss.append(pydicom.dcmread(f))
        except Exception as e:
            raise VolumeError(f"{f}: cannot read DICOM ({type(e).__name__}: {e})") from None
    modality = str(dss[0].get("Modality", ""))
    if modality != "CT":
        raise VolumeError(f"{name}: modality {modality or 'unknown'!r} is not CT")
    if int(dss[0].get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(f"{name}: multi-frame (enhanced) DICOM is not supported; export classic single-frame slices")
    iop = _vec(dss[0], "ImageOrientationPatient", 6, files[0])
    shape = (int(dss[0].Rows), int(dss[0].Columns))
    spacing_rc = _vec(dss[0], "PixelSpacing", 2, files[0])
    for ds, f in zip(dss, files):
        if not np.allclose(_vec(ds, "ImageOrientationPatient", 6, f), iop, atol=1e-4):
            raise VolumeError(f"{name}: slices have different ImageOrientationPatient ({f})")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise VolumeError(f"{name}: slices have different matrix sizes ({f})")
        if not np.allclose(_vec(ds, "PixelSpacing", 2, f), spacing_rc, rtol=1e-3):
            raise VolumeError(f"{name}: inconsistent PixelSpacing between slices ({f})")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.stack([_vec(ds, "ImagePositionPatient", 3, f) for ds, f in zip(dss, files)])
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    proj, pos = proj[order], pos[order]
    dss = [dss[i] for i in order]
    files = [files[i] for i in order]
    steps = np.diff(proj)
    step = float(np.median(steps))
    dup = np.nonzero(steps < max(1e-3, 0.01 * step))[0]
    if step <= 1e-3 or dup.size:
        i = int(dup[0]) if dup.size else 0
        raise VolumeError(f"{name}: duplicated slice at position {proj[i]:.2f} mm ({files[i]} and {files[i + 1]})")
    gaps = np.nonzero(steps > 1.5 * step)[0]
    if gaps.size:
        i = int(gaps[0])
        raise VolumeError(f"{name}: missing slice(s): gap of {steps[i]:.2f} mm between {proj[i]:.2f} and "
                          f"{proj[i + 1]:.2f} mm (usual step {step:.2f} mm)")
    if steps.max() - steps.min() > 0.05 * step:
        raise VolumeError(f"{name}: inconsistent slice spacing ({steps.min():.3f} to {steps.max():.3f} mm)")
    if not np.allclose(pos[-1] - pos[0], normal * (proj[-1] - proj[0]), atol=max(0.5, 0.1 * step)):
        raise VolumeError(f"{name}: slice positions do not lie along the slice normal (gantry tilt?)")
    syntaxes = sorted({ds.file_meta.TransferSyntaxUID.name for ds in dss if hasattr(ds, "file_meta")
                       and "TransferSyntaxUID" in ds.file_meta})
    slices = []
    for ds, f in zip(dss, files):
        try:
            px = ds.pixel_array
        except Exception as e:
            raise VolumeError(f"{f}: cannot decode pixel data ({type(e).__name__}: {e})") from None
        if px.ndim != 2:
            raise VolumeError(f"{f}: pixel data of shape {px.shape} is not a single grayscale image")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(apply_rescale(px, slope, inter))
    vol_kji = np.stack(slices)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing_rc[1]
    lps[:3, 1] = col_dir * spacing_rc[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = pos[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    notes = {"series_uid": _text(dss[0], "SeriesInstanceUID"), "slices": len(dss), "transfer_syntax": syntaxes}
    return np.ascontiguousarray(vol_kji.transpose(2, 1, 0)), affine, notes
