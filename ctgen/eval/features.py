"""Slice features of CT volumes for 2.5D FID and a volume-level (FVD-style) Fréchet distance.

The protocol follows the ResNet-50 2.5D FID of the VLM3D text-to-CT challenge
(forithmus/VLM3D-Dockers, `ctgen_evaluation/evaluate_fid_2p5d_ct.py`), on canonical (D, H, W) volumes:

1. pad each axis at its end with -1000 HU up to `grid`, then centre-crop to `grid`;
2. clip HU to [-1000, 1000] and scale to [-1, 1];
3. per plane (axial: the D slices, coronal: H, sagittal: W) keep the central `center_ratio` of the
   slices (index range [int((1-r)/2 n), int((1+r)/2 n)));
4. optionally resize every slice to `slice_size` x `slice_size` (the challenge keeps the native
   size; a fixed grid makes all slices of a plane the same size);
5. per slice: min-max to [0, 1], replicate to 3 channels, subtract (0.485, 0.456, 0.406) from
   channels 0, 1, 2 (no division by a standard deviation);
6. ResNet-50 trunk + global average pooling: 2048 features per slice.

2.5D FID is the Fréchet distance per plane between the slice features of two sets, and their
mean. The volume-level feature of a volume is the mean of its slice features per plane,
concatenated over the three planes (3 x 2048); the Fréchet distance between two sets of those is
"FVD-style" (the challenge's FVD uses a 3-D CT-Net, not available here).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import numpy as np

from ctgen.data.preprocess import resize_volume
from ctgen.volume import HU_MIN, hu_to_model

PLANES = ("axial", "coronal", "sagittal")
CHANNEL_MEAN = (0.485, 0.456, 0.406)


@dataclasses.dataclass(frozen=True)
class SliceProtocol:
    """grid: (D, H, W) every volume is padded / cropped to; center_ratio: share of central slices
    per plane; slice_size: square size slices are resized to (None: native); batch_size: slices
    per network call."""

    grid: tuple[int, int, int]
    center_ratio: float = 0.4
    slice_size: int | None = None
    batch_size: int = 32

    def __post_init__(self):
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be three positive sizes (D, H, W), got {self.grid}")
        if not 0.0 < self.center_ratio <= 1.0:
            raise ValueError(f"center_ratio must be in (0, 1], got {self.center_ratio}")


def pad_crop(vol_DxHxW: np.ndarray, grid: Sequence[int], fill: float = HU_MIN) -> np.ndarray:
    """Pad each axis at its end with `fill` up to `grid`, then centre-crop to `grid`."""
    x = np.asarray(vol_DxHxW, np.float32)
    pad = [(0, max(0, int(g) - n)) for g, n in zip(grid, x.shape)]
    x = np.pad(x, pad, constant_values=fill)
    start = [(n - int(g)) // 2 for g, n in zip(grid, x.shape)]
    return x[tuple(slice(s, s + int(g)) for s, g in zip(start, grid))]


def prepare_volume(hu_DxHxW: np.ndarray, protocol: SliceProtocol) -> np.ndarray:
    """Steps 1-2: a float32 volume in [-1, 1] on `protocol.grid`."""
    return hu_to_model(pad_crop(hu_DxHxW, protocol.grid))


def plane_slices(vol_DxHxW: np.ndarray, plane: str, center_ratio: float) -> np.ndarray:
    """Step 3: the central slices of one plane as an (N, h, w) stack."""
    axis = PLANES.index(plane)
    n = vol_DxHxW.shape[axis]
    lo, hi = int((1.0 - center_ratio) / 2.0 * n), int((1.0 + center_ratio) / 2.0 * n)
    return np.moveaxis(vol_DxHxW, axis, 0)[lo:max(hi, lo + 1)]


def network_input(slices_NxHxW: np.ndarray, slice_size: int | None = None) -> np.ndarray:
    """Steps 4-5: (N, h, w) slices -> (N, s, s, 3) network input."""
    x = np.asarray(slices_NxHxW, np.float32)
    if slice_size is not None and x.shape[1:] != (slice_size, slice_size):
        x = resize_volume(x, (x.shape[0], slice_size, slice_size))
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    x = (x - lo) / (hi - lo + 1e-10)
    return x[..., None] - np.asarray(CHANNEL_MEAN, np.float32).reshape(1, 1, 1, 3)


def slice_features(vol_DxHxW: np.ndarray, features_fn: Callable[[np.ndarray], np.ndarray],
                   protocol: SliceProtocol) -> dict[str, np.ndarray]:
    """{plane: (N_plane, F)} features of one prepared volume (`prepare_volume`)."""
    out = {}
    for plane in PLANES:
        x = network_input(plane_slices(vol_DxHxW, plane, protocol.center_ratio), protocol.slice_size)
        out[plane] = np.concatenate([np.asarray(features_fn(x[i:i + protocol.batch_size]), np.float64)
                                     for i in range(0, len(x), protocol.batch_size)])
    return out


def extract(volumes: Iterable[np.ndarray], features_fn: Callable[[np.ndarray], np.ndarray],
            protocol: SliceProtocol) -> dict[str, np.ndarray]:
    """Features of a set of HU volumes: {plane: all slices' features stacked (sum N, F),
    "volume": (n_volumes, 3 F) per-volume means of the three planes, concatenated}."""
    per_plane: dict[str, list] = {p: [] for p in PLANES}
    per_volume = []
    for hu in volumes:
        feats = slice_features(prepare_volume(hu, protocol), features_fn, protocol)
        for p in PLANES:
            per_plane[p].append(feats[p])
        per_volume.append(np.concatenate([feats[p].mean(axis=0) for p in PLANES]))
    out = {p: np.concatenate(v) for p, v in per_plane.items()}
    out["volume"] = np.stack(per_volume)
    return out


def resnet_features_fn(weights_path: str) -> Callable[[np.ndarray], np.ndarray]:
    """`x_NxHxWx3 -> (N, 2048)` of the user's ResNet-50 weights (jax is imported here)."""
    from ctgen.convert.resnet import load_resnet50
    from ctgen.models.resnet import feature_fn

    return feature_fn(load_resnet50(weights_path))
