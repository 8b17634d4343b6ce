"""Fixtures of the data-layer tests: a small prepared phantom dataset and a small HU volume."""
import numpy as np
import pytest
from dl_helpers import SMALL_GRID

from ctgen.data.features import DatasetConfig
from ctgen.data.sources import PhantomSource
from ctgen.data.writer import build


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> str:
    """10 tiny phantoms (8 train / 2 validation); returns the version directory."""
    out = str(tmp_path_factory.mktemp("phantoms"))
    cfg = DatasetConfig(name="tiny", grid=SMALL_GRID, phantom=True)
    summary = build(PhantomSource(10, 0, SMALL_GRID), cfg, out, validation_fraction=0.2, examples_per_shard=3,
                    progress=False, log=lambda s: None)
    assert summary["counts"]["train"] == 8 and summary["counts"]["validation"] == 2
    return summary["path"]


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
