"""PNG previews of CT-ViT reconstructions: input vs reconstruction in three orthogonal planes."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] (CT-ViT space, i.e. HU/1000) -> 0..255 grey."""
    return np.round((np.clip(np.asarray(x, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _planes(vol_FxHxW: np.ndarray) -> list[np.ndarray]:
    """Middle axial slice, middle coronal and sagittal sections (slices stretched to a visible height)."""
    f, h, w = vol_FxHxW.shape
    stretch = max(1, int(np.ceil((h / 2) / max(f, 1))))
    coronal = np.repeat(vol_FxHxW[::-1, h // 2, :], stretch, axis=0)
    sagittal = np.repeat(vol_FxHxW[::-1, :, w // 2], stretch, axis=0)
    return [vol_FxHxW[f // 2], coronal, sagittal]


def three_plane_grid(input_FxHxW: np.ndarray, recon_FxHxW: np.ndarray, pad: int = 4) -> np.ndarray:
    """uint8 image: row 1 input, row 2 reconstruction; columns axial, coronal, sagittal."""
    rows = [[_to_uint8(p) for p in _planes(v)] for v in (input_FxHxW, recon_FxHxW)]
    col_w = [max(r[c].shape[1] for r in rows) for c in range(3)]
    row_h = [max(p.shape[0] for p in r) for r in rows]
    out = np.zeros((sum(row_h) + pad * 3, sum(col_w) + pad * 4), np.uint8)
    y = pad
    for r, hgt in zip(rows, row_h):
        x = pad
        for c, img in enumerate(r):
            out[y:y + img.shape[0], x:x + img.shape[1]] = img
            x += col_w[c] + pad
        y += hgt + pad
    return out


def write_three_planes(path: str, input_FxHxW: np.ndarray, recon_FxHxW: np.ndarray, title: str = "") -> str:
    """Write the preview PNG (with a caption line) and return its path."""
    grid = three_plane_grid(input_FxHxW, recon_FxHxW)
    zoom = max(1, round(640 / max(grid.shape[1], 1)))  # enlarge small volumes to a viewable size
    grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
    canvas = np.zeros((grid.shape[0] + 14, grid.shape[1]), np.uint8)
    canvas[14:] = grid
    img = Image.fromarray(canvas)
    err = float(np.sqrt(np.mean((np.clip(recon_FxHxW, -1, 1) - input_FxHxW) ** 2)))
    ImageDraw.Draw(img).text((2, 1), f"{title}  top: input, bottom: recon (rmse {err:.4f})", fill=255)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
