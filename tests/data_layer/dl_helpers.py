"""Helpers shared by the data-layer tests (a uniquely named module: `conftest` is ambiguous)."""
import os

import nibabel as nib
import numpy as np

from ctgen.data.preprocess import GridConfig

SMALL_GRID = GridConfig(shape=(17, 24, 24))


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
