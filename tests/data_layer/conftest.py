"""Fixtures of the data-layer tests: a small prepared phantom dataset and NIfTI writing helpers."""
import os

import nibabel as nib
import numpy as np
import pytest

from ctgen.data.features import DatasetConfig
from ctgen.data.preprocess import GridConfig
from ctgen.data.sources import PhantomSource
from ctgen.data.writer import build

SMALL_GRID = GridConfig(shape=(17, 24, 24))


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> str:
    """10 tiny phantoms (8 train / 2 validation); returns the version directory."""
    out = str(tmp_path_factory.mktemp("phantoms"))
    cfg = DatasetConfig(name="tiny", grid=SMALL_GRID, phantom=True)
    summary = build(PhantomSource(10, 0, SMALL_GRID), cfg, out, validation_fraction=0.2, examples_per_shard=3,
                    progress=False, log=lambda s: None)
    assert summary["counts"]["train"] == 8 and summary["counts"]["validation"] == 2
    return summary["path"]


def write_nifti_raw(path, data_ijk, affine=None, zooms=None, slope=None, inter=None, geometry=True):
    """Write a NIfTI with explicit control over header scaling and geometry."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    # Without an affine nibabel leaves qform_code = sform_code = 0: a header with no orientation.
    img = nib.Nifti1Image(np.asarray(data_ijk), affine if geometry else None)
    if zooms is not None:
        img.header.set_zooms(zooms)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(img, path)
    return path


@pytest.fixture
def body_hu():
    """A small HU volume (i, j, k) = (20, 18, 16): air around a water cylinder with a bone rod."""
    x = np.arange(20)[:, None, None] - 9.5
    y = np.arange(18)[None, :, None] - 8.5
    vol = np.full((20, 18, 16), -1000.0, np.float32)
    inside = np.broadcast_to((x ** 2 + y ** 2) < 49, vol.shape)
    vol[inside] = 20.0
    vol[8:10, 8:10, :] = 700.0
    return vol
