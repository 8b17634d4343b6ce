"""`ctgen.volume`: value-range conversions and the canonical (D, H, W) orientation."""
import numpy as np
import pytest

from ctgen import volume as cv


def test_value_ranges_round_trip():
    hu = np.array([-1500, -1000, 0, 500, 1000, 3000], np.float32)
    m = cv.hu_to_model(hu)
    np.testing.assert_allclose(m, [-1, -1, 0, 0.5, 1, 1])
    np.testing.assert_allclose(cv.hu_to_sr(hu), [0, 0, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(cv.model_to_hu(m), np.clip(hu, -1000, 1000))
    np.testing.assert_allclose(cv.sr_to_hu(cv.hu_to_sr(hu)), np.clip(hu, -1000, 1000))
    np.testing.assert_allclose(cv.sr_to_model(cv.model_to_sr(m)), m, atol=1e-7)
    assert cv.to_int16_hu(np.array([1e4, -1e4, 12.6])).tolist() == [1000, -1000, 13]


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PIR", "SAL"])
def test_to_canonical_places_marker_by_anatomy(codes):
    """A voxel at the patient's right-anterior-inferior corner must land at D=0 (inferior),
    H=0 (anterior), W=0 (patient right) whatever the file's axis order and directions."""
    from nibabel import orientations as nio

    shape = (6, 7, 8)
    ornt = nio.axcodes2ornt(tuple(codes))
    spacing = np.array([0.5, 2.0, 3.0])
    aff = np.diag([0.0, 0.0, 0.0, 1.0])
    for i, (axis, flip) in enumerate(ornt):
        aff[int(axis), i] = flip * spacing[i]
    vol = np.zeros(shape, np.float32)
    # right end: high index if the axis points R; anterior: high if A; inferior: high if I
    idx = tuple(shape[i] - 1 if c in "RAI" else 0 for i, c in enumerate(codes))
    vol[idx] = 1
    out, sp, orient = cv.to_canonical(vol, aff)
    assert orient == codes
    assert np.unravel_index(np.argmax(out), out.shape) == (0, 0, 0)
    axes = {c: spacing[i] for i, c in enumerate(codes)}
    sz = next(v for c, v in axes.items() if c in "SI")
    sy = next(v for c, v in axes.items() if c in "AP")
    sx = next(v for c, v in axes.items() if c in "LR")
    np.testing.assert_allclose(sp, [sz, sy, sx])


def test_canonical_affine_inverts_to_canonical():
    vol = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    aff = cv.canonical_affine((2.0, 0.7, 0.8))
    back, sp, orient = cv.to_canonical(vol.transpose(2, 1, 0), aff)
    assert orient == "LPS"
    np.testing.assert_array_equal(back, vol)
    np.testing.assert_allclose(sp, [2.0, 0.7, 0.8])
