"""Label codes of the phantom label maps, and measurements on a (labels, HU) pair.

The measurements are what a generated volume can be checked against (does a "cardiomegaly"
prompt give a large heart?) and what the phantom tests assert on.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

LABELS: Mapping[str, int] = {
    "background": 0,   # air outside the body
    "body": 1,         # soft tissue, fat, muscle, mediastinal fat, abdomen, esophagus
    "lung_right": 2,   # aerated lung incl. emphysema / ground glass / consolidation
    "lung_left": 3,
    "heart": 4,
    "airway": 5,       # trachea and bronchi (lumen and wall)
    "aorta": 6,        # aorta and pulmonary trunk / main pulmonary arteries
    "vessels": 7,      # intrapulmonary vessel tree
    "effusion": 8,     # pleural fluid
    "nodule": 9,
    "bone": 10,        # spine, ribs, sternum, scapulae
}
LUNG_CODES = (LABELS["lung_right"], LABELS["lung_left"])
LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")


def _voxel_ml(spacing_dhw: Sequence[float]) -> float:
    return float(np.prod(np.asarray(spacing_dhw, np.float64))) / 1000.0


def cardiothoracic_ratio(labels_DxHxW: np.ndarray, spacing_dhw: Sequence[float]) -> float:
    """Max transverse heart width / inner thoracic width on the slice of that max width.

    Inner thoracic width = left-right extent of lungs + effusion on the same slice.
    """
    heart = labels_DxHxW == LABELS["heart"]
    cols = heart.any(axis=1)  # (D, W)
    if not cols.any():
        return float("nan")
    w = np.where(cols.any(1), cols.shape[1] - np.argmax(cols[:, ::-1], 1) - np.argmax(cols, 1), 0)
    k = int(np.argmax(w))
    thorax = np.isin(labels_DxHxW[k], LUNG_CODES + (LABELS["effusion"], LABELS["heart"], LABELS["vessels"])).any(0)
    xs = np.nonzero(thorax)[0]
    return float(w[k] / (xs[-1] - xs[0] + 1)) if xs.size else float("nan")


def measure(labels_DxHxW: np.ndarray, hu_DxHxW: np.ndarray, spacing_dhw: Sequence[float]) -> dict:
    """Phantom-style measurements of a volume with its label map (HU in any numeric dtype)."""
    vml = _voxel_ml(spacing_dhw)
    lung = np.isin(labels_DxHxW, LUNG_CODES)
    lung_hu = hu_DxHxW[lung].astype(np.float32)
    nod, n_nod = ndimage.label(labels_DxHxW == LABELS["nodule"])
    half = labels_DxHxW.shape[2] // 2  # canonical: W < half is patient right
    eff = labels_DxHxW == LABELS["effusion"]
    return {
        "cardiothoracic_ratio": round(cardiothoracic_ratio(labels_DxHxW, spacing_dhw), 4),
        "effusion_right_ml": round(float(eff[:, :, :half].sum()) * vml, 1),
        "effusion_left_ml": round(float(eff[:, :, half:].sum()) * vml, 1),
        "lung_volume_ml": round(float(lung.sum()) * vml, 1),
        "mean_lung_hu": round(float(lung_hu.mean()), 1) if lung_hu.size else float("nan"),
        "laa950_percent": round(100.0 * float((lung_hu < -950).mean()), 2) if lung_hu.size else float("nan"),
        "nodule_count": int(n_nod),
    }
