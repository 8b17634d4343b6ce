"""GenerateCT's model layout -> canonical, checked on a phantom with known anatomy.

The phantom is written as a NIfTI in a given storage orientation (as CT-RATE's files are), put
into GenerateCT's layout the way its data pipeline does (nibabel array, `array[:, :, k]` slices
as PIL images, resized, stacked in k order), mapped back, and its anatomy must be where the
canonical orientation says: heart on the patient's left and in front of the spine, left lung
at higher columns than the right, trachea above the heart.
"""
import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from PIL import Image

from ctgen.data.anatomy import LABELS
from ctgen.data.phantom import make_phantom
from ctgen.errors import UserError
from ctgen.generate.orientation import (axcodes_affine, generatect_file_to_model, generatect_to_canonical, model_to_canonical,
                                        resolve_layout)
from ctgen.volume import CANONICAL_AXCODES_IJK, extent_spacing

SHAPE = (33, 40, 40)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, SHAPE, extent_spacing(SHAPE))


def _write_as(path, vol_DxHxW, axcodes):
    """A canonical volume stored in a NIfTI whose voxel axes are `axcodes` (same anatomy)."""
    stored = vol_DxHxW.transpose(2, 1, 0)  # canonical storage (i, j, k) = LPS
    xform = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES_IJK), nio.axcodes2ornt(tuple(axcodes)))
    data = nio.apply_orientation(stored, xform)
    affine = axcodes_affine(axcodes)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    assert "".join(nib.aff2axcodes(affine)) == axcodes


def _generatect_pipeline(path, size, resample):
    """GenerateCT's reading of a training file: header ignored, axial slices array[:, :, k]."""
    data = nib.load(str(path)).get_fdata()
    slices = [np.asarray(Image.fromarray(data[:, :, k].astype(np.float32), mode="F").resize((size, size), resample))
              for k in range(data.shape[2])]
    return np.stack(slices)  # (D = k, H = i, W = j)


def _centroid(mask):
    return np.argwhere(mask).mean(axis=0)


def _anatomy_is_canonical(labels):
    heart, left, right = (_centroid(labels == LABELS[n]) for n in ("heart", "lung_left", "lung_right"))
    airway = _centroid(labels == LABELS["airway"])
    bone = labels == LABELS["bone"]
    w = labels.shape[2]
    spine = _centroid(bone[:, :, w // 2 - 2:w // 2 + 2])  # the midline bone: vertebrae and sternum
    return {"heart on the patient's left": heart[2] > w / 2,
            "left lung at higher columns": left[2] > right[2],
            "heart in front of the midline bone (spine)": heart[1] < spine[1],
            "trachea above the heart": airway[0] > heart[0]}


@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "LPI", "PLS"])
def test_generatect_layout_maps_back_to_canonical(tmp_path, phantom, axcodes):
    assert all(_anatomy_is_canonical(phantom.labels).values())  # the phantom itself
    _write_as(tmp_path / "labels.nii.gz", phantom.labels, axcodes)
    model_labels = _generatect_pipeline(tmp_path / "labels.nii.gz", 32, Image.NEAREST)
    back = generatect_to_canonical(model_labels, axcodes)
    assert back.shape == (SHAPE[0], 32, 32)
    assert _anatomy_is_canonical(back) == dict.fromkeys(_anatomy_is_canonical(back), True)
    # HU values go through unchanged: the map permutes and flips axes only
    _write_as(tmp_path / "hu.nii.gz", phantom.hu, axcodes)
    model_hu = _generatect_pipeline(tmp_path / "hu.nii.gz", SHAPE[1], Image.BILINEAR)
    np.testing.assert_array_equal(generatect_to_canonical(model_hu, axcodes), phantom.hu)
    assert np.array_equal(model_to_canonical(model_hu, "generatect", axcodes), phantom.hu)


def test_wrong_axcodes_misplace_the_anatomy(tmp_path, phantom):
    _write_as(tmp_path / "labels.nii.gz", phantom.labels, "LPS")
    model_labels = _generatect_pipeline(tmp_path / "labels.nii.gz", SHAPE[1], Image.NEAREST)
    assert not all(_anatomy_is_canonical(generatect_to_canonical(model_labels, "RAS")).values())
    assert not all(_anatomy_is_canonical(model_to_canonical(model_labels, "canonical")).values())


def test_generatect_saved_files():
    vol = np.arange(3 * 4 * 5).reshape(3, 4, 5)  # model layout (D, H, W)
    assert np.array_equal(generatect_file_to_model(vol.swapaxes(0, 2), "transformer"), vol)  # tensor_to_nifti
    assert np.array_equal(generatect_file_to_model(vol.transpose(1, 2, 0)[..., None], "superres"), vol)
    with pytest.raises(ValueError):
        generatect_file_to_model(vol, "ctvit")


def test_layout_setting():
    assert resolve_layout("auto", {"model": "maskgit", "source": "/w/transformer_pretrained.pt"}) == "generatect"
    assert resolve_layout("auto", {"model": "maskgit"}) == "canonical"
    assert resolve_layout("canonical", {"source": "x.pt"}) == "canonical"
    with pytest.raises(UserError, match="layout"):
        resolve_layout("ras", {})
    with pytest.raises(UserError, match="axis codes 'LPX'"):
        generatect_to_canonical(np.zeros((2, 2, 2)), "LPX")
