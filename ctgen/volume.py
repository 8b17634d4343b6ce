"""Volume geometry and value ranges: the conventions every part of ctgen shares (io/, data/, eval/, models' callers).

Canonical layout (a contract for all of ctgen)
-----------------------------------------------
A volume is a numpy array `vol_DxHxW` = (slices, rows, cols) of axial slices in the DICOM patient
frame LPS:

* D (slice axis) increases toward the patient's head (S): slice 0 is the most inferior slice;
* H (row axis) increases toward the patient's back (P): row 0 is anterior;
* W (column axis) increases toward the patient's left (L): column 0 is the patient's right.

So `vol[k]` shown as an image (row 0 at the top) is the usual radiological view from the feet:
anterior up, patient right on the viewer's left. In nibabel axis codes the array axes (D, H, W)
are ("S", "P", "L"); a NIfTI written with `canonical_affine` stores them as (i, j, k) = (W, H, D),
i.e. voxel axes "LPS". Oblique scans are brought to the nearest canonical axes without
resampling (the rotation is dropped; `orientation` records where the data came from).

`spacing` is always in millimetres in (D, H, W) order. `orientation` on an example is the
original file's voxel-axis codes in storage order (i, j, k), e.g. "RAS" or "LPS".

Value ranges (the only place these conversions live)
----------------------------------------------------
Stored: int16 HU clipped to [-1000, 1000]. CT-ViT and MaskGIT: HU / 1000 in [-1, 1].
Super-resolution: (HU / 1000 + 1) / 2 in [0, 1].

This module sits below io/ and data/ (it imports nothing from ctgen but `errors`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ctgen.errors import UserError

HU_MIN = -1000.0
HU_MAX = 1000.0
CANONICAL_AXCODES_IJK = ("L", "P", "S")  # canonical (D, H, W) = (S, P, L), stored as (i, j, k) = (W, H, D)
# Display windows (level, width) in HU, as radiology viewers show chest CT.
LUNG_WINDOW = (-600.0, 1500.0)
MEDIASTINAL_WINDOW = (50.0, 350.0)
# Body extent (mm, D/H/W) of ctgen's default grid: phantoms are rendered on it (spacing = extent / shape)
# and generated volumes, which have no scan of their own, are given it.
DEFAULT_EXTENT_MM = (301.5, 350.0, 350.0)


class VolumeError(UserError):
    """A volume that cannot be used; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- value ranges
def clip_hu(hu: np.ndarray) -> np.ndarray:
    return np.clip(hu, HU_MIN, HU_MAX)


def hu_to_model(hu: np.ndarray) -> np.ndarray:
    """HU -> CT-ViT / MaskGIT range [-1, 1] (float32), clipping first."""
    return (clip_hu(np.asarray(hu, np.float32)) / np.float32(HU_MAX)).astype(np.float32)


def model_to_hu(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> HU (float32), clipping out-of-range model outputs."""
    return (np.clip(np.asarray(x, np.float32), -1.0, 1.0) * np.float32(HU_MAX)).astype(np.float32)


def hu_to_sr(hu: np.ndarray) -> np.ndarray:
    """HU -> super-resolution range [0, 1] (float32)."""
    return ((hu_to_model(hu) + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)


def sr_to_hu(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> HU (float32)."""
    return model_to_hu(np.asarray(x, np.float32) * np.float32(2.0) - np.float32(1.0))


def model_to_sr(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1]."""
    return ((np.clip(np.asarray(x, np.float32), -1.0, 1.0) + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)


def sr_to_model(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1]."""
    return (np.clip(np.asarray(x, np.float32), 0.0, 1.0) * np.float32(2.0) - np.float32(1.0)).astype(np.float32)


def to_int16_hu(hu: np.ndarray) -> np.ndarray:
    """Clip to [-1000, 1000] and round to the int16 storage format."""
    return np.rint(clip_hu(np.asarray(hu, np.float32))).astype(np.int16)


def apply_rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values -> HU (float32) with DICOM RescaleSlope / RescaleIntercept."""
    return np.asarray(stored, np.float32) * np.float32(slope) + np.float32(intercept)


# ----------------------------------------------------------------------------- orientation
def axcodes(affine: np.ndarray) -> str:
    """nibabel axis codes of a voxel-to-RAS affine, e.g. "RAS"."""
    from nibabel import orientations as nio  # lazily: `ctgen --help` must not pay for nibabel

    return "".join(nio.aff2axcodes(affine))


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) of the (i, j, k) axes of an affine."""
    return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def to_canonical(vol_ijk: np.ndarray, affine: np.ndarray,
                 spacing_ijk: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Reorient a 3-D array with voxel-to-RAS `affine` to the canonical (D, H, W) layout.

    spacing_ijk: voxel sizes to use instead of the affine's (e.g. from a CSV when the header
      lacks them). Returns `(vol_DxHxW, spacing_dhw float32 (3,), original axis codes)`.
    """
    if vol_ijk.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {vol_ijk.shape}")
    from nibabel import orientations as nio

    ornt = nio.io_orientation(affine)
    if np.isnan(ornt).any():
        raise ValueError("affine has a degenerate axis; cannot determine orientation")
    xform = nio.ornt_transform(ornt, nio.axcodes2ornt(CANONICAL_AXCODES_IJK))
    vol_whd = nio.apply_orientation(vol_ijk, xform)
    sizes = voxel_sizes(affine) if spacing_ijk is None else np.asarray(spacing_ijk, np.float64)
    spacing_whd = np.empty(3, np.float64)
    spacing_whd[xform[:, 0].astype(int)] = sizes
    vol_DxHxW = np.ascontiguousarray(vol_whd.transpose(2, 1, 0))
    return vol_DxHxW, spacing_whd[::-1].astype(np.float32), axcodes(affine)


def extent_spacing(shape_dhw: Sequence[int], extent_mm: Sequence[float] = DEFAULT_EXTENT_MM) -> tuple[float, float, float]:
    """Voxel spacing (mm, D/H/W) of a grid of `shape_dhw` voxels spanning `extent_mm`."""
    return tuple(float(e) / int(n) for e, n in zip(extent_mm, shape_dhw))


def canonical_affine(spacing_dhw: Sequence[float], origin_lps: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel-to-RAS affine for a canonical volume stored as (i, j, k) = (W, H, D), i.e. `vol.transpose(2, 1, 0)`.

    origin_lps: LPS position (mm) of voxel (0, 0, 0).
    """
    dz, dy, dx = (float(s) for s in spacing_dhw)
    aff = np.diag([-dx, -dy, dz, 1.0])  # i -> L (= -R), j -> P (= -A), k -> S
    aff[:3, 3] = [-origin_lps[0], -origin_lps[1], origin_lps[2]]
    return aff
