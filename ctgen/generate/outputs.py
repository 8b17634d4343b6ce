"""A generated sample's files, written so that nothing half-written ever looks finished.

    OUT/<name>.nii.gz                 int16 HU, canonical orientation, real spacing (docs/generate.md)
    OUT/previews/<name>.png           axial / coronal / sagittal at lung and mediastinal windows
    OUT/dicom/<name>/IM0001.dcm ...   with --dicom: a CT series marked as synthetic
    OUT/provenance/<name>.json        prompt, seed, settings, checkpoints, versions, time, memory, files

Every file (and the DICOM folder) is written under a hidden temporary name in its final
directory (`.tmp-<random>.<final name>`) and renamed into place (`os.replace`, atomic on one
file system). The provenance JSON is the completion marker: it is removed before a sample is
(re)written and written last, listing every output with its size and sha256. A sample counts as
finished only if its marker parses and every file it lists is there with its recorded size;
anything else (an interrupted run's leftovers included) is written again. A NIfTI can therefore
be complete while its sample is not (a run stopped before the marker): `unfinished_volumes`
names those, and `ctgen eval --generated` leaves them out.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import time
import uuid
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ctgen.errors import UserError
from ctgen.generate.prompts import Sample
from ctgen.generate.provenance import FORMAT, sha256_file
from ctgen.io.dicom_write import SeriesInfo, write_ct_series
from ctgen.io.nifti import write_nifti
from ctgen.io.preview import write_planes
from ctgen.volume import LUNG_WINDOW, MEDIASTINAL_WINDOW, canonical_affine, hu_to_model, to_int16_hu

PREVIEWS, DICOM, PROVENANCE = "previews", "dicom", "provenance"
TMP_PREFIX = ".tmp-"


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    nifti: str
    preview: str
    dicom: str
    provenance: str


def output_paths(out_dir: str, name: str) -> OutputPaths:
    return OutputPaths(nifti=os.path.join(out_dir, f"{name}.nii.gz"),
                       preview=os.path.join(out_dir, PREVIEWS, f"{name}.png"),
                       dicom=os.path.join(out_dir, DICOM, name),
                       provenance=os.path.join(out_dir, PROVENANCE, f"{name}.json"))


def ensure_writable(out_dir: str) -> str:
    """Create `out_dir` and prove a file can be written there; the absolute path, or UserError
    naming the directory and the system's reason."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}.probe")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot write there ({e.strerror or e})") from None
    return out_dir


def _temporary(final: str) -> str:
    return os.path.join(os.path.dirname(final), f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}.{os.path.basename(final)}")


@contextlib.contextmanager
def atomic_path(final: str) -> Iterator[str]:
    """Yields a temporary path beside `final` (same extension); on success the file or folder
    written there replaces `final` in one rename; on failure it is removed."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = _temporary(final)
    try:
        yield tmp
        if os.path.isdir(final) and not os.path.islink(final):
            shutil.rmtree(final)  # a folder cannot be replaced by rename; the marker is gone already
        os.replace(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, data: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")


def read_marker(out_dir: str, name: str) -> dict | None:
    """The provenance of a finished sample, or None if the sample is not (completely) there."""
    path = output_paths(out_dir, name).provenance
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("name") != name:
        return None
    for entry in _listed_files(record):
        full = os.path.join(out_dir, entry["path"])
        if not os.path.isfile(full) or os.path.getsize(full) != entry["bytes"]:
            return None
    return record


def is_generate_folder(out_dir: str) -> bool:
    """Whether `ctgen generate` writes to `out_dir`: its `provenance/` holds one of generate's
    records, or nothing yet (generate makes the folder before the first volume)."""
    folder = os.path.join(out_dir, PROVENANCE)
    if not os.path.isdir(folder):
        return False
    records = sorted(f for f in os.listdir(folder) if f.endswith(".json") and not f.startswith("."))
    for name in records:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                if str(json.load(f).get("format", "")).startswith("ctgen-generate"):
                    return True
        except (OSError, ValueError, AttributeError):
            continue
    return not records


def unfinished_volumes(out_dir: str) -> list[str]:
    """In a folder `ctgen generate` writes to (`is_generate_folder`), the top-level `<name>.nii.gz`
    files that are not a finished sample by `read_marker`: a volume whose run stopped before its
    provenance was written, one being made again, or any other file there. [] for other folders."""
    if not is_generate_folder(out_dir):
        return []
    names = sorted(f for f in os.listdir(out_dir) if f.endswith(".nii.gz") and not f.startswith("."))
    return [os.path.join(out_dir, f) for f in names if read_marker(out_dir, f[: -len(".nii.gz")]) is None]


def _listed_files(record: Mapping[str, Any]) -> list[dict]:
    files = []
    for output in (record.get("outputs") or {}).values():
        files.extend(output["files"] if "files" in output else [output])
    return files


def clear_sample(out_dir: str, name: str) -> None:
    """Remove a sample's marker first (it stops counting as finished), then any temporary leftovers."""
    paths = output_paths(out_dir, name)
    if os.path.exists(paths.provenance):
        os.remove(paths.provenance)
    for final in (paths.nifti, paths.preview, paths.dicom, paths.provenance):
        if not os.path.isdir(os.path.dirname(final)):
            continue
        for tmp in glob.glob(os.path.join(glob.escape(os.path.dirname(final)),
                                          f"{TMP_PREFIX}*.{glob.escape(os.path.basename(final))}")):
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)


def centred_origin(shape_dhw: Sequence[int], spacing_dhw: Sequence[float]) -> tuple[float, float, float]:
    """LPS position (mm) of voxel (0, 0, 0) that puts the volume's centre at the origin."""
    d, h, w = ((int(n) - 1) * float(s) / 2.0 for n, s in zip(shape_dhw, spacing_dhw))
    return (-w, -h, -d)


def _file_entry(out_dir: str, path: str) -> dict[str, Any]:
    return {"path": os.path.relpath(path, out_dir), "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def write_sample(out_dir: str, sample: Sample, hu_DxHxW: np.ndarray, spacing_dhw: Sequence[float], record: dict,
                 *, dicom: SeriesInfo | None = None, preview: bool = True) -> dict[str, Any]:
    """Write one sample's files (canonical HU volume, spacing in mm) and then its provenance:
    `record` plus geometry, outputs (path, bytes, sha256) and the seconds spent writing.
    Returns the provenance as written."""
    start = time.perf_counter()
    clear_sample(out_dir, sample.name)
    paths = output_paths(out_dir, sample.name)
    # before any volume: the folder is then recognisably generate's (`unfinished_volumes`)
    os.makedirs(os.path.dirname(paths.provenance), exist_ok=True)
    hu = to_int16_hu(hu_DxHxW)
    origin = centred_origin(hu.shape, spacing_dhw)
    outputs: dict[str, Any] = {}
    with atomic_path(paths.nifti) as tmp:
        write_nifti(tmp, hu, spacing_dhw, origin)
    outputs["nifti"] = _file_entry(out_dir, paths.nifti)
    if preview:
        model = hu_to_model(hu)
        with atomic_path(paths.preview) as tmp:
            write_planes(tmp, [model, model], caption=f"{sample.name}: {sample.prompt}",
                         windows=[LUNG_WINDOW, MEDIASTINAL_WINDOW])
        outputs["preview"] = _file_entry(out_dir, paths.preview)
    if dicom is not None:
        with atomic_path(paths.dicom) as tmp:
            files = write_ct_series(tmp, hu, spacing_dhw, origin, dicom)
            names = [os.path.basename(f) for f in files]
        outputs["dicom"] = {"path": os.path.relpath(paths.dicom, out_dir),
                            "files": [_file_entry(out_dir, os.path.join(paths.dicom, n)) for n in names]}
    provenance = {
        "format": FORMAT, **record, "name": sample.name,
        "geometry": {"shape_dhw": [int(n) for n in hu.shape], "spacing_mm_dhw": [float(s) for s in spacing_dhw],
                     "origin_lps_mm": list(origin), "orientation": "LPS (slice 0 inferior, row 0 anterior, "
                     "column 0 the patient's right)", "affine": canonical_affine(spacing_dhw, origin).tolist()},
        "outputs": outputs,
    }
    provenance["seconds"] = {**record.get("seconds", {}), "write": round(time.perf_counter() - start, 3)}
    write_json(paths.provenance, provenance)
    return provenance
