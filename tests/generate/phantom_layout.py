"""A phantom in GenerateCT's model layout, and where its anatomy must lie in the canonical
orientation (shared by the orientation tests and the `ctgen generate` test of written files)."""
import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from PIL import Image

from ctgen.data.anatomy import LABELS
from ctgen.generate.orientation import axcodes_affine
from ctgen.volume import CANONICAL_AXCODES_IJK


def write_as(path, vol_DxHxW, axcodes):
    """A canonical volume stored in a NIfTI whose voxel axes are `axcodes` (same anatomy)."""
    stored = vol_DxHxW.transpose(2, 1, 0)  # canonical storage (i, j, k) = LPS
    xform = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES_IJK), nio.axcodes2ornt(tuple(axcodes)))
    data = nio.apply_orientation(stored, xform)
    affine = axcodes_affine(axcodes)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    assert "".join(nib.aff2axcodes(affine)) == axcodes


def generatect_pipeline(path, size, resample):
    """GenerateCT's reading of a training file: header ignored, axial slices array[:, :, k]."""
    data = nib.load(str(path)).get_fdata()
    slices = [np.asarray(Image.fromarray(data[:, :, k].astype(np.float32), mode="F").resize((size, size), resample))
              for k in range(data.shape[2])]
    return np.stack(slices)  # (D = k, H = i, W = j)


def _centroid(mask):
    return np.argwhere(mask).mean(axis=0)


def anatomy_is_canonical(labels):
    heart, left, right = (_centroid(labels == LABELS[n]) for n in ("heart", "lung_left", "lung_right"))
    airway = _centroid(labels == LABELS["airway"])
    bone = labels == LABELS["bone"]
    w = labels.shape[2]
    spine = _centroid(bone[:, :, w // 2 - 2:w // 2 + 2])  # the midline bone: vertebrae and sternum
    return {"heart on the patient's left": heart[2] > w / 2,
            "left lung at higher columns": left[2] > right[2],
            "heart in front of the midline bone (spine)": heart[1] < spine[1],
            "trachea above the heart": airway[0] > heart[0]}
