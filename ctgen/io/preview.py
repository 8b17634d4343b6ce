"""PNG previews of volumes: one row per volume, each row its middle axial, coronal and sagittal planes.

Volumes are canonical (F, H, W) arrays in the model range [-1, 1] (HU / 1000, `ctgen.volume`);
convert other ranges first (e.g. super-resolution outputs with `ctgen.volume.sr_to_model`).

    write_planes("preview.png", [low_res, generated, target], caption="step 100: study_1")
    write_three_planes("recon.png", input_FxHxW, recon_FxHxW, title="step 100")  # caption adds the RMSE
    write_planes("ct.png", [vol, vol], caption=prompt, windows=[LUNG_WINDOW, MEDIASTINAL_WINDOW])  # ctgen.volume
    write_image_rows("sr.png", [[low, sr, target], ...], caption="...")   # 2-D slices, one row each

Without `windows` the grey scale spans the whole model range (-1000..1000 HU); a window
(level, width) in HU maps level - width/2 .. level + width/2 to black .. white, as viewers do.
Long captions wrap onto as many lines as they need.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctgen.volume import HU_MAX, model_to_sr

CAPTION_HEIGHT = 14  # pixels per caption line
CAPTION_FONT_PX = 11


@functools.cache
def caption_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in Aileron at `CAPTION_FONT_PX` (needs FreeType), else its bitmap font."""
    try:
        return ImageFont.load_default(size=CAPTION_FONT_PX)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _to_uint8(x: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """[-1, 1] -> 0..255 grey (clipped); with `window` = (level, width) in HU, that window only."""
    if window is None:
        return np.round(model_to_sr(x) * np.float32(255.0)).astype(np.uint8)
    level, width = (float(v) / HU_MAX for v in window)  # in model units (HU / 1000)
    grey = (np.asarray(x, np.float32) - np.float32(level - width / 2)) / np.float32(width)
    return np.round(np.clip(grey, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def _planes(vol_FxHxW: np.ndarray) -> list[np.ndarray]:
    """Middle axial slice, middle coronal and sagittal sections (slices stretched to a visible height)."""
    f, h, w = vol_FxHxW.shape
    stretch = max(1, int(np.ceil((h / 2) / max(f, 1))))
    coronal = np.repeat(vol_FxHxW[::-1, h // 2, :], stretch, axis=0)
    sagittal = np.repeat(vol_FxHxW[::-1, :, w // 2], stretch, axis=0)
    return [vol_FxHxW[f // 2], coronal, sagittal]


def three_plane_grid(*volumes_FxHxW: np.ndarray, pad: int = 4,
                     windows: Sequence[tuple[float, float] | None] | None = None) -> np.ndarray:
    """uint8 image: one row per volume (in the order given); columns axial, coronal, sagittal.

    Volumes may differ in size (e.g. a low-res input beside a high-res output); each column is
    as wide and each row as tall as its largest plane. windows: per row, a (level, width) HU
    window or None for the full range.
    """
    if not volumes_FxHxW:
        raise ValueError("three_plane_grid needs at least one volume")
    windows = list(windows) if windows is not None else [None] * len(volumes_FxHxW)
    if len(windows) != len(volumes_FxHxW):
        raise ValueError(f"{len(windows)} windows for {len(volumes_FxHxW)} volumes")
    rows = [[_to_uint8(p, w) for p in _planes(np.asarray(v))] for v, w in zip(volumes_FxHxW, windows)]
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


def caption_lines(caption: str, width_px: int) -> list[str]:
    """`caption` wrapped at spaces into lines that fit `width_px` pixels in `caption_font` (at least
    one line; a single word wider than that stays whole on its line)."""
    lines: list[str] = []
    for word in caption.split():
        if lines and caption_width(lines[-1] + " " + word) <= width_px - 4:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _word_gap() -> float:
    """Pixels between caption words: at least 4 (both built-in fonts have a hair-thin space)."""
    return max(4.0, caption_font().getlength(" "))


def _word_positions(line: str) -> tuple[list[tuple[float, str]], float]:
    """(x offset, word) of each word of `line` as drawn, `_word_gap` apart, and the line's width."""
    font, gap, x, out = caption_font(), _word_gap(), 0.0, []
    for word in line.split():
        out.append((x, word))
        x += font.getlength(word) + gap
    return out, max(x - gap, 0.0)


def caption_width(line: str) -> float:
    """Width in pixels of `line` as `_write_png` draws it (word by word, `_word_gap` apart)."""
    return _word_positions(line)[1]


def write_planes(path: str, volumes_FxHxW: Sequence[np.ndarray], caption: str = "",
                 windows: Sequence[tuple[float, float] | None] | None = None) -> str:
    """Write `three_plane_grid(*volumes, windows=windows)` as a PNG with the caption above it
    (wrapped onto as many lines as it needs); returns `path`."""
    return _write_png(path, three_plane_grid(*volumes_FxHxW, windows=windows), caption)


def write_image_rows(path: str, rows: Sequence[Sequence[np.ndarray]], caption: str = "", pad: int = 4) -> str:
    """Write 2-D images in [-1, 1] as a PNG grid (one row per entry of `rows`, images side by
    side, cells as large as the largest image) with the caption above; returns `path`."""
    images = [[_to_uint8(np.asarray(im)) for im in row] for row in rows]
    cell_h = max(im.shape[0] for row in images for im in row)
    cell_w = max(im.shape[1] for row in images for im in row)
    cols = max(len(row) for row in images)
    grid = np.zeros((len(images) * (cell_h + pad) + pad, cols * (cell_w + pad) + pad), np.uint8)
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
            grid[y:y + im.shape[0], x:x + im.shape[1]] = im
    return _write_png(path, grid, caption)


def _write_png(path: str, grid: np.ndarray, caption: str) -> str:
    zoom = max(1, round(640 / max(grid.shape[1], 1)))  # enlarge small images to a viewable size
    grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
    lines = caption_lines(caption, grid.shape[1])
    top = CAPTION_HEIGHT * len(lines)
    canvas = np.zeros((grid.shape[0] + top, grid.shape[1]), np.uint8)
    canvas[top:] = grid
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        for x, word in _word_positions(line)[0]:
            draw.text((2 + x, 1 + i * CAPTION_HEIGHT), word, fill=255, font=caption_font())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def write_three_planes(path: str, input_FxHxW: np.ndarray, recon_FxHxW: np.ndarray, title: str = "") -> str:
    """A reconstruction preview: input above reconstruction, captioned with `title` and their RMSE."""
    err = float(np.sqrt(np.mean((np.clip(recon_FxHxW, -1, 1) - input_FxHxW) ** 2)))
    return write_planes(path, [input_FxHxW, recon_FxHxW],
                        caption=f"{title}  top: input, bottom: recon (rmse {err:.4f})")
