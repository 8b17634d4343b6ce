"""PNG figures of the generated-volume report, drawn with Pillow (no plotting library needed).

`histogram_png`: mean HU histograms of two sets as lines; `examples_png`: example volumes of both
sets in three planes; `strip_png`: per-attribute strip charts of the phantom measurements.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"reference": (40, 90, 200), "generated": (220, 80, 30)}
_BG, _FG, _GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)


class _Axes:
    """A plotting rectangle on an image, mapping data coordinates to pixels."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xlim, ylim):
        self.d, self.box, self.xlim, self.ylim = draw, box, xlim, ylim

    def px(self, x: float, y: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0] or 1.0)
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0] or 1.0)
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    def frame(self, xticks: Sequence[float], yticks: Sequence[float], xlabel: str = "", title: str = "") -> None:
        x0, y0, x1, y1 = self.box
        for t in yticks:
            _, py = self.px(self.xlim[0], t)
            self.d.line([(x0, py), (x1, py)], fill=_GRID)
            self.d.text((x0 - 6, py), _fmt(t), fill=_FG, anchor="rm")
        for t in xticks:
            px, _ = self.px(t, self.ylim[0])
            self.d.line([(px, y1), (px, y1 + 4)], fill=_FG)
            self.d.text((px, y1 + 6), _fmt(t), fill=_FG, anchor="mt")
        self.d.rectangle(self.box, outline=_FG)
        if xlabel:
            self.d.text(((x0 + x1) / 2, y1 + 20), xlabel, fill=_FG, anchor="mt")
        if title:
            self.d.text(((x0 + x1) / 2, y0 - 8), title, fill=_FG, anchor="mb")


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.2g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(span / n))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= n)
    return [t for t in np.arange(math.ceil(lo / step) * step, hi + step * 1e-9, step)]


def _save(img: Image.Image, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def _legend(d: ImageDraw.ImageDraw, x: int, y: int, names: Sequence[str]) -> None:
    for i, name in enumerate(names):
        d.rectangle((x, y + 16 * i + 3, x + 10, y + 16 * i + 11), fill=COLORS[name])
        d.text((x + 16, y + 16 * i), name, fill=_FG)


def histogram_png(path: str, bins: np.ndarray, hists: dict[str, np.ndarray], title: str) -> str:
    """Lines of the share of voxels per HU bin (log scale: air dominates) for each named set."""
    img = Image.new("RGB", (720, 420), _BG)
    d = ImageDraw.Draw(img)
    floor = 1e-5
    logs = {k: np.log10(np.maximum(v, floor)) for k, v in hists.items()}
    ax = _Axes(d, (70, 40, 700, 360), (bins[0], bins[-1]), (math.log10(floor), 0.0))
    ax.frame(_ticks(bins[0], bins[-1]), [-5, -4, -3, -2, -1, 0], "HU", title)
    d.text((8, 8), "log10 share of voxels", fill=_FG)
    centres = (bins[:-1] + bins[1:]) / 2
    for name, y in logs.items():
        d.line([ax.px(x, v) for x, v in zip(centres, y)], fill=COLORS[name], width=2)
    _legend(d, 560, 50, list(hists))
    return _save(img, path)


def examples_png(path: str, pairs: Sequence[tuple[str, np.ndarray, str, np.ndarray]], title: str) -> str:
    """Per (reference name, volume, generated name, volume) pair, volumes in [-1, 1]: the middle axial
    slice, coronal and sagittal sections, reference on top, generated below."""
    from ctgen.io.preview import three_plane_grid

    tiles = [three_plane_grid(ref, gen) for _, ref, _, gen in pairs]
    zoom = max(1, round(640 / max(t.shape[1] for t in tiles)))
    tiles = [np.repeat(np.repeat(t, zoom, axis=0), zoom, axis=1) for t in tiles]
    img = Image.new("RGB", (max(t.shape[1] for t in tiles) + 200, sum(t.shape[0] for t in tiles) + 24), _BG)
    d = ImageDraw.Draw(img)
    d.text((4, 4), title + "   (axial, coronal, sagittal)", fill=_FG)
    y = 24
    for (ref_name, _, gen_name, _), t in zip(pairs, tiles):
        img.paste(Image.fromarray(t).convert("RGB"), (200, y))
        d.text((4, y + t.shape[0] // 4), "reference: " + ref_name[:28], fill=COLORS["reference"])
        d.text((4, y + 3 * t.shape[0] // 4), "generated: " + gen_name[:28], fill=COLORS["generated"])
        y += t.shape[0]
    return _save(img, path)


def strip_png(path: str, values: dict[str, dict[str, Sequence[float]]], title: str) -> str:
    """One panel per attribute: the finite values of each set as jittered dots, with the mean."""
    names = list(values)
    cols = 3
    rows = math.ceil(len(names) / cols)
    img = Image.new("RGB", (cols * 260 + 20, rows * 250 + 40), _BG)
    d = ImageDraw.Draw(img)
    d.text((8, 8), title, fill=_FG)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        sets = {k: np.asarray([v for v in vs if v is not None and np.isfinite(v)], np.float64)
                for k, vs in values[name].items()}
        allv = np.concatenate([v for v in sets.values() if v.size] or [np.zeros(1)])
        lo, hi = float(allv.min()), float(allv.max())
        pad = (hi - lo) * 0.1 or 1.0
        x0, y0 = 70 + (i % cols) * 260, 50 + (i // cols) * 250
        ax = _Axes(d, (x0, y0, x0 + 170, y0 + 170), (-0.5, len(sets) - 0.5), (lo - pad, hi + pad))
        ax.frame([], _ticks(lo - pad, hi + pad, 4), title=name)
        for j, (label, v) in enumerate(sets.items()):
            for x, y in zip(j + rng.uniform(-0.25, 0.25, v.size), v):
                px, py = ax.px(x, y)
                d.ellipse((px - 2, py - 2, px + 2, py + 2), fill=COLORS[label])
            if v.size:
                px0, py = ax.px(j - 0.35, float(v.mean()))
                px1, _ = ax.px(j + 0.35, float(v.mean()))
                d.line([(px0, py), (px1, py)], fill=_FG, width=2)
            d.text((ax.px(j, 0)[0], y0 + 176), f"{label} ({v.size})", fill=COLORS[label], anchor="mt")
    return _save(img, path)
