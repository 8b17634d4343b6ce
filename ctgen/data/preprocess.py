"""Preprocessing shared by every data source: a HU volume in file order -> an example on the grid.

Orientation, geometry and value ranges (the canonical (D, H, W) layout, HU <-> [-1, 1] <-> [0, 1])
are `ctgen.volume`'s; this module adds grid resampling, sanity checks and `preprocess`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ctgen.errors import UserError
from ctgen.volume import HU_MIN, VolumeError, clip_hu, to_canonical, to_int16_hu


# ----------------------------------------------------------------------------- resampling
def _resize_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights (half-pixel centres, edge replicate).

    Downsampling with `antialias` widens the triangle filter by the scale factor (as PIL's
    bilinear resize does), so every input voxel contributes.
    """
    scale = n_in / n_out
    support = max(scale, 1.0) if antialias else 1.0
    centre = (np.arange(n_out) + 0.5) * scale - 0.5
    src = np.arange(n_in)
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centre[:, None]) / support)
    empty = w.sum(1) == 0  # only possible without antialias far outside: replicate nearest
    if empty.any():
        idx = np.clip(np.rint(centre[empty]).astype(int), 0, n_in - 1)
        w[np.nonzero(empty)[0], idx] = 1.0
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def resize_axis(x: np.ndarray, n_out: int, axis: int, antialias: bool = True) -> np.ndarray:
    """Linearly resize one axis of a 3-D float32 array to `n_out` samples."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    m = _resize_matrix(n_in, n_out, antialias)
    if axis == 0:
        return (m @ x.reshape(n_in, -1)).reshape((n_out,) + x.shape[1:])
    if axis == 1:
        return np.matmul(m, x)
    if axis == 2:
        return np.matmul(x, m.T)
    raise ValueError(f"axis must be 0, 1 or 2, got {axis}")


def resize_volume(vol: np.ndarray, shape_dhw: Sequence[int], antialias: bool = True) -> np.ndarray:
    """Separable (anti-aliased) linear resize of a (D, H, W) array to `shape_dhw` (float32).

    Axes are processed in order of decreasing reduction, so the most expensive pass runs on the
    smallest array.
    """
    x = np.asarray(vol, np.float32)
    order = sorted(range(3), key=lambda a: shape_dhw[a] / x.shape[a])
    for a in order:
        x = resize_axis(x, int(shape_dhw[a]), a, antialias)
    return x


def _crop_or_pad(x: np.ndarray, shape: Sequence[int], fill: float) -> np.ndarray:
    """Centre-crop or pad (with `fill`) each axis to `shape`."""
    out = x
    for a, n in enumerate(shape):
        cur = out.shape[a]
        if cur > n:
            start = (cur - n) // 2
            out = np.take(out, np.arange(start, start + n), axis=a)
        elif cur < n:
            before = (n - cur) // 2
            pad = [(0, 0)] * 3
            pad[a] = (before, n - cur - before)
            out = np.pad(out, pad, constant_values=fill)
    return out


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """Target grid of prepared volumes.

    shape: (D, H, W); D may be None to keep the slice count the spacing gives.
    spacing: target spacing (D, H, W) in mm, or None. None = paper mode: resize the whole
      volume to `shape` by array size (GenerateCT); spacing then follows from the extent.
      With a spacing, the volume is resampled to it and centre-cropped / padded (air) to `shape`.
    odd_slices: require 1 + 2k slices (CT-ViT's first frame + pairs): a fixed D must be odd, and a
      free D (None) that comes out even loses its top slice.
    """

    shape: tuple[int | None, int, int] = (201, 128, 128)
    spacing: tuple[float, float, float] | None = None
    odd_slices: bool = True

    def __post_init__(self):
        if len(self.shape) != 3 or any(s is not None and int(s) < 1 for s in self.shape):
            raise ValueError(f"grid shape must be 3 positive sizes (D may be None), got {self.shape}")
        if self.shape[0] is None and self.spacing is None:
            raise ValueError("a free slice count (D=None) needs a target spacing")
        if self.spacing is not None and len(self.spacing) != 3:
            raise ValueError(f"--spacing needs 3 values (D,H,W mm), got {self.spacing}")
        if self.odd_slices and self.shape[0] is not None and int(self.shape[0]) % 2 == 0:
            d = int(self.shape[0])
            raise UserError(f"--slices {d} is even, but CT-ViT needs 1 + 2k slices: use --slices {d - 1} or "
                            f"{d + 1}, or pass --even-slices (GridConfig(odd_slices=False)) to keep {d}")


def to_grid(vol_DxHxW: np.ndarray, spacing_dhw: Sequence[float], grid: GridConfig) -> tuple[np.ndarray, np.ndarray]:
    """Resample a canonical HU volume onto `grid`. Returns (float32 HU volume, new spacing (3,))."""
    spacing = np.asarray(spacing_dhw, np.float64)
    in_shape = np.asarray(vol_DxHxW.shape)
    if grid.spacing is None:
        out_shape = np.asarray(grid.shape)
        vol = resize_volume(vol_DxHxW, out_shape)
        new_spacing = spacing * in_shape / out_shape
    else:
        target = np.asarray(grid.spacing, np.float64)
        res_shape = np.maximum(1, np.rint(in_shape * spacing / target)).astype(int)
        vol = resize_volume(vol_DxHxW, res_shape)
        new_spacing = spacing * in_shape / res_shape
        want = [res_shape[0] if grid.shape[0] is None else grid.shape[0], grid.shape[1], grid.shape[2]]
        vol = _crop_or_pad(vol, want, HU_MIN)
    if grid.odd_slices and vol.shape[0] % 2 == 0:  # only a free D (None) can get here (see GridConfig)
        vol = vol[:-1]
    return vol, new_spacing.astype(np.float32)


def check_hu_volume(hu: np.ndarray, name: str) -> None:
    """Raise VolumeError unless `hu` looks like a CT volume in HU (3-D, finite, air present)."""
    if hu.ndim != 3 or min(hu.shape) < 2:
        raise VolumeError(f"{name}: not a 3-D volume (shape {hu.shape})")
    if hu.shape[0] < 8:
        raise VolumeError(f"{name}: only {hu.shape[0]} slices; a chest CT needs at least 8")
    bad = ~np.isfinite(hu)
    if bad.any():
        raise VolumeError(f"{name}: {int(bad.sum())} NaN/inf voxels")
    lo, hi = np.percentile(hu[:: max(1, hu.shape[0] // 16)], [1, 99])
    if lo > -500 or hi < -200 or hi > 4000:
        raise VolumeError(
            f"{name}: values do not look like CT in HU (1st/99th percentile {lo:.0f}/{hi:.0f}; "
            "a CT has air near -1000 and tissue above -200); wrong modality or missing rescale?")


def preprocess(vol_ijk: np.ndarray, affine: np.ndarray, grid: GridConfig, *, name: str,
               spacing_ijk: Sequence[float] | None = None) -> dict:
    """HU volume in file order -> prepared example fields.

    Returns {"volume": int16 (D,H,W) HU clipped, "spacing": float32 (3,), "orientation": str,
    "original_spacing": float32 (3,) (D,H,W), "original_shape": int32 (3,) (D,H,W)}.
    """
    check_hu_volume(vol_ijk, name)
    vol, spacing, orient = to_canonical(vol_ijk, affine, spacing_ijk)
    if not (np.all(spacing > 0) and np.all(np.isfinite(spacing))):
        raise VolumeError(f"{name}: invalid voxel spacing {spacing.tolist()}")
    orig_shape = np.asarray(vol.shape, np.int32)
    out, new_spacing = to_grid(clip_hu(vol), spacing, grid)
    return {
        "volume": to_int16_hu(out),
        "spacing": new_spacing,
        "orientation": orient,
        "original_spacing": spacing.astype(np.float32),
        "original_shape": orig_shape,
    }
