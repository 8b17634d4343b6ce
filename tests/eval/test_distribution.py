"""Fréchet distances, 2.5D feature pipeline and HU histogram distances on cases with known answers."""
import numpy as np
import pytest
from scipy import linalg

from ctgen.eval import distribution as dist
from ctgen.eval import features


def _features(n=400, d=6, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    return rng.standard_normal((n, d)) @ a + rng.standard_normal(d)


def test_frechet_known_cases():
    x = _features()
    assert dist.frechet_between(x, x) == pytest.approx(0.0, abs=1e-8)
    # a mean shift by delta adds exactly |delta|^2
    gaps = [dist.frechet_between(x, x + s) for s in (0.5, 1.0, 2.0)]
    np.testing.assert_allclose(gaps, [6 * 0.25, 6 * 1.0, 6 * 4.0], rtol=1e-8)
    # the closed form with scipy's sqrtm
    y = _features(seed=1)
    (m1, s1), (m2, s2) = dist.gaussian_stats(x), dist.gaussian_stats(y)
    want = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert dist.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-6)


def test_frechet_few_samples_matches_covariance_form():
    """Fewer samples than features (rank-deficient covariances): the sample-space formula used then
    agrees with the covariance formula."""
    x, y = _features(n=5, d=50), _features(n=4, d=50, seed=3)
    assert dist.frechet_between(x, x) == pytest.approx(0.0, abs=1e-9)
    want = dist.frechet_distance(*dist.gaussian_stats(x), *dist.gaussian_stats(y))
    assert dist.frechet_between(x, y) == pytest.approx(want, rel=1e-6)
    assert dist.frechet_between(x, y[:1]) == pytest.approx(
        dist.frechet_distance(*dist.gaussian_stats(x), *dist.gaussian_stats(y[:1])), rel=1e-6)


def test_protocol_steps():
    proto = features.SliceProtocol(grid=(5, 8, 8), center_ratio=0.4)
    vol = np.arange(3 * 10 * 6, dtype=np.float32).reshape(3, 10, 6) * 10 - 1500
    prep = features.prepare_volume(vol, proto)
    assert prep.shape == (5, 8, 8) and prep.min() >= -1 and prep.max() <= 1
    # D padded at the end with air, H centre-cropped 10 -> 8 (rows 1..8), W padded 6 -> 8 at the end
    np.testing.assert_allclose(prep[3:], -1.0)
    np.testing.assert_allclose(prep[:3, :, 6:], -1.0)
    np.testing.assert_allclose(prep[:3, :, :6], np.clip(vol[:, 1:9], -1000, 1000) / 1000)
    assert features.plane_slices(prep, "axial", 0.4).shape == (2, 8, 8)        # slices [1, 3) of 5
    assert features.plane_slices(prep, "sagittal", 0.4).shape == (3, 5, 8)     # [2, 5) of 8
    x = features.network_input(features.plane_slices(prep, "coronal", 1.0), slice_size=16)
    assert x.shape == (8, 16, 16, 3)
    np.testing.assert_allclose(x[..., 0].max(axis=(1, 2)), 1 - 0.485, atol=1e-6)
    np.testing.assert_allclose(x[..., 2].min(axis=(1, 2)), -0.406, atol=1e-6)


def test_2p5d_pipeline_grows_with_blur():
    """Self-distance ~0; blurring the volumes moves the features monotonically away. The network is
    a fixed random projection of pooled patches, a stand-in for the ResNet (never reported as FID)."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    proj = rng.standard_normal((3 * 16, 8))

    def fn(x_NxHxWx3):
        n, h, w, _ = x_NxHxWx3.shape
        patches = x_NxHxWx3[:, : h // 4 * 4, : w // 4 * 4].reshape(n, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4))
        return np.tanh(patches.reshape(n, -1) @ proj)

    proto = features.SliceProtocol(grid=(12, 24, 24), center_ratio=0.5)
    vols = [rng.normal(-300, 400, (12, 24, 24)).astype(np.float32) for _ in range(6)]
    ref = features.extract(vols, fn, proto)
    assert ref["axial"].shape == (36, 8) and ref["volume"].shape == (6, 24)
    assert dist.fid_2p5d(ref, ref)["fid_2p5d"] == pytest.approx(0.0, abs=1e-8)
    fids = []
    for sigma in (0.5, 1.0, 2.0):
        gen = features.extract([ndimage.gaussian_filter(v, sigma) for v in vols], fn, proto)
        fids.append(dist.fid_2p5d(gen, ref)["fid_2p5d"])
    assert 0 < fids[0] < fids[1] < fids[2]


def test_hu_histogram_distances_grow_with_shift():
    rng = np.random.default_rng(0)
    ref = [rng.normal(-400, 200, (4, 16, 16)) for _ in range(5)]
    same = dist.hu_histogram_distances(ref, ref)
    assert same["hu_wasserstein"] == pytest.approx(0.0, abs=1e-9)
    assert same["hu_histogram_frechet"] == pytest.approx(0.0, abs=1e-9)
    shifted = [dist.hu_histogram_distances([v + s for v in ref], ref) for s in (50, 100, 200)]
    w = [d["hu_wasserstein"] for d in shifted]
    np.testing.assert_allclose(w, [50, 100, 200], rtol=0.05)  # W1 of a shift is the shift
    f = [d["hu_histogram_frechet"] for d in shifted]
    assert 0 < f[0] < f[1] < f[2]


def test_attribute_frechet_skips_unmeasured():
    ref = [{k: float(i + j) for j, k in enumerate(dist.ATTRIBUTES)} for i in range(6)]
    gen = [dict(m) for m in ref] + [dict(ref[0], cardiothoracic_ratio=float("nan"))]
    out = dist.attribute_frechet(gen, ref)
    assert out["generated_used"] == 6 and out["reference_used"] == 6
    assert out["attribute_frechet"] == pytest.approx(0.0, abs=1e-9)
    moved = dist.attribute_frechet([dict(m, laa950_percent=m["laa950_percent"] + 5) for m in ref], ref)
    assert moved["attribute_frechet"] > 1.0


def _volume_setup(n=8, seed=0):
    """A fixed random projection of pooled patches (a stand-in network, never reported as FID), the
    protocol and `n` noise volumes around soft-tissue HU."""
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((3 * 16, 8))

    def fn(x_NxHxWx3):
        n, h, w, _ = x_NxHxWx3.shape
        patches = x_NxHxWx3[:, : h // 4 * 4, : w // 4 * 4].reshape(n, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4))
        return np.tanh(patches.reshape(n, -1) @ proj)

    proto = features.SliceProtocol(grid=(12, 24, 24), center_ratio=0.5)
    vols = [rng.normal(-300, 400, (12, 24, 24)).astype(np.float32) for _ in range(n)]
    return fn, proto, vols


def test_volume_frechet_zero_on_itself_and_monotone_in_shift_and_blur():
    from scipy import ndimage

    fn, proto, vols = _volume_setup()
    ref = features.extract(vols, fn, proto)
    assert dist.volume_frechet(ref, ref) == pytest.approx(0.0, abs=1e-8)
    shifted = [dist.volume_frechet(features.extract([v + s for v in vols], fn, proto), ref) for s in (25, 50, 100, 200)]
    assert 0 < shifted[0] < shifted[1] < shifted[2] < shifted[3], shifted
    blurred = [dist.volume_frechet(features.extract([ndimage.gaussian_filter(v, sigma) for v in vols], fn, proto), ref)
               for sigma in (0.5, 1.0, 2.0)]
    assert 0 < blurred[0] < blurred[1] < blurred[2], blurred


def test_attribute_frechet_monotone_in_shift():
    """Shifting one attribute by s in every generated volume: z-scored over both sets, the distance is
    exactly the squared shift over the pooled variance, s^2 / (var + s^2 / 4), which grows with s."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((20, len(dist.ATTRIBUTES))) @ rng.standard_normal((len(dist.ATTRIBUTES),) * 2)
    ref = [dict(zip(dist.ATTRIBUTES, row)) for row in values]
    assert dist.attribute_frechet(ref, ref)["attribute_frechet"] == pytest.approx(0.0, abs=1e-9)
    key, var = "lung_volume_ml", float(np.var(values[:, dist.ATTRIBUTES.index("lung_volume_ml")]))
    out = []
    for s in (0.5, 1.0, 2.0, 4.0):
        gen = [dict(m, **{key: m[key] + s}) for m in ref]
        d = dist.attribute_frechet(gen, ref)["attribute_frechet"]
        assert d == pytest.approx(s**2 / (var + s**2 / 4), rel=1e-6)
        out.append(d)
    assert 0 < out[0] < out[1] < out[2] < out[3]
    # a shift of every attribute by the same number of standard deviations moves it further
    sd = values.std(axis=0)
    moved = [dist.attribute_frechet([{k: m[k] + f * sd[i] for i, k in enumerate(dist.ATTRIBUTES)} for m in ref],
                                    ref)["attribute_frechet"] for f in (0.25, 0.5, 1.0)]
    assert 0 < moved[0] < moved[1] < moved[2]
