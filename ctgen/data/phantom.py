"""Synthetic chest CT phantoms with label maps, attributes and CT-RATE-style reports.

`make_phantom(seed)` renders a thorax directly on the target grid (canonical (D, H, W) layout,
see `ctgen.data.preprocess`): body outline, subcutaneous fat, muscle, ribs, sternum, scapulae,
spine, lungs, heart with epicardial fat, aorta, pulmonary arteries, trachea and bronchi,
esophagus, upper abdomen and a pulmonary vessel tree; then the sampled findings (cardiomegaly,
pleural effusion, nodules, emphysema / bullae, consolidation, ground glass, aortic calcification)
and CT noise. Everything is drawn from one `np.random.default_rng(seed)`, so a seed is a study.

Coordinates are millimetres: z up from the bottom slice, y toward the back, x toward the
patient's left, with the in-plane origin at the image centre.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ctgen.data.anatomy import LABELS, LOBES, measure
from ctgen.data.phantom_report import SEVERITY_LAA, sample_attributes, write_report
from ctgen.data.preprocess import resize_volume
from ctgen.text.prompt import PAPER_TEMPLATE, build_prompt
from ctgen.volume import extent_spacing

DEFAULT_SHAPE = (201, 128, 128)
DEFAULT_SPACING = extent_spacing(DEFAULT_SHAPE)  # (1.5, 2.734375, 2.734375) mm
L = LABELS


@dataclasses.dataclass
class Phantom:
    """One synthetic study. `hu` int16 (D,H,W) (not clipped), `labels` uint8 (D,H,W) (`anatomy.LABELS`)."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: np.ndarray
    attributes: dict
    report: dict

    def prompt(self, template: str = PAPER_TEMPLATE) -> str:
        return build_prompt(age=self.attributes["age"], sex=self.attributes["sex"],
                            impression=self.report["impression"], findings=self.report["findings"],
                            template=template)

    def attributes_json(self) -> str:
        return json.dumps(self.attributes, sort_keys=True)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], grid: Sequence[int]) -> np.ndarray:
    """Smooth random field (about unit variance): Gaussian noise on a coarse `grid`, linearly upsampled."""
    coarse = rng.standard_normal(tuple(grid)).astype(np.float32)
    coarse = (coarse - coarse.mean()) / max(float(coarse.std()), 1e-6)  # normalise before upsampling: cheap
    return resize_volume(coarse, shape, antialias=False)


class _Canvas:
    """HU and label arrays plus coordinate vectors and soft-edged painting helpers."""

    def __init__(self, shape, spacing, shift_xy):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, np.float32)
        D, H, W = self.shape
        dz, dy, dx = self.spacing
        self.z = ((np.arange(D) + 0.5) * dz).astype(np.float32)
        self.y = ((np.arange(H) + 0.5 - H / 2) * dy - shift_xy[1]).astype(np.float32)
        self.x = ((np.arange(W) + 0.5 - W / 2) * dx - shift_xy[0]).astype(np.float32)
        self.Z, self.Y, self.X = self.z[:, None, None], self.y[None, :, None], self.x[None, None, :]
        self.edge = float(np.cbrt(dz * dy * dx))
        self.hu = np.full(self.shape, -1000.0, np.float32)
        self.labels = np.zeros(self.shape, np.uint8)

    def index_range(self, axis: int, lo: float, hi: float) -> slice:
        c = (self.z, self.y, self.x)[axis]
        i0 = int(np.searchsorted(c, lo, "left"))
        i1 = int(np.searchsorted(c, hi, "right"))
        return slice(max(0, i0), min(len(c), i1))

    def box(self, lo, hi):
        """Slices and broadcastable coordinates of the voxels inside [lo, hi] (z, y, x mm)."""
        sl = tuple(self.index_range(a, lo[a], hi[a]) for a in range(3))
        return sl, self.z[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.x[sl[2]][None, None, :]

    def paint(self, sl, occ, value, label=None, where=None):
        """Blend `value` into the HU box by occupancy; label voxels with occupancy > 0.5."""
        occ = np.asarray(occ, np.float32)
        if where is not None:
            occ = occ * where
        h = self.hu[sl]
        h += occ * (value - h)
        if label is not None:
            self.labels[sl][occ > 0.5] = label

    def capsule(self, p0, p1, r0, r1, margin=0.0):
        """(slices, occupancy) of a tapered capsule from p0 to p1 (z, y, x mm)."""
        p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
        pad = max(r0, r1) + margin + 2 * self.edge
        sl, Z, Y, X = self.box(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
        d = p1 - p0
        l2 = max(float(d @ d), 1e-6)
        t = np.clip(((Z - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (X - p0[2]) * d[2]) / l2, 0, 1)
        dist = np.sqrt((Z - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (X - p0[2] - t * d[2]) ** 2)
        occ = np.clip((r0 + (r1 - r0) * t + margin - dist) / self.edge + 0.5, 0, 1)
        return sl, occ

    def ellipsoid(self, c, radii, angle=0.0, margin=0.0):
        """(slices, occupancy) of an ellipsoid rotated by `angle` (rad) about the z axis."""
        sl, rn, rmin = self.ellipsoid_rn(c, tuple(r + margin for r in radii), angle)
        return sl, np.clip((1 - rn) * rmin / self.edge + 0.5, 0, 1)

    def ellipsoid_rn(self, c, radii, angle=0.0):
        """(slices, normalised radius, smallest semi-axis) of a z-rotated ellipsoid's box."""
        rz, ry, rx = radii
        ext = max(ry, rx)
        sl, Z, Y, X = self.box(np.asarray(c) - [rz + 2 * self.edge, ext + 2 * self.edge, ext + 2 * self.edge],
                               np.asarray(c) + [rz + 2 * self.edge, ext + 2 * self.edge, ext + 2 * self.edge])
        ca, sa = math.cos(angle), math.sin(angle)
        u = ca * (X - c[2]) + sa * (Y - c[1])
        v = -sa * (X - c[2]) + ca * (Y - c[1])
        rn = np.sqrt((u / rx) ** 2 + (v / ry) ** 2 + ((Z - c[0]) / rz) ** 2)
        return sl, rn, min(rx, ry, rz)


def _superellipse_rn(X, Y, a, b_ant, b_post, boxy_back=True):
    """Normalised radius of a thorax-like outline: an ellipse in front, a boxier |.|^3 curve at the back."""
    ant = np.sqrt((X / a) ** 2 + (Y / b_ant) ** 2)
    if not boxy_back:
        return np.where(Y < 0, ant, np.sqrt((X / a) ** 2 + (Y / b_post) ** 2))
    u, v = np.abs(X / a), np.abs(Y / b_post)
    return np.where(Y < 0, ant, np.cbrt(u * u * u + v * v * v))


def _lobe_index(side_left: np.ndarray, Y, Z, g: dict) -> np.ndarray:
    """Index into LOBES for lung voxels (oblique fissure in the y-z plane, horizontal fissure on the right)."""
    ys, yp = -g["Bc_ant"], g["Bc_post"]
    frac = np.clip((Y - ys) / (yp - ys), 0, 1)
    z_obl = g["z_dia_r"] + 15 + frac * (g["z_car"] + 20 - g["z_dia_r"] - 15)
    lower = Z < z_obl
    upper_r = Z >= g["z_car"] - 30
    right = np.where(lower, 2, np.where(upper_r, 0, 1))
    left = np.where(lower, 4, 3)
    return np.where(side_left, left, right).astype(np.int8)


def _vessel_tree(rng, inside, origin, direction, radius, min_radius, depth=0, out=None):
    """Segments (p0, p1, r0, r1) of a random bifurcating tree kept inside a region."""
    out = [] if out is None else out
    if radius < min_radius or depth > 11:
        return out
    d = np.asarray(direction, np.float64)
    d /= np.linalg.norm(d)
    length = radius * rng.uniform(5.0, 8.0) + 4.0
    end = np.asarray(origin) + d * length
    tries = 0
    while depth > 0 and not inside(end):  # bend away from the pleura, then give up
        tries += 1
        if tries > 4:
            return out
        d = d + rng.normal(0, 0.6, 3)
        d /= np.linalg.norm(d)
        end = np.asarray(origin) + d * length * (0.8 if tries < 3 else 0.5)
    r_end = radius * 0.92
    out.append((np.asarray(origin), end, radius, r_end))
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    n1 = np.cross(d, helper)
    n1 /= np.linalg.norm(n1)
    n2 = np.cross(d, n1)
    spin = rng.uniform(0, 2 * np.pi)
    axis = math.cos(spin) * n1 + math.sin(spin) * n2
    for sign in (1, -1):
        ang = rng.uniform(0.35, 0.7)
        child = math.cos(ang) * d + sign * math.sin(ang) * axis
        _vessel_tree(rng, inside, end, child, r_end * rng.uniform(0.72, 0.84), min_radius, depth + 1, out)
    return out


def make_phantom(seed: int, shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = DEFAULT_SPACING,
                 *, p_normal: float = 0.3, **overrides: Any) -> Phantom:
    """Render the study drawn from `seed` on a grid of `shape` (D,H,W) voxels of `spacing` mm.

    overrides: fixed attributes (see `phantom_report.sample_attributes`), e.g.
      `cardiomegaly=True, cardiothoracic_ratio=0.65` or `effusion={"right_ml": 500, "left_ml": 0}`.
    """
    rng = np.random.default_rng(seed)
    a = sample_attributes(rng, p_normal=p_normal, **overrides)
    a.update(seed=int(seed), shape=[int(s) for s in shape], spacing=[float(s) for s in spacing])
    cv = _Canvas(shape, spacing, shift_xy=rng.normal(0, 5, size=2))
    g = _geometry(rng, cv, a)
    _body_and_wall(rng, cv, a, g)
    lung = _lungs(rng, cv, a, g)
    _mediastinum(rng, cv, a, g)
    _skeleton(rng, cv, a, g)
    _findings_and_vessels(rng, cv, a, g, lung)
    noise = float(rng.uniform(6, 14))
    cv.hu += rng.standard_normal(cv.shape, dtype=np.float32) * np.float32(noise)
    hu = np.rint(np.clip(cv.hu, -1024, 3000)).astype(np.int16)
    a["noise_hu"] = round(noise, 1)
    a["geometry"] = {k: round(float(v), 1) for k, v in g.items() if isinstance(v, (int, float))}
    a["measured"] = measure(cv.labels, hu, spacing)
    report = write_report(a, rng)
    return Phantom(hu=hu, labels=cv.labels, spacing=np.asarray(spacing, np.float32), attributes=a, report=report)


def _geometry(rng, cv: _Canvas, a: dict) -> dict:
    Lz = cv.shape[0] * float(cv.spacing[0])
    body = a["body"]
    A = 158.0 * body["width_scale"]
    B = 112.0 * body["depth_scale"]
    fat = body["fat_mm"]
    Am, Bm = A - fat, B - fat
    g = dict(Lz=Lz, A=A, B=B, Am=Am, Bm=Bm, Ac=Am - 13.0, Bc_ant=Bm - 11.0, Bc_post=Bm - 28.0)
    g["z_dia_r"] = 0.2 * Lz + rng.normal(0, 6)
    g["z_dia_l"] = g["z_dia_r"] - rng.uniform(8, 20)
    g["z_apex"] = 0.93 * Lz + rng.normal(0, 4)
    g["z_car"] = 0.62 * Lz + rng.normal(0, 5)
    g["r_vb"] = 18.0 * rng.uniform(0.9, 1.1)
    g["y_vb"] = g["Bc_post"] - g["r_vb"] * 0.55
    return g


def _scales(cv: _Canvas, g: dict):
    """Per-slice multipliers of the outline: wider at the shoulders, fuller at the abdomen."""
    t = cv.Z / g["Lz"] - 0.5
    return 1 + 0.06 * t, 1 - 0.05 * t


def _body_and_wall(rng, cv: _Canvas, a: dict, g: dict) -> None:
    sa, sb = _scales(cv, g)
    X, Y = cv.X, cv.Y
    rn_b = _superellipse_rn(X, Y, g["A"] * sa, g["B"] * sb, g["B"] * sb * 0.95)
    occ_b = np.clip((1 - rn_b) * g["B"] / cv.edge + 0.5, 0, 1)
    fat_hu = -100 + 8 * smooth_noise(rng, cv.shape, (6, 8, 8))
    cv.paint((slice(None),) * 3, occ_b, fat_hu, L["body"])
    if a["sex"] == "F":
        zc = g["z_dia_l"] + 0.3 * g["Lz"]
        for side in (-1, 1):
            r = rng.uniform(45, 65)
            sl, occ = cv.ellipsoid((zc, -g["B"] * 0.78, side * g["A"] * 0.42), (r * 0.9, r * 0.75, r))
            gland = -60 + 70 * np.clip(smooth_noise(rng, occ.shape, (4, 5, 5)), -1, 1)
            cv.paint(sl, occ, gland, L["body"])
    rn_m = _superellipse_rn(X, Y, g["Am"] * sa, g["Bm"] * sb, g["Bm"] * sb * 0.95)
    cv.paint((slice(None),) * 3, np.clip((1 - rn_m) * g["Bm"] / cv.edge + 0.5, 0, 1), np.float32(48))
    rn_c = _superellipse_rn(X, Y, g["Ac"] * sa, g["Bc_ant"] * sb, g["Bc_post"] * sb, boxy_back=False)
    g["rn_c"] = rn_c
    cv.paint((slice(None),) * 3, np.clip((1 - rn_c) * g["Bc_ant"] / cv.edge + 0.5, 0, 1), np.float32(-90))
    # Upper abdomen below the diaphragm: liver on the right, stomach (with air) and spleen on the left.
    z_top = max(g["z_dia_r"], g["z_dia_l"]) + 5
    sl, Z, Y2, X2 = cv.box((-1e9, -1e9, -1e9), (z_top, 1e9, 1e9))
    below = (Z < _diaphragm(X2, Y2, g)) & (g["rn_c"][sl] < 1)
    abd = np.where(X2 < 25, 58.0, 35.0).astype(np.float32) + 5 * smooth_noise(rng, below.shape, (3, 5, 5))
    cv.paint(sl, below.astype(np.float32), abd)
    stom_c = (g["z_dia_l"] - 35, -0.3 * g["Bc_ant"], 0.45 * g["Ac"])
    sl2, occ = cv.ellipsoid(stom_c, (35, 40, 45))
    air = (cv.y[sl2[1]][None, :, None] < stom_c[1] - 12).astype(np.float32)
    cv.paint(sl2, occ * _below_mask(cv, sl2, g), np.where(air > 0, -1000.0, 30.0).astype(np.float32))
    sl3, occ = cv.ellipsoid((g["z_dia_l"] - 30, 0.45 * g["Bc_post"], 0.7 * g["Ac"]), (45, 45, 28), angle=0.6)
    cv.paint(sl3, occ * _below_mask(cv, sl3, g), np.float32(47))


def _diaphragm(X, Y, g):
    """z of the diaphragm dome under each (x, y): two domes, deepest at the lateral and posterior recesses."""
    xs = np.where(X < 0, -0.45 * g["Ac"], 0.45 * g["Ac"])
    top = np.where(X < 0, g["z_dia_r"], g["z_dia_l"])
    return top - 55.0 * (((X - xs) / (0.65 * g["Ac"])) ** 2 + ((Y + 0.1 * g["Bc_post"]) / g["Bc_post"]) ** 2)


def _below_mask(cv: _Canvas, sl, g) -> np.ndarray:
    Z, Y, X = cv.z[sl[0]][:, None, None], cv.y[sl[1]][None, :, None], cv.x[sl[2]][None, None, :]
    return ((Z < _diaphragm(X, Y, g)) & (g["rn_c"][sl] < 1)).astype(np.float32)


def _apex_scale(Z, g):
    t = np.clip((Z - (g["z_apex"] - 70)) / 70.0, 0, 1)
    return np.sqrt(np.clip(1 - t ** 2, 0, 1))


def _lungs(rng, cv: _Canvas, a: dict, g: dict) -> np.ndarray:
    """Paint both lungs; return the boolean lung mask (before findings)."""
    Z, Y, X = cv.Z, cv.Y, cv.X
    occ_region = np.clip((0.985 * _apex_scale(Z, g) - g["rn_c"]) * g["Bc_ant"] / cv.edge + 0.5, 0, 1)
    occ_region *= np.clip((Z - _diaphragm(X, Y, g)) / cv.edge + 0.5, 0, 1)
    # Heart geometry is needed here: the lungs wrap around the mediastinum.
    hw = a["cardiothoracic_ratio"] * g["Ac"] * (1 + 0.06 * ((g["z_dia_l"] + 45) / g["Lz"] - 0.5))
    phi = rng.uniform(0.5, 0.75)
    aspect = rng.uniform(0.62, 0.74)
    ah = hw / math.sqrt(math.cos(phi) ** 2 + (aspect * math.sin(phi)) ** 2)
    bh = aspect * ah
    hy = math.sqrt((ah * math.sin(phi)) ** 2 + (bh * math.cos(phi)) ** 2)
    ch = min(0.62 * ah, 58.0)
    g.update(heart_a=ah, heart_b=bh, heart_c=ch, heart_phi=phi, heart_x=0.3 * hw,
             heart_y=-g["Bc_ant"] + hy + 6, heart_z=g["z_dia_l"] + ch * 0.55)
    excl = np.zeros(cv.shape, bool)
    sl, occ = cv.ellipsoid((g["heart_z"], g["heart_y"], g["heart_x"]), (ch, bh, ah), phi, margin=4)
    excl[sl] |= occ > 0.5
    for p0, p1, r0, r1 in _mediastinal_tubes(g, a):
        sl, occ = cv.capsule(p0, p1, r0, r1, margin=4)
        excl[sl] |= occ > 0.5
    sl, occ = cv.capsule((0, g["y_vb"], 0), (g["Lz"], g["y_vb"], 0), g["r_vb"], g["r_vb"], margin=9)
    excl[sl] |= occ > 0.5
    excl |= np.abs(X - 3 * np.tanh(Y / 30)) < np.where(Y < 0, 3.5, 12.0)
    occ_region *= ~excl
    lung = occ_region > 0.5
    left = X > 0
    base = rng.normal(-880, 12)
    grad = 0.4 * (Y + g["Bc_ant"])
    tex = 14 * smooth_noise(rng, cv.shape, (24, 20, 20))
    lung_hu = (base + grad + tex).astype(np.float32)
    cv.paint((slice(None),) * 3, occ_region, lung_hu)
    cv.labels[lung & ~left] = L["lung_right"]
    cv.labels[lung & left] = L["lung_left"]
    g["lobe"] = _lobe_index(left, Y, Z, g)
    return lung


def _mediastinal_tubes(g: dict, a: dict):
    """Centre-line capsules of aorta, pulmonary trunk/arteries, trachea, main bronchi, esophagus."""
    age = a["age"]
    r_asc = 14.0 + 0.06 * (age - 50)
    r_desc = 10.5 + 0.04 * (age - 50)
    hz, hy, hx = g["heart_z"], g["heart_y"], g["heart_x"]
    z_arch = g["z_car"] + 22
    y_desc = g["y_vb"] - 0.35 * g["r_vb"]
    x_desc = g["r_vb"] + r_desc + 1
    y_tr = g["y_vb"] - g["r_vb"] - 27
    g.update(z_arch=z_arch, y_tr=y_tr, r_asc=r_asc, r_desc=r_desc)
    hil_r = (g["z_car"] - 22, 0.05 * g["Bc_post"], -0.33 * g["Ac"])
    hil_l = (g["z_car"] - 12, 0.08 * g["Bc_post"], 0.36 * g["Ac"])
    g["hilum_r"], g["hilum_l"] = hil_r, hil_l
    bif = (g["z_car"] - 18, y_tr + 2, 12.0)
    tubes = {
        "aorta": [((hz + 0.3 * g["heart_c"], hy - 5, hx - 0.3 * g["heart_a"]), (z_arch - 12, hy - 14, -14), r_asc, r_asc),
                  ((z_arch - 12, hy - 14, -14), (z_arch + 8, y_tr - 4, 0), r_asc, r_desc + 1),
                  ((z_arch + 8, y_tr - 4, 0), (z_arch - 8, y_desc, x_desc), r_desc + 1, r_desc),
                  ((z_arch - 8, y_desc, x_desc), (g["z_dia_l"] - 30, y_desc - 6, x_desc * 0.6), r_desc, r_desc)],
        "pulmonary": [((hz + 0.5 * g["heart_c"], hy - 10, hx + 5), bif, 12.0, 12.0),
                      (bif, hil_l, 10.0, 8.0), (bif, hil_r, 10.0, 8.0)],
        "airway": [((g["Lz"] + 10, y_tr, 0), (g["z_car"], y_tr, 0), 9.5, 9.0),
                   ((g["z_car"], y_tr, 0), (g["z_car"] - 25, y_tr + 12, -0.24 * g["Ac"]), 7.0, 6.5),
                   ((g["z_car"], y_tr, 0), (g["z_car"] - 35, y_tr + 16, 0.28 * g["Ac"]), 6.0, 5.5)],
        "esophagus": [((g["Lz"] + 10, y_tr + 17, 4), (g["z_dia_l"] - 15, y_tr + 22, 18), 7.5, 7.5)],
    }
    g["tubes"] = tubes
    return [t for group in tubes.values() for t in group]


def _mediastinum(rng, cv: _Canvas, a: dict, g: dict) -> None:
    c = (g["heart_z"], g["heart_y"], g["heart_x"])
    radii = (g["heart_c"], g["heart_b"], g["heart_a"])
    sl, occ = cv.ellipsoid(c, radii, g["heart_phi"], margin=4)
    cv.paint(sl, occ, np.float32(-95), L["body"])  # epicardial fat
    sl, rn, rmin = cv.ellipsoid_rn(c, radii, g["heart_phi"])
    cv.paint(sl, np.clip((1 - rn) * rmin / cv.edge + 0.5, 0, 1), np.float32(50), L["heart"])
    cv.paint(sl, np.clip((0.82 - rn) * rmin / cv.edge + 0.5, 0, 1), np.float32(38))  # blood pool
    t = g["tubes"]
    for p0, p1, r0, r1 in t["esophagus"]:
        sl, occ = cv.capsule(p0, p1, r0, r1)
        cv.paint(sl, occ, np.float32(42), L["body"])
    for group in ("pulmonary", "aorta"):
        for p0, p1, r0, r1 in t[group]:
            sl, occ = cv.capsule(p0, p1, r0, r1)
            cv.paint(sl, occ, np.float32(42), L["aorta"])
    if a["aortic_calcification"]:
        for _ in range(int(rng.integers(4, 10))):
            p0, p1, r0, _r1 = t["aorta"][int(rng.integers(len(t["aorta"])))]
            s = rng.uniform(0, 1)
            ang = rng.uniform(0, 2 * np.pi)
            pt = np.asarray(p0) + s * (np.asarray(p1) - np.asarray(p0))
            pt = pt + np.array([0, math.sin(ang), math.cos(ang)]) * (r0 - 1.0)
            sl, occ = cv.capsule(pt, pt + np.array([rng.uniform(2, 6), 0, 0]), 1.8, 1.8)
            cv.paint(sl, occ, np.float32(rng.uniform(400, 800)), L["aorta"])
    for p0, p1, r0, r1 in t["airway"]:
        sl, occ = cv.capsule(p0, p1, r0 + 1.8, r1 + 1.8)
        cv.paint(sl, occ, np.float32(40), L["airway"])
    for p0, p1, r0, r1 in t["airway"]:
        sl, occ = cv.capsule(p0, p1, r0, r1)
        cv.paint(sl, occ, np.float32(-1000), L["airway"])


def _skeleton(rng, cv: _Canvas, a: dict, g: dict) -> None:
    age = a["age"]
    cancellous = float(np.clip(250 - 2.4 * (age - 30), 110, 260))
    Z, Y, X = cv.Z, cv.Y, cv.X
    # Spine: vertebral bodies with discs, canal, posterior elements.
    pitch = rng.uniform(23, 27)
    phase = rng.uniform(0, pitch)
    zpos = (cv.z - phase) % pitch
    vert = zpos > 5.0  # discs are the first 5 mm of each period
    r_vb = g["r_vb"] * (1.15 - 0.3 * cv.z / g["Lz"])[:, None, None]
    sl, Zs, Ys, Xs = cv.box((-1e9, g["y_vb"] - 30, -45), (1e9, g["Bm"] + 5, 45))
    rv = r_vb[sl[0]]
    d_vb = np.sqrt((Ys - g["y_vb"]) ** 2 + Xs ** 2)
    occ_vb = np.clip((rv - d_vb) / cv.edge + 0.5, 0, 1)
    vb_val = np.where(d_vb > rv - 2.5, 650.0, cancellous).astype(np.float32)
    is_vert = vert[sl[0]][:, None, None]
    cv.paint(sl, occ_vb, np.where(is_vert, vb_val, 90.0).astype(np.float32), L["bone"])
    yc = g["y_vb"] + rv + 9
    d_c = np.sqrt((Ys - yc) ** 2 + Xs ** 2)
    ring = (d_c > 8) & (d_c < 14) & (Ys > yc - 6) & is_vert
    spinous = (np.abs(Xs) < 4.5) & (Ys > yc) & (Ys < g["Bm"] - 8) & is_vert
    transverse = (np.abs(Ys - yc + 2) < 5) & (np.abs(Xs) < 32) & (np.abs(Xs) > 10) & is_vert
    bone = (ring | spinous | transverse).astype(np.float32)
    cv.paint(sl, bone, np.float32(550), L["bone"])
    cv.paint(sl, (d_c <= 8).astype(np.float32) * (Ys > yc - 10), np.float32(35), L["body"])  # canal / cord
    # Ribs: 12 pairs sloping down anteriorly, in a shell just outside the pleural cavity.
    sa, _sb = _scales(cv, g)
    rn = g["rn_c"]
    shell = (rn > 1.0) & (rn < 1.0 + 13.0 / g["Ac"])
    kk, jj, ii = np.nonzero(shell)
    z, y, x = cv.z[kk], cv.y[jj], cv.x[ii]
    sin_phi = y / np.maximum(np.sqrt(x ** 2 + y ** 2), 1e-3)
    z_top = g["z_apex"] - 8
    rib_pitch = (z_top - (g["z_dia_l"] - 25)) / 11.0
    drop = rng.uniform(35, 55)
    u = (z_top - z - drop * (1 - sin_phi) / 2) / rib_pitch
    k = np.rint(u)
    dz = (u - k) * rib_pitch
    a_eff = (g["Ac"] * sa[kk, 0, 0])
    dr = (rn[kk, jj, ii] - 1.0 - 6.5 / g["Ac"]) * a_eff
    e = (dz / 5.5) ** 2 + (dr / 3.8) ** 2
    ant = np.degrees(np.arccos(np.clip(-sin_phi, -1, 1)))  # 0 at the front midline
    reach = np.where(k < 7, 16.0, 40.0 + 10.0 * (k - 7))
    rib = (e < 1) & (k >= 0) & (k <= 11) & (ant > reach)
    cart = (e < 1) & (k >= 0) & (k < 7) & (ant <= 16.0) & (ant > 5.0)
    vals = np.where(e > 0.45, 780.0, 260.0)
    cv.hu[kk[rib], jj[rib], ii[rib]] = vals[rib]
    cv.labels[kk[rib], jj[rib], ii[rib]] = L["bone"]
    cv.hu[kk[cart], jj[cart], ii[cart]] = 140.0
    # Sternum in the anterior chest wall.
    sl, Zs, Ys, Xs = cv.box((g["z_dia_r"] + 10, -g["Bm"] - 5, -30), (g["z_apex"] - 20, -g["Bc_ant"] + 2, 30))
    y_st = -g["Bc_ant"] * _scales(cv, g)[1][sl[0]] - 6.0
    w_st = np.where(Zs > g["z_apex"] - 70, 22.0, 13.0)
    st = ((np.abs(Xs) < w_st) & (np.abs(Ys - y_st) < 5.0)).astype(np.float32)
    rim = (np.abs(Ys - y_st) > 3.2) | (np.abs(Xs) > w_st - 2.5)
    cv.paint(sl, st, np.where(rim, 600.0, 230.0).astype(np.float32), L["bone"])
    # Scapulae: thin plates on the posterolateral rib cage of the upper chest.
    z_lo, z_hi = g["z_car"] - 45, g["z_apex"] + 8
    zr = (Z > z_lo) & (Z < z_hi)
    sc = zr & (rn > 1.0 + 17.0 / g["Ac"]) & (rn < 1.0 + 22.0 / g["Ac"])
    sin_all = Y / np.maximum(np.sqrt(X ** 2 + Y ** 2), 1e-3)
    sc &= (sin_all > 0.35) & (sin_all < 0.85)
    cv.hu[sc] = 520.0
    cv.labels[sc] = L["bone"]


def _findings_and_vessels(rng, cv: _Canvas, a: dict, g: dict, lung0: np.ndarray) -> None:
    X = cv.X
    vml = float(np.prod(cv.spacing)) / 1000.0
    left = np.broadcast_to(X > 0, cv.shape)
    lung = lung0.copy()
    # Pleural effusion: dependent fluid (posterior, basal), exactly the requested volume in voxels.
    eff_all = np.zeros(cv.shape, bool)
    for side, is_left in (("right", False), ("left", True)):
        ml = float(a["effusion"][f"{side}_ml"])
        if ml <= 0:
            continue
        cand = lung & (left == is_left)
        kk, jj, ii = np.nonzero(cand)
        # posterior, peripheral and basal first: a crescent along the posterior chest wall
        score = (cv.y[jj] / g["Bc_post"] + 1.2 * g["rn_c"][kk, jj, ii] - 2.5 * cv.z[kk] / g["Lz"]
                 + 1e-6 * cv.x[ii] * (1 if is_left else -1))
        n = min(int(round(ml / vml)), int(0.8 * kk.size))
        a["effusion"][f"{side}_ml"] = round(n * vml, 1)
        sel = np.argpartition(-score, n - 1)[:n] if n > 0 else np.array([], int)
        eff_all[kk[sel], jj[sel], ii[sel]] = True
    if eff_all.any():
        lung &= ~eff_all
        cv.hu[eff_all] = 12.0 + 6 * rng.standard_normal(int(eff_all.sum())).astype(np.float32)
        cv.labels[eff_all] = L["effusion"]
        band = ndimage.binary_dilation(eff_all, iterations=2) & lung
        cv.hu[band] = cv.hu[band] * 0.3 - 250.0  # compressive atelectasis next to the fluid
    # Emphysema: patchy low attenuation, upper-lobe predominant; bullae at the apices.
    emph = a["emphysema"]
    kk, jj, ii = np.nonzero(lung)
    if emph["severity"] != "none":
        frac = SEVERITY_LAA[emph["severity"]] * rng.uniform(0.85, 1.15)
        field = smooth_noise(rng, cv.shape, (40, 36, 36))[kk, jj, ii] + 1.5 * (cv.z[kk] / g["Lz"])
        thr = np.quantile(field, 1 - frac)
        m = field > thr
        cv.hu[kk[m], jj[m], ii[m]] = -978.0 + 8 * rng.standard_normal(int(m.sum())).astype(np.float32)
        emph["target_laa_fraction"] = round(float(frac), 3)
        top = np.nonzero(cv.z[kk] > g["z_apex"] - 60)[0]
        for _ in range(int(emph.get("bullae", 0))):
            if top.size == 0:
                break
            i = top[int(rng.integers(top.size))]
            r = rng.uniform(10, 22)
            c = (cv.z[kk[i]], cv.y[jj[i]], cv.x[ii[i]])
            sl, occ = cv.ellipsoid(c, (r, r, r))
            cv.paint(sl, occ, np.float32(-998), where=lung[sl])
    # Consolidation / ground glass: a smooth blob covering a share of one lobe, dependent.
    lobe = g["lobe"]
    for op in a["opacities"]:
        li = LOBES.index(op["lobe"])
        in_lobe = lung & (lobe == li)
        kk, jj, ii = np.nonzero(in_lobe)
        if kk.size == 0:
            op["volume_ml"] = 0.0
            continue
        field = smooth_noise(rng, cv.shape, (10, 10, 10))[kk, jj, ii] + 1.2 * cv.y[jj] / g["Bc_post"]
        thr = np.quantile(field, 1 - op["fraction"])
        w = np.clip((field - thr) / 0.3, 0, 1).astype(np.float32)
        cur = cv.hu[kk, jj, ii]
        target = 25.0 if op["kind"] == "consolidation" else cur + 360.0
        cv.hu[kk, jj, ii] = cur + w * (target - cur)
        op["volume_ml"] = round(float((w > 0.5).sum()) * vml, 1)
    # Pulmonary vessel trees and segmental airways from each hilum.
    def inside(p):
        k, j, i = (int(np.floor(p[0] / cv.spacing[0])), int(np.searchsorted(cv.y, p[1])),
                   int(np.searchsorted(cv.x, p[2])))
        return 0 <= k < cv.shape[0] and 0 <= j < cv.shape[1] and 0 <= i < cv.shape[2] and lung0[k, j, i]

    min_r = max(0.22 * float(min(cv.spacing[1:])), 0.6)  # thinner vessels are invisible at CT resolution
    segs = []
    for hil, sx in ((g["hilum_r"], -1.0), (g["hilum_l"], 1.0)):
        for dz, dy, dx in ((0.9, -0.2, 0.4), (0.6, 0.5, 0.4), (0.1, -0.6, 0.8), (0.1, 0.6, 0.7),
                           (-0.8, 0.5, 0.5), (-0.6, -0.4, 0.6), (-0.3, 0.8, 0.3)):
            segs += _vessel_tree(rng, inside, hil, (dz, dy, sx * dx), rng.uniform(4.5, 6.0), min_r)
    for p0, p1, r0, r1 in segs:
        sl, occ = cv.capsule(p0, p1, r0, r1)
        cv.paint(sl, occ, np.float32(40), L["vessels"], where=lung[sl])
    for (_, p1, _r0, r1), sx in zip(g["tubes"]["airway"][1:], (-1.0, 1.0)):
        for dz, dy, dx in ((0.8, 0.0, 0.4), (-0.8, 0.3, 0.5)):
            for q0, q1, s0, s1 in _vessel_tree(rng, inside, p1, (dz, dy, sx * dx), r1 * 0.75, 1.6):
                sl, occ = cv.capsule(q0, q1, s0 + 1.0, s1 + 1.0)
                cv.paint(sl, occ, np.float32(0), L["airway"], where=lung[sl])
                sl, occ = cv.capsule(q0, q1, s0, s1)
                cv.paint(sl, occ, np.float32(-1000), L["airway"], where=lung[sl])
    # Nodules: soft-tissue spheres fully inside the requested lobe.
    for nd in a["nodules"]:
        r = nd["diameter_mm"] / 2
        kk, jj, ii = np.nonzero(lung0 & (lobe == LOBES.index(nd["lobe"])) & (cv.labels != L["effusion"]))
        placed = False
        for _ in range(40):
            if kk.size == 0:
                break
            i = int(rng.integers(kk.size))
            c = (cv.z[kk[i]], cv.y[jj[i]], cv.x[ii[i]])
            sl, occ = cv.ellipsoid(c, (r, r, r), margin=2.0)
            if (occ > 0.5).sum() and (lung0[sl][occ > 0.5]).mean() > 0.97:
                sl, occ = cv.ellipsoid(c, (r, r, r))
                cv.paint(sl, occ, np.float32(35), L["nodule"])
                nd["center_mm"] = [round(float(v), 1) for v in c]
                placed = True
                break
        nd["placed"] = placed
