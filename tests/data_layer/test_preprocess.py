import numpy as np
import pytest

from ctgen.data import preprocess as pp
from ctgen.errors import UserError


def test_resize_preserves_constants_and_means():
    x = np.full((9, 16, 16), 42.0, np.float32)
    np.testing.assert_allclose(pp.resize_volume(x, (5, 4, 4)), 42.0, rtol=1e-6)
    ramp = np.broadcast_to(np.arange(64, dtype=np.float32), (3, 4, 64))
    small = pp.resize_volume(ramp, (3, 4, 16))
    np.testing.assert_allclose(small[0, 0, 1:-1], ramp[0, 0].reshape(16, 4).mean(1)[1:-1], atol=1e-4)
    up = pp.resize_volume(np.arange(4, dtype=np.float32).reshape(4, 1, 1), (8, 1, 1))
    assert np.all(np.diff(up[:, 0, 0]) >= 0) and up[0, 0, 0] == 0 and up[-1, 0, 0] == 3


def test_grid_modes():
    vol = np.zeros((40, 30, 20), np.float32)
    out, sp = pp.to_grid(vol, (1.0, 2.0, 3.0), pp.GridConfig(shape=(21, 16, 16)))
    assert out.shape == (21, 16, 16)
    np.testing.assert_allclose(sp, [40 / 21, 2 * 30 / 16, 3 * 20 / 16], rtol=1e-6)
    out, sp = pp.to_grid(vol, (1.0, 2.0, 3.0), pp.GridConfig(shape=(None, 64, 64), spacing=(2.0, 2.0, 2.0)))
    assert out.shape == (19, 64, 64)  # 20 slices at 2 mm, even -> 19 (1 + 2k)
    assert out[0, 0, 0] == -1000  # padded with air
    out, _ = pp.to_grid(vol, (1.0, 2.0, 3.0), pp.GridConfig(shape=(None, 64, 64), spacing=(2.0, 2.0, 2.0),
                                                              odd_slices=False))
    assert out.shape == (20, 64, 64)
    with pytest.raises(ValueError):
        pp.GridConfig(shape=(None, 64, 64))


def test_grid_rejects_an_even_fixed_slice_count_unless_even_slices():
    # to_grid used to drop a slice (16 -> 15) while the dataset declared D = 16, so every resampled
    # volume failed the feature shape check; phantoms (not resampled) came out with 16 slices.
    with pytest.raises(UserError, match=r"--slices 16 is even.*--even-slices"):
        pp.GridConfig(shape=(16, 32, 32))
    grid = pp.GridConfig(shape=(16, 32, 32), odd_slices=False)
    out, _ = pp.to_grid(np.zeros((40, 30, 20), np.float32), (1.0, 2.0, 3.0), grid)
    assert out.shape == (16, 32, 32)
    with pytest.raises(ValueError, match="--spacing needs 3 values"):  # checked for Python callers too
        pp.GridConfig(shape=(17, 32, 32), spacing=(2.0, 2.0))


def test_check_hu_volume_rejects_bad_input(body_hu):
    pp.check_hu_volume(body_hu.transpose(2, 1, 0), "ok")
    bad = body_hu.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(pp.VolumeError, match="NaN"):
        pp.check_hu_volume(bad, "nan.nii.gz")
    with pytest.raises(pp.VolumeError, match="not a 3-D"):
        pp.check_hu_volume(body_hu[:, :, 0], "flat.nii.gz")
    with pytest.raises(pp.VolumeError, match="do not look like CT"):
        pp.check_hu_volume(np.abs(body_hu) + 100, "mr.nii.gz")
