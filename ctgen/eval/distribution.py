"""Distances between two sets of volumes: Fréchet distances of features, and HU histogram distances.

* `frechet_distance`: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), with
  the matrix square roots from symmetric eigendecompositions (negative round-off eigenvalues
  clipped), which stays real and stable for singular covariances (fewer samples than features).
* `fid_2p5d` / `volume_frechet`: on network features (`ctgen.eval.features`). These are FID /
  FVD-style numbers only with a trained network's weights; ctgen never computes them with a
  random network.
* Without weights: `hu_histogram_distances` (Wasserstein-1 between the pooled HU distributions,
  in HU, and the Fréchet distance between per-volume HU histograms) and `attribute_frechet`
  (Fréchet distance between per-volume phantom measurements, z-scored over both sets).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ctgen.volume import HU_MAX, HU_MIN, clip_hu

HU_BINS = np.linspace(HU_MIN, HU_MAX, 41)  # 50 HU wide bins over [-1000, 1000]
ATTRIBUTES = ("cardiothoracic_ratio", "effusion_right_ml", "effusion_left_ml", "nodule_count",
              "laa950_percent", "lung_volume_ml", "mean_lung_hu")


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_stats(x_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (biased for N=1, else unbiased) covariance of the rows, float64."""
    x = np.asarray(x_NxD, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need a non-empty (N, D) feature array, got shape {x.shape}")
    cov = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
    return x.mean(axis=0), np.atleast_2d(cov)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    s1h = _sqrt_psd(np.asarray(sigma1, np.float64))
    m = s1h @ np.asarray(sigma2, np.float64) @ s1h
    tr_cross = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None))))
    d = float(np.sum((np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)) ** 2))
    return max(0.0, d + float(np.trace(sigma1)) + float(np.trace(sigma2)) - 2.0 * tr_cross)


def frechet_between(a_NxD: np.ndarray, b_MxD: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits (`gaussian_stats`) of two feature sets.

    With few samples for the dimension (N M < D^2) it works on the samples: with S1 = A'A and
    S2 = B'B (centred rows over sqrt(N - 1)), tr((S1^1/2 S2 S1^1/2)^1/2) is the sum of the singular
    values of A B' (N x M), so no D x D matrix is formed; otherwise on the covariances.
    """
    a, b = np.asarray(a_NxD, np.float64), np.asarray(b_MxD, np.float64)
    if a.ndim != 2 or b.ndim != 2 or len(a) * len(b) >= a.shape[1] ** 2 or not len(a) or not len(b):
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    A = (a - mu_a) / math.sqrt(max(len(a) - 1, 1))
    B = (b - mu_b) / math.sqrt(max(len(b) - 1, 1))
    cross = float(np.sum(np.linalg.svd(A @ B.T, compute_uv=False)))
    return max(0.0, float(np.sum((mu_a - mu_b) ** 2) + np.sum(A * A) + np.sum(B * B)) - 2.0 * cross)


def fid_2p5d(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-plane Fréchet distances of slice features (`features.extract` outputs) and their mean."""
    from ctgen.eval.features import PLANES

    out = {f"fid_{p}": frechet_between(generated[p], reference[p]) for p in PLANES}
    out["fid_2p5d"] = float(np.mean([out[f"fid_{p}"] for p in PLANES]))
    return out


def volume_frechet(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """FVD-style: Fréchet distance between per-volume features (`features.extract`'s "volume")."""
    return frechet_between(generated["volume"], reference["volume"])


def hu_histogram(hu: np.ndarray, bins: np.ndarray = HU_BINS) -> np.ndarray:
    """Share of voxels per HU bin, after clipping to [-1000, 1000]."""
    h, _ = np.histogram(clip_hu(np.asarray(hu, np.float32)), bins=bins)
    return h / max(int(h.sum()), 1)


def histogram_distances(generated_NxB: np.ndarray, reference_MxB: np.ndarray,
                        bins: np.ndarray = HU_BINS) -> dict[str, float]:
    """hu_wasserstein: Wasserstein-1 distance (HU, histogram resolution) between the mean
    histograms of the two sets (each volume weighted equally); hu_histogram_frechet: Fréchet
    distance between the sets of per-volume histograms (shares per bin)."""
    g, r = np.asarray(generated_NxB, np.float64), np.asarray(reference_MxB, np.float64)
    cdf_gap = np.abs(np.cumsum(g.mean(axis=0)) - np.cumsum(r.mean(axis=0)))[:-1]
    return {"hu_wasserstein": float(np.sum(cdf_gap * np.diff(bins)[:-1])),
            "hu_histogram_frechet": frechet_between(g, r)}


def hu_histogram_distances(generated: Sequence[np.ndarray], reference: Sequence[np.ndarray],
                           bins: np.ndarray = HU_BINS) -> dict[str, float]:
    """`histogram_distances` of two sets of HU volumes."""
    return histogram_distances(np.stack([hu_histogram(v, bins) for v in generated]),
                               np.stack([hu_histogram(v, bins) for v in reference]), bins)


def attribute_matrix(measurements: Sequence[dict], keys: Sequence[str] = ATTRIBUTES) -> np.ndarray:
    """(N, K) measurement values; rows with a missing (NaN) value are dropped."""
    rows = [[float(m[k]) if m.get(k) is not None else math.nan for k in keys] for m in measurements]
    x = np.asarray(rows, np.float64).reshape(len(rows), len(keys))
    return x[np.all(np.isfinite(x), axis=1)]


def attribute_frechet(generated: Sequence[dict], reference: Sequence[dict],
                      keys: Sequence[str] = ATTRIBUTES) -> dict[str, float | int]:
    """Fréchet distance between per-volume phantom measurements (`measure_volume` dicts), each
    attribute z-scored by the mean and standard deviation of both sets together (units differ; a
    small reference set may not vary at all). Volumes with an unmeasured attribute are left out
    and counted."""
    g, r = attribute_matrix(generated, keys), attribute_matrix(reference, keys)
    out: dict[str, float | int] = {"attribute_frechet": math.nan, "generated_used": len(g), "reference_used": len(r)}
    if len(g) and len(r):
        both = np.concatenate([g, r])
        mu, sd = both.mean(axis=0), both.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        out["attribute_frechet"] = frechet_between((g - mu) / sd, (r - mu) / sd)
    return out
