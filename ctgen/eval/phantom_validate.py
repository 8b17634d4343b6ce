"""Agreement of the label-free phantom measurements with the phantoms' label-based truth.

`ctgen.eval.phantom_measure.measure_volume` sees only HU; a phantom also carries its label map,
whose measurements (`ctgen.data.anatomy.measure`, stored as `attributes["measured"]`) are the
truth here, with two exceptions: nodules count when placed and at least `nodule_min_diameter_mm`
of the grid (smaller ones cannot be told from vessels at that resolution), and the lung volume and
mean lung HU are judged only without consolidation (the labels count consolidated lung as lung; the
label-free lung mask is aerated lung, as a %LAA measurement wants).

    python -m ctgen.eval.phantom_measure --validate 50 --shape 33,64,64

measures the demo's phantoms (`PhantomSource`, the same seeds and spacing) and prints the agreement
per attribute against `TOLERANCES`. With `--tokenizer DIR` each phantom is first passed through that
CT-ViT (resized in-plane to its slice size, encoded, decoded; `ctvit_transform`) and measured on
the CT-ViT's grid: the best any generator that decodes through this CT-ViT can hand the
measurement, i.e. the ceiling of a cascade's prompt adherence. `--superres DIR` adds the SR
stage: the reconstruction is super-resolved back to the phantom's grid (conditioned on the
phantom's own prompt, encoded by the built-in T5) and measured there (`cascade_transform`).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from ctgen.eval.phantom_measure import MeasureConfig, effusion_side, measure_volume, nodule_min_diameter_mm

# attribute: (kind, tolerance). "abs": |measured - truth| <= tol; "rel": relative error <= tol;
# "exact": equal. Effusion volumes are judged where the truth is at least EFFUSION_JUDGED_ML
# (smaller effusions are judged by their side).
TOLERANCES: dict[str, tuple[str, float]] = {
    "cardiothoracic_ratio": ("abs", 0.05),
    "effusion_side": ("exact", 0.0),
    "effusion_right_ml": ("rel", 0.35),
    "effusion_left_ml": ("rel", 0.35),
    "nodule_count": ("abs", 1.0),
    "laa950_percent": ("abs", 2.0),
    "lung_volume_ml": ("rel", 0.10),
    "mean_lung_hu": ("abs", 30.0),
}
EFFUSION_JUDGED_ML = 100.0

Transform = Callable[[np.ndarray, np.ndarray, dict], "tuple[np.ndarray, np.ndarray]"]
"""(HU volume (D, H, W), spacing (3,) mm, the phantom as `PhantomSource.load` returns it) -> the
volume to measure and its spacing."""


def phantom_truth(attributes: dict, spacing_dhw: Sequence[float], cfg: MeasureConfig = MeasureConfig()) -> dict:
    """The values `measure_volume` should find in a phantom with these attributes (`make_phantom`'s)."""
    m = attributes["measured"]
    detectable = nodule_min_diameter_mm(spacing_dhw, cfg)
    consolidated = any(o["kind"] == "consolidation" for o in attributes["opacities"])
    return {
        "cardiothoracic_ratio": m["cardiothoracic_ratio"],
        "effusion_right_ml": m["effusion_right_ml"],
        "effusion_left_ml": m["effusion_left_ml"],
        "effusion_side": effusion_side(m["effusion_right_ml"], m["effusion_left_ml"], cfg.effusion_present_ml),
        "nodule_count": sum(1 for n in attributes["nodules"] if n.get("placed") and n["diameter_mm"] >= detectable),
        "laa950_percent": m["laa950_percent"],
        "lung_volume_ml": None if consolidated else m["lung_volume_ml"],
        "mean_lung_hu": None if consolidated else m["mean_lung_hu"],
    }


def compare(measured: dict, truth: dict) -> dict[str, dict]:
    """Per attribute {truth, measured, error, ok}; ok is None where the attribute is not judged."""
    out = {}
    for key, (kind, tol) in TOLERANCES.items():
        t, m = truth[key], measured[key]
        if t is None or (key.startswith("effusion_") and kind == "rel" and t < EFFUSION_JUDGED_ML):
            out[key] = {"truth": t, "measured": m, "error": None, "ok": None}
            continue
        if kind == "exact":
            out[key] = {"truth": t, "measured": m, "error": None, "ok": t == m}
            continue
        missing = m is None or (isinstance(m, float) and math.isnan(m))
        err = float("nan") if missing else float(m) - float(t)
        if kind == "rel":
            err = err / float(t)
        out[key] = {"truth": t, "measured": m, "error": err, "ok": bool(not missing and abs(err) <= tol)}
    return out


def validate(n: int, shape: Sequence[int], *, seed: int = 0, p_normal: float = 0.3,
             cfg: MeasureConfig = MeasureConfig(), transform: Transform | None = None,
             progress: bool = False) -> list[dict]:
    """Measure the first `n` phantoms of `PhantomSource(n, seed)` on grid `shape`; one row per phantom.
    transform: applied to each phantom before it is measured (e.g. `ctvit_transform`); the truth
    stays the phantom's own. progress: a progress bar over the phantoms (stderr)."""
    from tqdm import tqdm

    from ctgen.data.preprocess import GridConfig
    from ctgen.data.sources import PhantomSource

    src = PhantomSource(n, seed, GridConfig(shape=tuple(int(s) for s in shape)), p_normal=p_normal)
    records, _ = src.scan()
    rows = []
    for rec in tqdm(records, desc="phantoms", unit="phantom", disable=not progress):
        ph = src.load(rec)
        hu, spacing = ph["volume_DxHxW"], np.asarray(ph["spacing"], np.float64)
        row = {"source_id": rec.source_id}
        if transform is not None:
            hu, spacing = transform(hu, spacing, ph)
            if hu.shape == ph["labels"].shape:
                row["tissue"] = tissue_errors(ph["volume_DxHxW"], hu, ph["labels"])
        t0 = time.perf_counter()
        measured = measure_volume(hu, spacing, cfg)
        row.update(seconds=time.perf_counter() - t0,
                   compare=compare(measured, phantom_truth(ph["attributes"], spacing, cfg)))
        rows.append(row)
    return rows


def tissue_errors(truth_hu: np.ndarray, hu: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Per anatomy label: [voxels, sum of (hu - truth), sum of its square] over the label's voxels
    two in-plane voxels or more from its edge (partial volume aside), both clipped to [-1000, 1000]."""
    from scipy import ndimage

    from ctgen.data.anatomy import LABELS

    diff = np.clip(hu, -1000, 1000).astype(np.float64) - np.clip(truth_hu, -1000, 1000)
    out = {}
    for name, code in LABELS.items():
        inner = ndimage.binary_erosion(labels == code, structure=np.ones((1, 5, 5), bool))
        if inner.any():
            d = diff[inner]
            out[name] = [float(d.size), float(d.sum()), float(np.square(d).sum())]
    return out


def summarize_tissue(rows: list[dict]) -> dict[str, dict]:
    """Per label over all rows with tissue errors: voxels, mean error (bias) and its sd, in HU."""
    acc: dict[str, np.ndarray] = {}
    for r in rows:
        for name, v in r.get("tissue", {}).items():
            acc[name] = acc.get(name, np.zeros(3)) + np.asarray(v)
    out = {}
    for name, (n, s, s2) in acc.items():
        mean = s / n
        out[name] = {"voxels": int(n), "bias_hu": float(mean), "sd_hu": float(np.sqrt(max(s2 / n - mean ** 2, 0.0)))}
    return out


def ctvit_transform(tokenizer: str) -> Transform:
    """A phantom -> its reconstruction by the CT-ViT at `tokenizer` (workdir, weights directory or
    GenerateCT file), resized in-plane to the CT-ViT's slice size first as `ctgen prepare --source
    sr-pairs` does; returned in HU with the spacing of that grid. The slice count must suit the
    CT-ViT (1 + a multiple of its temporal patch)."""
    from ctgen.data.preprocess import resize_volume
    from ctgen.stages.superres_pairs import ctvit_reconstructor
    from ctgen.volume import clip_hu, hu_to_model, model_to_hu

    size, per_call, run = ctvit_reconstructor(tokenizer)

    def transform(hu: np.ndarray, spacing: np.ndarray, phantom: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        d, h, w = hu.shape
        x = hu_to_model(resize_volume(clip_hu(np.asarray(hu, np.float32)), (d, size, size)))
        rec = model_to_hu(run(np.repeat(x[None], per_call, axis=0))[0])
        return rec, np.array([spacing[0], spacing[1] * h / size, spacing[2] * w / size], np.float64)

    return transform


def phantom_prompt(phantom: dict) -> str:
    """The prompt `ctgen prepare --source phantom` stores for this phantom (default dataset settings)."""
    from ctgen.data.features import DatasetConfig, text_fields

    fields, _ = text_fields(phantom["report"], DatasetConfig(name="phantom"), float(phantom["age"]), phantom["sex"])
    return fields["prompt"]


def _upsampling_factor(hu: np.ndarray, low: np.ndarray) -> int:
    """The in-plane factor from a CT-ViT reconstruction `low` back to the phantom `hu` (square slices,
    an integer multiple), else UserError."""
    from ctgen.errors import UserError

    scale = hu.shape[1] // low.shape[1]
    if scale * low.shape[1] != hu.shape[1] or hu.shape[1] != hu.shape[2]:
        raise UserError(f"phantom slices {hu.shape[1:]} are not the CT-ViT's {low.shape[1:]} times an integer")
    return scale


def cascade_transform(tokenizer: str, superres: str, sampler=None, *, text_length: int = 128, seed: int = 0) -> Transform:
    """A phantom -> its CT-ViT reconstruction (`ctvit_transform`) super-resolved by the SR U-Net at
    `superres` (workdir or weights directory) back to the phantom's in-plane size, conditioned on
    the phantom's prompt (`phantom_prompt`) encoded by the built-in T5 to `text_length` tokens.
    sampler: a `ctgen.sampling.superres.SamplerConfig` (default: its defaults). The phantom's
    in-plane size must be the CT-ViT's times an integer."""
    from ctgen.convert.superres_store import load_superres
    from ctgen.sampling.superres import SamplerConfig, SliceSampler, upsample_volume
    from ctgen.text.encode import encode_text_to_length
    from ctgen.text.load import load_text_encoder
    from ctgen.volume import hu_to_sr

    recon = ctvit_transform(tokenizer)
    model, _ = load_superres(superres)
    text_model, tok, _ = load_text_encoder("builtin")
    sampler = sampler or SamplerConfig()
    runs: dict[tuple[int, int], SliceSampler] = {}  # one compiled sampler per output size

    def transform(hu: np.ndarray, spacing: np.ndarray, phantom: dict) -> tuple[np.ndarray, np.ndarray]:
        low, _ = recon(hu, spacing)
        scale = _upsampling_factor(hu, low)
        text, full = encode_text_to_length(text_model, tok, [phantom_prompt(phantom)], text_length)
        size = (hu.shape[1], hu.shape[2])
        if size not in runs:
            runs[size] = SliceSampler(model, sampler, size, None, None)
        out = upsample_volume(model, hu_to_sr(low), text[0], full[0], sampler=sampler, scale=scale, output_range="hu",
                              progress=False, rng=seed, slice_sampler=runs[size])
        return out, np.asarray(spacing, np.float64)

    return transform


def bicubic_transform(tokenizer: str) -> Transform:
    """A phantom -> its CT-ViT reconstruction (`ctvit_transform`) upsampled bicubically back to the
    phantom's in-plane size (`ctgen.sampling.superres.bicubic_upsample`, the baseline the SR's eval
    reports): what an SR that adds nothing would hand the measurement. Same grid rule as
    `cascade_transform`."""
    import jax.numpy as jnp

    from ctgen.sampling.superres import bicubic_upsample
    from ctgen.volume import hu_to_sr, sr_to_hu

    recon = ctvit_transform(tokenizer)

    def transform(hu: np.ndarray, spacing: np.ndarray, phantom: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        low, _ = recon(hu, spacing)
        _upsampling_factor(hu, low)
        up = np.asarray(bicubic_upsample(jnp.asarray(hu_to_sr(low)), (hu.shape[1], hu.shape[2])))
        return sr_to_hu(up), np.asarray(spacing, np.float64)

    return transform


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per attribute: judged count, passed count, mean / sd / max |error| over the judged rows."""
    out = {}
    for key, (kind, tol) in TOLERANCES.items():
        judged = [r["compare"][key] for r in rows if r["compare"][key]["ok"] is not None]
        errs = np.array([c["error"] for c in judged if c["error"] is not None], np.float64)
        out[key] = {"kind": kind, "tolerance": tol, "judged": len(judged), "passed": sum(bool(c["ok"]) for c in judged),
                    "mean_error": float(np.nanmean(errs)) if errs.size else None,
                    "sd_error": float(np.nanstd(errs)) if errs.size else None,
                    "max_abs_error": float(np.nanmax(np.abs(errs))) if errs.size else None}
    return out


def tissue_table(tissue: dict[str, dict]) -> str:
    """Markdown table of `summarize_tissue`'s result."""
    lines = ["| tissue (label) | voxels | bias (HU) | sd (HU) |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['voxels']} | {v['bias_hu']:.1f} | {v['sd_hu']:.1f} |" for k, v in tissue.items()]
    return "\n".join(lines)


def summary_table(summary: dict[str, dict]) -> str:
    """Markdown table of `summarize`'s result."""
    lines = ["| attribute | tolerance | passed | mean error | sd | max abs error |", "|---|---|---|---|---|---|"]
    for key, s in summary.items():
        tol = {"abs": f"+-{s['tolerance']:g}", "rel": f"+-{100 * s['tolerance']:g}%", "exact": "exact"}[s["kind"]]
        scale = 100.0 if s["kind"] == "rel" else 1.0
        unit = "%" if s["kind"] == "rel" else ""
        nums = [("-" if s[k] is None else f"{scale * s[k]:.3g}{unit}") for k in ("mean_error", "sd_error", "max_abs_error")]
        lines.append(f"| {key} | {tol} | {s['passed']}/{s['judged']} | " + " | ".join(nums) + " |")
    return "\n".join(lines)
