"""GenerateCT's array layout -> ctgen's canonical orientation (docs/generate.md, "Orientation").

GenerateCT's models produce volumes in the layout its data pipeline fed them, and that pipeline
never looks at a NIfTI header: it takes nibabel's `get_fdata()` array (the file's storage axes
i, j, k), cuts it into `array[:, :, k]` slices, turns each into a PIL image (rows = i, columns =
j), resizes it and stacks the slices in k order. A model volume `(D, H, W)` is therefore the
training file's `(k, i, j)`, and where the patient lies in it is wherever the training files
stored them. `source_axcodes` names that storage: the nibabel axis codes of the files' voxel axes
(i, j, k), e.g. "LPS" = i toward the patient's left, j toward the back, k toward the head.

    vol_DxHxW = generatect_to_canonical(model_volume, source_axcodes="LPS")

GenerateCT's own saved files add one more swap: its transformer/CT-ViT outputs go through
`tensor_to_nifti`, which stores the `(D, H, W)` array as `(W, H, D)` under an identity affine,
while its super-resolution script stores `(H, W, D)`; `generatect_file_to_model` undoes either.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ctgen.errors import UserError
from ctgen.volume import to_canonical

# Voxel axes CT-RATE's `*_fixed` NIfTI files are taken to have (i, j, k); see docs/generate.md.
CTRATE_AXCODES = "LPS"
_RAS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def axcodes_affine(axcodes: str) -> np.ndarray:
    """A voxel-to-RAS affine (1 mm voxels) whose voxel axes point along `axcodes`, e.g. "LPS"."""
    codes = str(axcodes).upper()
    if len(codes) != 3 or any(c not in _RAS for c in codes) or len({_RAS[c][0] for c in codes}) != 3:
        raise UserError(f"axis codes {axcodes!r}: expected three letters naming one of R/L, A/P and S/I each, "
                        "e.g. LPS or RAS")
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for col, c in enumerate(codes):
        row, sign = _RAS[c]
        affine[row, col] = sign
    return affine


def generatect_to_canonical(vol_DxHxW: np.ndarray, source_axcodes: str = CTRATE_AXCODES) -> np.ndarray:
    """A volume in GenerateCT's model layout -> ctgen's canonical (D, H, W) (`ctgen.volume`).

    The model layout is the training files' `(k, i, j)` (module docstring); `source_axcodes` are
    those files' voxel-axis codes. Only axes are permuted and flipped: no value changes, no
    resampling. The result's shape is the input's with its axes permuted accordingly.
    """
    vol = np.asarray(vol_DxHxW)
    if vol.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {vol.shape}")
    canonical, _, _ = to_canonical(vol.transpose(1, 2, 0), axcodes_affine(source_axcodes), (1.0, 1.0, 1.0))
    return canonical


def generatect_file_to_model(data: np.ndarray, written_by: str) -> np.ndarray:
    """The array of a NIfTI written by GenerateCT's scripts -> its model layout (D, H, W).

    written_by: "transformer" (`tensor_to_nifti`, stored as (W, H, D)) or "superres"
    (`inference_superres.py`, stored as (H, W, D), a trailing channel axis allowed).
    """
    data = np.asarray(data)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {data.shape}")
    if written_by == "transformer":
        return np.ascontiguousarray(data.transpose(2, 1, 0))
    if written_by == "superres":
        return np.ascontiguousarray(data.transpose(2, 0, 1))
    raise ValueError(f"written_by must be 'transformer' or 'superres', got {written_by!r}")


LAYOUTS = ("auto", "canonical", "generatect")


def resolve_layout(setting: str, maskgit_info: Mapping[str, Any]) -> str:
    """The models' array layout: `setting` unless "auto", which means the `layout` the MaskGIT's
    weights marker records (`ctgen import` writes "generatect", the demo-cascade packing the layout
    of what it packed); for markers without one (written before the field existed), "generatect"
    when the marker records the imported `source` file and "canonical" for weights ctgen trained."""
    if setting not in LAYOUTS:
        raise UserError(f"--config.layout={setting!r}: expected one of {', '.join(LAYOUTS)}")
    if setting != "auto":
        return setting
    recorded = maskgit_info.get("layout")
    if recorded is not None:
        if recorded not in LAYOUTS[1:]:
            raise UserError(f"the MaskGIT weights marker records layout {recorded!r}: expected one of "
                            f"{', '.join(LAYOUTS[1:])}; pass --config.layout=canonical or generatect")
        return recorded
    return "generatect" if maskgit_info.get("source") else "canonical"


def model_to_canonical(vol_DxHxW: np.ndarray, layout: str, source_axcodes: str = CTRATE_AXCODES) -> np.ndarray:
    """A model's output volume in the canonical orientation (`layout` from `resolve_layout`)."""
    if layout == "canonical":
        return np.asarray(vol_DxHxW)
    if layout == "generatect":
        return generatect_to_canonical(vol_DxHxW, source_axcodes)
    raise ValueError(f"layout must be 'canonical' or 'generatect', got {layout!r}")
