"""PNG previews of volumes: one row per volume, each row its middle axial, coronal and sagittal planes.

Volumes are canonical (F, H, W) arrays in the model range [-1, 1] (HU / 1000, `ctgen.volume`);
convert other ranges first (e.g. super-resolution outputs with `ctgen.volume.sr_to_model`).

    write_planes("preview.png", [low_res, generated, target], caption="step 100: study_1")
    write_three_planes("recon.png", input_FxHxW, recon_FxHxW, title="step 100")  # caption adds the RMSE
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ctgen.volume import model_to_sr

CAPTION_HEIGHT = 14


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> 0..255 grey (clipped)."""
    return np.round(model_to_sr(x) * np.float32(255.0)).astype(np.uint8)


def _planes(vol_FxHxW: np.ndarray) -> list[np.ndarray]:
    """Middle axial slice, middle coronal and sagittal sections (slices stretched to a visible height)."""
    f, h, w = vol_FxHxW.shape
    stretch = max(1, int(np.ceil((h / 2) / max(f, 1))))
    coronal = np.repeat(vol_FxHxW[::-1, h // 2, :], stretch, axis=0)
    sagittal = np.repeat(vol_FxHxW[::-1, :, w // 2], stretch, axis=0)
    return [vol_FxHxW[f // 2], coronal, sagittal]


def three_plane_grid(*volumes_FxHxW: np.ndarray, pad: int = 4) -> np.ndarray:
    """uint8 image: one row per volume (in the order given); columns axial, coronal, sagittal.

    Volumes may differ in size (e.g. a low-res input beside a high-res output); each column is
    as wide and each row as tall as its largest plane.
    """
    if not volumes_FxHxW:
        raise ValueError("three_plane_grid needs at least one volume")
    rows = [[_to_uint8(p) for p in _planes(np.asarray(v))] for v in volumes_FxHxW]
    col_w = [max(r[c].shape[1] for r in rows) for c in range(3)]
    row_h = [max(p.shape[0] for p in r) for r in rows]
    out = np.zeros((sum(row_h) + pad * (len(rows) + 1), sum(col_w) + pad * 4), np.uint8)
    y = pad
    for r, hgt in zip(rows, row_h):
        x = pad
        for c, img in enumerate(r):
            out[y:y + img.shape[0], x:x + img.shape[1]] = img
            x += col_w[c] + pad
        y += hgt + pad
    return out


def write_planes(path: str, volumes_FxHxW: Sequence[np.ndarray], caption: str = "") -> str:
    """Write `three_plane_grid(*volumes)` as a PNG with a caption line above it; returns `path`."""
    grid = three_plane_grid(*volumes_FxHxW)
    zoom = max(1, round(640 / max(grid.shape[1], 1)))  # enlarge small volumes to a viewable size
    grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
    canvas = np.zeros((grid.shape[0] + CAPTION_HEIGHT, grid.shape[1]), np.uint8)
    canvas[CAPTION_HEIGHT:] = grid
    img = Image.fromarray(canvas)
    ImageDraw.Draw(img).text((2, 1), caption, fill=255)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def write_three_planes(path: str, input_FxHxW: np.ndarray, recon_FxHxW: np.ndarray, title: str = "") -> str:
    """A reconstruction preview: input above reconstruction, captioned with `title` and their RMSE."""
    err = float(np.sqrt(np.mean((np.clip(recon_FxHxW, -1, 1) - input_FxHxW) ** 2)))
    return write_planes(path, [input_FxHxW, recon_FxHxW],
                        caption=f"{title}  top: input, bottom: recon (rmse {err:.4f})")
