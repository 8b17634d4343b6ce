"""Writing a canonical HU volume as a DICOM CT series (one file per axial slice).

The geometry is the NIfTI writer's (`ctgen.volume.canonical_affine`): rows run toward the
patient's back, columns toward the patient's left, slices toward the head, so every slice has
ImageOrientationPatient 1\\0\\0\\0\\1\\0 and ImagePositionPatient = origin + k * slice spacing along
S. Stored values are HU + 1024 as unsigned 16 bit with RescaleSlope 1 / RescaleIntercept -1024.
`ctgen.io.dicom.load_series` (what `ctgen prepare --source dicom` reads with) returns the same HU
volume and affine.

Synthetic volumes must never pass for a patient scan: `SeriesInfo` puts the words the caller gives
into SeriesDescription / DerivationDescription, and the writer sets ImageType DERIVED\\SECONDARY,
BurnedInAnnotation NO and a placeholder patient (no identity).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctgen.volume import HU_MAX, HU_MIN, LUNG_WINDOW, MEDIASTINAL_WINDOW

INTERCEPT = -1024.0
PATIENT_NAME = "SYNTHETIC^CTGEN"


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    """Descriptive fields of a written series. Texts are cut to their DICOM maximum length.

    patient_id: an identifier of the synthetic study (e.g. the sample name), not of a person;
    age / sex: optional demographics the volume was generated for ("64", "F").
    """

    series_description: str
    derivation_description: str
    patient_id: str
    software: str
    age: str = ""
    sex: str = ""
    comments: str = ""


def _ds(x: float) -> str:
    """A decimal string of at most 16 characters (DICOM DS) with as many digits as fit."""
    for digits in range(10, 3, -1):
        text = f"{float(x):.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{x} does not fit a DICOM decimal string")


def _text(value: str, limit: int) -> str:
    """A DICOM text value: no backslash (the multi-value separator), at most `limit` characters."""
    return " ".join(str(value).replace("\\", "/").split())[:limit]


def _age(age: str) -> str:
    try:
        years = int(float(age))
    except (TypeError, ValueError):
        return ""
    return f"{years:03d}Y" if 0 <= years < 1000 else ""


def _sex(sex: str) -> str:
    s = str(sex).strip().lower()
    return {"m": "M", "male": "M", "f": "F", "female": "F"}.get(s, "")


def write_ct_series(directory: str, hu_DxHxW: np.ndarray, spacing_dhw: Sequence[float],
                    origin_lps: Sequence[float], info: SeriesInfo) -> list[str]:
    """Write `hu_DxHxW` (canonical layout, HU) as `directory/IM0001.dcm ...`; returns the paths.

    InstanceNumber 1 is the most superior slice, as scanners number a head-first chest scan.
    New Study, Series, Frame of Reference and SOP Instance UIDs are generated on every call.
    """
    hu = np.asarray(hu_DxHxW, np.float32)
    if hu.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {hu.shape}")
    dz, dy, dx = (float(s) for s in spacing_dhw)
    stored = (np.rint(np.clip(hu, HU_MIN, HU_MAX)) - INTERCEPT).astype(np.uint16)
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    depth = hu.shape[0]
    paths = []
    for k in range(depth):
        instance = depth - k
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: prompts may hold any character
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.Modality = "CT"
        ds.Manufacturer = "ctgen"
        ds.SoftwareVersions = _text(info.software, 64)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.StudyDescription = "SYNTHETIC CT (ctgen), not a patient scan"
        ds.SeriesDescription = _text(info.series_description, 64)
        ds.DerivationDescription = _text(info.derivation_description, 1024)
        if info.comments:
            ds.ImageComments = _text(info.comments, 10240)
        ds.BurnedInAnnotation = "NO"
        ds.PatientName = PATIENT_NAME
        ds.PatientID = _text(info.patient_id, 64)
        ds.PatientBirthDate = ""
        ds.PatientSex = _sex(info.sex)
        if _age(info.age):
            ds.PatientAge = _age(info.age)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "synthetic volume: no patient"
        ds.AccessionNumber = ds.ReferringPhysicianName = ds.StudyID = ""
        ds.SeriesNumber, ds.InstanceNumber = 1, instance
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        z = float(origin_lps[2]) + k * dz
        ds.ImagePositionPatient = [_ds(origin_lps[0]), _ds(origin_lps[1]), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(dz)
        ds.PixelSpacing = [_ds(dy), _ds(dx)]  # between rows, between columns
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(INTERCEPT), "1", "HU"
        ds.WindowCenter = [_ds(LUNG_WINDOW[0]), _ds(MEDIASTINAL_WINDOW[0])]
        ds.WindowWidth = [_ds(LUNG_WINDOW[1]), _ds(MEDIASTINAL_WINDOW[1])]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = os.path.join(directory, f"IM{instance:04d}.dcm")
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)
