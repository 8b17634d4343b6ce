"""NIfTI reading (with checks a user can act on) and writing with real geometry."""
from __future__ import annotations

import dataclasses
import os
import zlib

import nibabel as nib
import numpy as np

from ctgen.volume import VolumeError, canonical_affine, voxel_sizes


@dataclasses.dataclass
class NiftiVolume:
    """A NIfTI image in file order.

    data_ijk: float32 array as stored, with the header's scl_slope/scl_inter applied if set.
    header_scaled: the header carried a scaling (so `data_ijk` is already rescaled).
    has_geometry: the header had a qform or sform (orientation and spacing can be trusted).
    """

    path: str
    data_ijk: np.ndarray
    affine: np.ndarray
    spacing_ijk: np.ndarray
    header_scaled: bool
    has_geometry: bool


def _header_scaling(img: nib.Nifti1Image) -> bool:
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    return not (slope in (None, 1.0) and inter in (None, 0.0))


def read_nifti(path: str) -> NiftiVolume:
    """Read a 3-D NIfTI (`.nii` or `.nii.gz`); raise VolumeError naming the file on any problem."""
    name = os.fspath(path)
    try:
        img = nib.load(name)
    except Exception as e:  # nibabel raises many types for a bad header
        raise VolumeError(f"{name}: cannot read NIfTI header ({type(e).__name__}: {e})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{name}: not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 2:
        raise VolumeError(f"{name}: not a 3-D volume (shape {img.shape})")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, zlib.error, OSError, ValueError) as e:
        raise VolumeError(f"{name}: truncated or corrupt image data ({type(e).__name__}: {e})") from None
    hdr = img.header
    qcode = int(hdr["qform_code"]) if "qform_code" in hdr else 0
    scode = int(hdr["sform_code"]) if "sform_code" in hdr else 0
    affine = np.asarray(img.affine, np.float64)
    return NiftiVolume(
        path=name,
        data_ijk=data,
        affine=affine,
        spacing_ijk=voxel_sizes(affine),
        header_scaled=_header_scaling(img),
        has_geometry=(qcode > 0 or scode > 0),
    )


def write_nifti(path: str, vol_DxHxW: np.ndarray, spacing_dhw, origin_lps=(0.0, 0.0, 0.0)) -> None:
    """Write a canonical (D, H, W) volume as NIfTI with a real affine (voxel axes LPS)."""
    affine = canonical_affine(spacing_dhw, origin_lps)
    img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(vol_DxHxW).transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, os.fspath(path))
