"""Label-free measurements of a chest CT volume (HU + spacing only) for phantom-world evaluation.

A generated volume has no label map, so what `ctgen.data.anatomy.measure` reads from labels is
found here by plain image analysis: HU thresholds, a light Gaussian smoothing against noise,
per-slice convex hulls, distance-transform openings and connected components (scipy). No learned
model. Canonical (D, H, W) volumes: slice 0 inferior, row 0 anterior, column 0 the patient's right.

  body     tissue above -400 HU (smoothed), the largest 3-D component, holes filled per slice;
  lungs    air inside the body, 3-D components of at least 10% of the largest; the trachea is
           tracked down from the top slice and removed;
  fluid    pleural effusion: water-density regions (0-20 HU) against a lung, mostly outside that
           lung's convex hull (fluid lies between lung and chest wall; the hull holds abdomen or
           lung disease), behind the lungs' centre, median HU below a consolidation's; split into
           right and left at the body's mid-column;
  heart    tissue at blood / myocardium density (28-53 HU local mean, below the liver's ~58)
           inside the hull of the lungs, opened with a 12 mm ball (cuts it from the liver dome and
           the great vessels), the component most inside the anterior mediastinum;
  nodules  round blobs in the lungs' holes and hulls that survive an opening by half the smallest
           detectable diameter (`nodule_min_diameter_mm`, four in-plane voxels: vessels vanish).
The cardiothoracic ratio follows `ctgen.data.anatomy.cardiothoracic_ratio`: the widest transverse
heart extent over the inner thoracic extent (lungs + fluid + heart) on the same slice. %LAA-950 is
the share of lung voxels (raw HU) under -950.

`measure_volume` does not raise on an odd volume: a structure that is not found gives NaN and a
reason under `reasons`. `python -m ctgen.eval.phantom_measure --validate N` measures N phantoms and
compares with their label-based truth (`ctgen.eval.phantom_validate`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """Thresholds (HU) and sizes (mm, mL) of the measurements; the defaults are the validated ones."""

    air_hu: float = -400.0           # air (outside, lung) vs body tissue, midway lung / soft tissue (smoothed)
    laa_hu: float = -950.0           # %LAA-950
    fluid_core_hu: tuple[float, float] = (-5.0, 19.0)   # smoothed: water-like, below consolidation (25)
    fluid_hu: tuple[float, float] = (-45.0, 70.0)       # raw HU a fluid voxel may have (noise)
    soft_hu: float = 28.0            # smoothed: heart / vessels / muscle, above fluid
    heart_hu: tuple[float, float] = (28.0, 53.0)   # blood (~40) and myocardium, below liver (~58)
    heart_rim_mm: float = 4.0        # partial-volume rim grown back after the opening
    heart_edge_hu: float = -50.0     # heart boundary: midway between fat (-95) and myocardium (45)
    smooth_mm: float = 3.0           # Gaussian sigma, at most one voxel per axis
    heart_open_mm: float = 12.0      # opening radius: cuts the heart from the liver dome, vessels
    min_lung_fraction: float = 0.1   # an air component is lung if >= this share of the largest
    min_effusion_ml: float = 15.0    # smallest fluid component counted as effusion
    effusion_present_ml: float = 30.0   # a side "has" an effusion from this volume on
    nodule_diameter_mm: tuple[float, float] = (4.0, 30.0)
    nodule_max_elongation: float = 1.7  # largest extent / equivalent diameter of a round nodule
    nodule_min_share: float = 0.4    # nodule / the dense structure it sits in (vessels are long trees)
    trachea_max_area_mm2: float = 800.0
    trachea_max_offset_mm: float = 20.0  # trachea centre to the body's mid-column at the top slice


def _sigma_vox(spacing: np.ndarray, mm: float) -> tuple[float, ...]:
    """Gaussian sigma per axis in voxels: `mm`, capped at one voxel (thick slices are not smoothed)."""
    return tuple(float(min(1.0, mm / s)) if mm / s >= 0.3 else 0.0 for s in spacing)


def _open_mm(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Morphological opening by a ball of `radius_mm` (true millimetres on the anisotropic grid), by
    distance transforms on the mask's bounding box: the union of all such balls inside the mask."""
    out = np.zeros_like(mask)
    box = ndimage.find_objects(mask.astype(np.int8))
    if not box:
        return out
    sub = np.pad(mask[box[0]], 1)  # a background border, so the box edge counts as outside
    core = ndimage.distance_transform_edt(sub, sampling=spacing) >= radius_mm
    if core.any():
        opened = (ndimage.distance_transform_edt(~core, sampling=spacing) <= radius_mm) & sub
        out[box[0]] = opened[1:-1, 1:-1, 1:-1]
    return out


def _in_plane(struct_2d: np.ndarray) -> np.ndarray:
    s = np.zeros((3,) + struct_2d.shape, bool)
    s[1] = struct_2d
    return s


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def _count(lab: np.ndarray, n: int, mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` in each of the components 1..n of `lab`."""
    return np.bincount(lab[mask], minlength=n + 1)[1:]


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial slice: background components (in-plane connectivity) that do
    not reach the slice's edge."""
    lab, _ = ndimage.label(~mask, structure=_in_plane(ndimage.generate_binary_structure(2, 1)))
    edge = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    return mask | ~np.isin(lab, edge)


def _hull_2d(mask: np.ndarray) -> np.ndarray:
    """Convex hull of a 2-D mask (pixel centres) as a mask, filled row by row from the hull's
    half-planes; the mask itself if degenerate."""
    rows = np.nonzero(mask.any(axis=1))[0]
    first = np.argmax(mask[rows], axis=1)
    last = mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], axis=1)
    pts = np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)]).astype(np.float64)
    if len(np.unique(pts, axis=0)) < 3:
        return mask.copy()
    try:
        eq = ConvexHull(pts).equations  # a*row + b*col + c <= 0 inside
    except QhullError:
        return mask.copy()
    a, b, c = eq[:, 0], eq[:, 1], eq[:, 2]
    rows = np.arange(mask.shape[0], dtype=np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = -(a * rows + c) / b  # (H, facets)
    lo = np.max(np.where(b < -1e-12, bound, -np.inf), axis=1)
    hi = np.min(np.where(b > 1e-12, bound, np.inf), axis=1)
    flat = np.all(np.where(np.abs(b) <= 1e-12, a * rows + c <= 1e-6, True), axis=1)
    cols = np.arange(mask.shape[1])[None, :]
    return (flat[:, None] & (cols >= lo[:, None] - 1e-6) & (cols <= hi[:, None] + 1e-6)) | mask


def _between_lungs(lung: np.ndarray, mid: int) -> np.ndarray:
    """Per slice and row: the columns strictly between the right lung's and the left lung's medial edges."""
    D, H, W = lung.shape
    cols = np.arange(W)
    right = np.where(lung[:, :, :mid], cols[:mid], -1).max(axis=2)          # (D, H), -1 = no right lung
    left = np.where(lung[:, :, mid:], cols[mid:], W).min(axis=2)            # (D, H), W = no left lung
    ok = (right >= 0) & (left < W)
    return ok[:, :, None] & (cols > right[:, :, None]) & (cols < left[:, :, None])


def _extent(cols: np.ndarray) -> int:
    """Number of columns from the first to the last True (0 if none)."""
    idx = np.nonzero(cols)[0]
    return int(idx[-1] - idx[0] + 1) if idx.size else 0


def _airway(air: np.ndarray, mid_col: float, spacing: np.ndarray, cfg: MeasureConfig) -> np.ndarray:
    """Trachea: a small air component near the mid-column in the first slice (from the top) with air,
    followed down through the overlapping small components; where it touches a lung apex in-plane,
    its last clean cross-section is carried straight down while that footprint stays mostly air
    (the trachea is nearly vertical; the footprint fills with tissue at the carina)."""
    out = np.zeros_like(air)
    pix = float(spacing[1] * spacing[2])
    prev, merged = None, False
    for k in range(air.shape[0] - 1, -1, -1):
        if merged:
            if air[k][prev].mean() < 0.5:
                break
            out[k] = prev & air[k]
            continue
        lab, n = ndimage.label(air[k])
        if n == 0:
            if prev is None:
                continue
            break
        idx = np.arange(1, n + 1)
        area = np.bincount(lab.ravel(), minlength=n + 1)[1:] * pix
        small = area <= cfg.trachea_max_area_mm2
        if prev is None:
            cx = np.asarray(ndimage.center_of_mass(np.ones_like(lab), lab, idx)).reshape(-1, 2)[:, 1]
            off = np.abs(cx - mid_col) * spacing[2]
            ok = small & (off <= cfg.trachea_max_offset_mm)
            if not ok.any():
                return out
            keep = [int(idx[np.argmin(np.where(ok, off, np.inf))])]
        else:
            touched = [int(i) for i in np.unique(lab[ndimage.binary_dilation(prev)]) if i > 0]
            if not touched:
                break
            if not all(small[i - 1] for i in touched) or area[np.asarray(touched) - 1].sum() > cfg.trachea_max_area_mm2:
                merged = True  # joined a lung apex in this slice
                if air[k][prev].mean() < 0.5:
                    break
                out[k] = prev & air[k]
                continue
            keep = touched
        prev = np.isin(lab, keep)
        out[k] = prev
    return out


def _side_hulls(lung: np.ndarray, mid: int) -> np.ndarray:
    """Per slice: the convex hull of the right lung and the convex hull of the left lung."""
    hull = np.zeros_like(lung)
    for k in np.nonzero(lung.any(axis=(1, 2)))[0]:
        hull[k, :, :mid] = _hull_2d(lung[k, :, :mid])
        hull[k, :, mid:] = _hull_2d(lung[k, :, mid:])
    return hull


def _segment(hu: np.ndarray, spacing: np.ndarray, cfg: MeasureConfig) -> dict:
    """Masks (body, lung, airway, side_hull, fluid, heart; any may be empty), the smoothed volume and
    the body's mid-column."""
    sm = ndimage.gaussian_filter(hu, _sigma_vox(spacing, cfg.smooth_mm), mode="nearest", truncate=2.0)
    body = _fill_slices(_largest(sm >= cfg.air_hu))
    seg = {"smoothed": sm, "body": body}
    cols = np.nonzero(body.any(axis=(0, 1)))[0]
    mid = float(np.average(np.arange(body.shape[2]), weights=body.sum(axis=(0, 1)))) if cols.size else hu.shape[2] / 2
    seg["mid_col"] = mid
    air = (sm < cfg.air_hu) & body
    airway = _airway(air, mid, spacing, cfg)
    lab, n = ndimage.label(air & ~airway)
    lung = np.zeros_like(air)
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        big = np.nonzero(sizes >= cfg.min_lung_fraction * sizes.max())[0] + 1
        lung = np.isin(lab, big)
    seg.update(airway=airway, lung=lung, side_hull=_side_hulls(lung, int(round(mid))))
    seg["fluid"] = _fluid(hu, sm, body, lung, seg["side_hull"], spacing, cfg)
    seg["heart"] = _heart(sm, lung, seg["fluid"], mid, spacing, cfg)
    return seg


def _fluid(hu, sm, body, lung, side_hull, spacing, cfg: MeasureConfig) -> np.ndarray:
    """Pleural fluid: water-density components against the lungs, mostly outside each lung's convex
    hull (fluid displaces the lung from the chest wall; what the hull holds is abdomen or lung
    disease), with the centre behind the lungs' centre (dependent)."""
    free = body & ~lung
    core = (sm >= cfg.fluid_core_hu[0]) & (sm <= cfg.fluid_core_hu[1]) & free
    # partial-volume shells between fat and muscle fall in the fluid range too, but are thin
    core = ndimage.binary_opening(core, structure=_in_plane(np.ones((2, 2), bool)))
    grow = (hu >= cfg.fluid_hu[0]) & (hu <= cfg.fluid_hu[1]) & (sm < cfg.soft_hu) & free
    fluid = ndimage.binary_dilation(core, iterations=2, mask=grow) | core  # edge voxels the smoothing lost
    lab, n = ndimage.label(fluid)
    if n == 0 or not lung.any():
        return np.zeros_like(fluid)
    idx = np.arange(1, n + 1)
    size = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    ml = size * float(np.prod(spacing)) / 1000.0
    touches = _count(lab, n, ndimage.binary_dilation(lung)) > 0
    outside = _count(lab, n, ~side_hull) >= 0.5 * size
    rows = np.asarray(ndimage.center_of_mass(fluid, lab, idx))[:, 1]
    behind = rows >= ndimage.center_of_mass(lung)[1]
    keep = idx[(ml >= cfg.min_effusion_ml) & touches & outside & behind]
    # water, not the low tail of a consolidation (~25 HU, soft-edged) or of the abdomen
    boxes = ndimage.find_objects(lab)
    keep = [i for i in keep if np.median(hu[boxes[i - 1]][lab[boxes[i - 1]] == i]) <= cfg.fluid_core_hu[1]]
    return np.isin(lab, keep)


def _tissue_mean(sm: np.ndarray, mask: np.ndarray, spacing: np.ndarray, mm: float) -> np.ndarray:
    """Local mean HU over `mask` only (normalised convolution): tells blood from liver without the
    lung or fat next to them pulling the mean down."""
    sigma = [min(mm / s, 2.0) if mm / s >= 0.3 else 0.0 for s in spacing]
    num = ndimage.gaussian_filter(np.where(mask, sm, 0.0).astype(np.float32), sigma, truncate=2.0)
    den = ndimage.gaussian_filter(mask.astype(np.float32), sigma, truncate=2.0)
    return num / np.maximum(den, 1e-3)


def _heart(sm, lung, fluid, mid, spacing, cfg: MeasureConfig) -> np.ndarray:
    """The heart: soft tissue at blood/myocardium density inside the lungs' hull, opened to cut it
    from the liver dome and the vessels, the component most in the anterior mediastinum."""
    c = int(round(mid))
    both = lung[:, :, :c].any(axis=(1, 2)) & lung[:, :, c:].any(axis=(1, 2))
    hull = np.zeros_like(lung)
    for k in np.nonzero(both)[0]:
        hull[k] = _hull_2d(lung[k] | fluid[k])
    free = hull & ~lung & ~fluid
    t = _tissue_mean(sm, free & (sm > cfg.heart_hu[0]), spacing, cfg.smooth_mm * 2)
    # class by the local tissue mean (noise-free), membership by the voxel itself (not fat, not lung)
    band = free & (sm > cfg.heart_edge_hu) & (t > cfg.heart_hu[0]) & (t < cfg.heart_hu[1])
    lab, n = ndimage.label(_open_mm(band, spacing, cfg.heart_open_mm))
    if n == 0:
        return np.zeros_like(lung)
    # score: voxels in the anterior mediastinum (between the lungs, in front of their centre)
    ant = _between_lungs(lung, c)
    ant[:, int(round(ndimage.center_of_mass(lung)[1])):, :] = False
    score = _count(lab, n, ant)
    if score.max() <= 0:
        return np.zeros_like(lung)
    heart = lab == int(np.argmax(score)) + 1
    # the opening rounds the edges off and the soft-tissue threshold misses the partial-volume rim
    rim = free & (sm > cfg.heart_edge_hu) & (t < cfg.heart_hu[1])
    steps = max(1, int(round(cfg.heart_rim_mm / float(spacing[2]))))
    return ndimage.binary_dilation(heart, structure=_in_plane(ndimage.generate_binary_structure(2, 1)),
                                   iterations=steps, mask=rim)


def nodule_min_diameter_mm(spacing_dhw: Sequence[float], cfg: "MeasureConfig | None" = None) -> float:
    """Smallest nodule `measure_volume` can tell from a vessel on this grid: four in-plane voxels
    (a vessel cross-section is up to about three), and at least `cfg.nodule_diameter_mm[0]`."""
    cfg = cfg or MeasureConfig()
    return max(cfg.nodule_diameter_mm[0], 4.0 * float(min(spacing_dhw[1], spacing_dhw[2])))


def _nodules(lung: np.ndarray, fluid: np.ndarray, side_hull: np.ndarray, spacing: np.ndarray,
             cfg: MeasureConfig) -> list[float]:
    """Equivalent diameters (mm) of round blobs in the lungs: the lungs' in-plane holes and convex
    hulls (a nodule against the chest wall is no hole), opened with a ball of half the smallest
    detectable diameter (removes vessels, cuts nodules from the vessels they touch), kept if about
    as long as wide and most of the structure they were opened from (not a vessel tree's piece)."""
    dense = (_fill_slices(lung) | side_hull) & ~lung & ~fluid
    parent, _ = ndimage.label(dense)
    parent_size = np.bincount(parent.ravel())
    lab, _ = ndimage.label(_open_mm(dense, spacing, nodule_min_diameter_mm(spacing, cfg) / 2))
    voxel = float(np.prod(spacing))
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab)):
        blob = lab[sl] == i + 1
        n = int(blob.sum())
        d_eq = (6.0 * n * voxel / math.pi) ** (1.0 / 3.0)
        ext = np.array([s.stop - s.start for s in sl]) * spacing
        # a piece of a vessel tree is a small part of the structure it was opened from
        share = n / parent_size[np.bincount(parent[sl][blob]).argmax()]
        if (np.all(ext <= cfg.nodule_max_elongation * d_eq + spacing) and share >= cfg.nodule_min_share
                and cfg.nodule_diameter_mm[0] <= d_eq <= cfg.nodule_diameter_mm[1]):
            out.append(round(d_eq, 1))
    return out


def effusion_side(right_ml: float, left_ml: float, present_ml: float = MeasureConfig.effusion_present_ml) -> str:
    """"none", "right", "left" or "both": the sides whose fluid volume is at least `present_ml`."""
    r, l = right_ml >= present_ml, left_ml >= present_ml
    return "both" if r and l else ("right" if r else ("left" if l else "none"))


def measure_volume(hu_DxHxW: np.ndarray, spacing_dhw: Sequence[float], cfg: MeasureConfig = MeasureConfig()) -> dict:
    """Label-free phantom measurements of a canonical HU volume; NaN (and a reason) where not found.

    Keys: cardiothoracic_ratio, effusion_right_ml, effusion_left_ml, effusion_side, nodule_count,
    nodule_diameters_mm, laa950_percent, lung_volume_ml, mean_lung_hu, reasons ({key: why NaN}).
    """
    hu = np.asarray(hu_DxHxW, np.float32)
    spacing = np.asarray(spacing_dhw, np.float64)
    if hu.ndim != 3 or spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"need a 3-D volume and 3 positive spacings, got shape {hu.shape}, spacing {spacing_dhw}")
    out: dict = {"cardiothoracic_ratio": NAN, "effusion_right_ml": NAN, "effusion_left_ml": NAN,
                 "effusion_side": None, "nodule_count": NAN, "nodule_diameters_mm": [],
                 "laa950_percent": NAN, "lung_volume_ml": NAN, "mean_lung_hu": NAN, "reasons": {}}
    why = out["reasons"]
    seg = _segment(hu, spacing, cfg)
    lung = seg["lung"]
    if not seg["body"].any() or not lung.any():
        reason = ("no body (nothing above %g HU)" % cfg.air_hu if not seg["body"].any()
                  else "no air-density region (< %g HU) inside the body" % cfg.air_hu)
        for k in ("cardiothoracic_ratio", "effusion_right_ml", "effusion_left_ml", "effusion_side",
                  "nodule_count", "laa950_percent", "lung_volume_ml", "mean_lung_hu"):
            why[k] = reason
        return out
    vml = float(np.prod(spacing)) / 1000.0
    lung_hu = hu[lung]
    out["lung_volume_ml"] = round(float(lung.sum()) * vml, 1)
    out["mean_lung_hu"] = round(float(lung_hu.mean()), 1)
    out["laa950_percent"] = round(100.0 * float((lung_hu < cfg.laa_hu).mean()), 2)
    fluid, c = seg["fluid"], int(round(seg["mid_col"]))
    out["effusion_right_ml"] = round(float(fluid[:, :, :c].sum()) * vml, 1)
    out["effusion_left_ml"] = round(float(fluid[:, :, c:].sum()) * vml, 1)
    out["effusion_side"] = effusion_side(out["effusion_right_ml"], out["effusion_left_ml"], cfg.effusion_present_ml)
    diam = _nodules(lung, fluid, seg["side_hull"], spacing, cfg)
    out["nodule_count"], out["nodule_diameters_mm"] = len(diam), diam
    heart = seg["heart"]
    if not heart.any():
        why["cardiothoracic_ratio"] = "no soft-tissue component (> %g HU) between the lungs" % cfg.soft_hu
        return out
    out["cardiothoracic_ratio"] = round(_ctr(heart, lung | fluid, spacing), 4)
    return out


def _ctr(heart: np.ndarray, thorax: np.ndarray, spacing: np.ndarray) -> float:
    """Widest transverse heart extent over the thorax extent (thorax | heart) on that slice.

    Slices are scanned from the top, among those holding at least half of the heart's largest
    cross-section (the vessels leaving the top are narrow): the heart's upper half is bordered by
    lung only, while below its widest level it may touch the abdomen under the diaphragm. So the scan
    stops where the (slightly smoothed) width grows again after the width or the area began to fall,
    or grows 25% more than the growth of the area allows (a cross-section keeps its shape).
    """
    area = heart.sum(axis=(1, 2))
    width = np.array([_extent(h.any(axis=0)) for h in heart], np.float64)
    win = max(1, int(round(6.0 / float(spacing[0])))) | 1
    smooth = ndimage.median_filter(width, size=win, mode="nearest")
    best_k, best, top_area, last, last_area, falling = -1, -1.0, 0, None, 0, False
    for k in range(len(width) - 1, -1, -1):
        if area[k] < 0.5 * area.max():
            continue
        falling = falling or smooth[k] < best or area[k] < 0.9 * top_area
        if last is not None and smooth[k] > last and (
                falling or smooth[k] > 1.25 * last * math.sqrt(area[k] / max(last_area, 1))):
            break  # grows again after the widest level, or wider than its area allows: an appendage
        if smooth[k] > best or (smooth[k] == best and width[k] > width[best_k]):
            best_k, best = k, smooth[k]
        top_area, last, last_area = max(top_area, area[k]), smooth[k], area[k]
    return float(width[best_k] / _extent((heart[best_k] | thorax[best_k]).any(axis=0)))


def main(argv: Sequence[str] | None = None) -> int:
    """`--validate N --shape D,H,W [--tokenizer DIR [--superres DIR]]`: agreement with N phantoms'
    label-based truth (Markdown table); with --tokenizer, of the measurements of their CT-ViT
    reconstructions; with --superres too, of those reconstructions super-resolved back to the grid."""
    import argparse
    import json

    from ctgen.eval.phantom_validate import (cascade_transform, ctvit_transform, summarize, summarize_tissue,
                                             summary_table, tissue_table, validate)

    p = argparse.ArgumentParser(prog="python -m ctgen.eval.phantom_measure", description=main.__doc__)
    p.add_argument("--validate", type=int, required=True, metavar="N", help="number of phantoms")
    p.add_argument("--shape", default="33,64,64", help="phantom grid D,H,W (default 33,64,64)")
    p.add_argument("--seed", type=int, default=0, help="PhantomSource seed (default 0)")
    p.add_argument("--json", help="also write the per-phantom rows and the summary here")
    p.add_argument("--tokenizer", metavar="DIR", help="measure each phantom's reconstruction by this CT-ViT "
                   "(workdir, weights directory or GenerateCT file) on its grid instead of the phantom")
    p.add_argument("--superres", metavar="DIR", help="with --tokenizer: super-resolve each reconstruction back to "
                   "the phantom's grid with this SR (workdir or weights directory), conditioned on the phantom's prompt; "
                   "'bicubic' upsamples it bicubically instead (the baseline an SR should beat)")
    p.add_argument("--sr-sampler", default="ancestral", help="SR sampler: ancestral (default) or ddim")
    p.add_argument("--sr-steps", type=int, default=25, help="SR sampling steps (default 25)")
    p.add_argument("--sr-noise-level", type=float, default=0.1, help="SR low-res noise level (default 0.1)")
    p.add_argument("--sr-threshold", type=float, default=0.95, help="SR dynamic threshold, 0 = clip (default 0.95)")
    p.add_argument("--sr-cond-scale", type=float, default=1.0,
                   help="SR classifier-free guidance scale on the phantom's prompt (default 1: no guidance)")
    p.add_argument("--sr-average", type=int, default=1, help="SR samples per slice averaged (default 1)")
    args = p.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
        assert len(shape) == 3
    except (ValueError, AssertionError):
        p.error(f"--shape needs three integers D,H,W, got {args.shape!r}")
    if args.superres and not args.tokenizer:
        p.error("--superres needs --tokenizer (the CT-ViT whose reconstructions it upsamples)")
    transform, through, sr_settings = None, "", None
    if args.superres == "bicubic":
        from ctgen.eval.phantom_validate import bicubic_transform

        transform = bicubic_transform(args.tokenizer)
        through = f", reconstructed by the CT-ViT {args.tokenizer} and upsampled bicubically"
    elif args.superres:
        from ctgen.sampling.superres import SamplerConfig

        sampler = SamplerConfig(sampler=args.sr_sampler, steps=args.sr_steps, noise_level=args.sr_noise_level,
                                threshold=args.sr_threshold, cond_scale=args.sr_cond_scale, average=args.sr_average)
        transform = cascade_transform(args.tokenizer, args.superres, sampler)
        sr_settings = dataclasses.asdict(sampler)
        guided = f", guidance {sampler.cond_scale:g}" if sampler.cond_scale != 1 else ""
        guided += f", mean of {sampler.average} samples" if sampler.average != 1 else ""
        through = (f", reconstructed by the CT-ViT {args.tokenizer} and super-resolved by {args.superres} "
                   f"({sampler.sampler} {sampler.steps} steps{guided})")
    elif args.tokenizer:
        transform = ctvit_transform(args.tokenizer)
        through = f", reconstructed by the CT-ViT {args.tokenizer}"
    rows = validate(args.validate, shape, seed=args.seed, transform=transform, progress=transform is not None)
    summary = summarize(rows)
    seconds = float(np.mean([r["seconds"] for r in rows]))
    print(f"{len(rows)} phantoms on {shape[0]}x{shape[1]}x{shape[2]} (seed {args.seed}){through}, "
          f"{seconds:.2f} s per measurement\n")
    print(summary_table(summary))
    tissue = summarize_tissue(rows)
    if tissue:
        print("\nHU error of the handed-back volume against the phantom, inside each label (2 voxels from its edge):\n")
        print(tissue_table(tissue))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "seed": args.seed, "tokenizer": args.tokenizer, "superres": args.superres,
                       "sr_sampler": sr_settings, "summary": summary, "tissue": tissue, "rows": rows},
                      f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
