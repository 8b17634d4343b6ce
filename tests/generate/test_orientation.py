"""GenerateCT's model layout -> canonical, checked on a phantom with known anatomy.

The phantom is written as a NIfTI in a given storage orientation (as CT-RATE's files are), put
into GenerateCT's layout the way its data pipeline does (nibabel array, `array[:, :, k]` slices
as PIL images, resized, stacked in k order), mapped back, and its anatomy must be where the
canonical orientation says: heart on the patient's left and in front of the spine, left lung
at higher columns than the right, trachea above the heart.
"""
import numpy as np
import pytest
from PIL import Image

from ctgen.data.phantom import make_phantom
from ctgen.errors import UserError
from ctgen.generate.orientation import (generatect_file_to_model, generatect_to_canonical, model_to_canonical,
                                        resolve_layout)
from ctgen.volume import extent_spacing

from phantom_layout import anatomy_is_canonical, generatect_pipeline, write_as

SHAPE = (33, 40, 40)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, SHAPE, extent_spacing(SHAPE))


@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "LPI", "PLS"])
def test_generatect_layout_maps_back_to_canonical(tmp_path, phantom, axcodes):
    assert all(anatomy_is_canonical(phantom.labels).values())  # the phantom itself
    write_as(tmp_path / "labels.nii.gz", phantom.labels, axcodes)
    model_labels = generatect_pipeline(tmp_path / "labels.nii.gz", 32, Image.NEAREST)
    back = generatect_to_canonical(model_labels, axcodes)
    assert back.shape == (SHAPE[0], 32, 32)
    assert anatomy_is_canonical(back) == dict.fromkeys(anatomy_is_canonical(back), True)
    # HU values go through unchanged: the map permutes and flips axes only
    write_as(tmp_path / "hu.nii.gz", phantom.hu, axcodes)
    model_hu = generatect_pipeline(tmp_path / "hu.nii.gz", SHAPE[1], Image.BILINEAR)
    np.testing.assert_array_equal(generatect_to_canonical(model_hu, axcodes), phantom.hu)
    assert np.array_equal(model_to_canonical(model_hu, "generatect", axcodes), phantom.hu)


def test_wrong_axcodes_misplace_the_anatomy(tmp_path, phantom):
    write_as(tmp_path / "labels.nii.gz", phantom.labels, "LPS")
    model_labels = generatect_pipeline(tmp_path / "labels.nii.gz", SHAPE[1], Image.NEAREST)
    assert not all(anatomy_is_canonical(generatect_to_canonical(model_labels, "RAS")).values())
    assert not all(anatomy_is_canonical(model_to_canonical(model_labels, "canonical")).values())


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
    # a recorded layout wins over the guess from `source` (a packed or re-exported ctgen model)
    assert resolve_layout("auto", {"source": "/w/run", "layout": "canonical"}) == "canonical"
    assert resolve_layout("auto", {"layout": "generatect"}) == "generatect"
    with pytest.raises(UserError, match="records layout 'sideways'"):
        resolve_layout("auto", {"layout": "sideways"})
    with pytest.raises(UserError, match="layout"):
        resolve_layout("ras", {})
    with pytest.raises(UserError, match="axis codes 'LPX'"):
        generatect_to_canonical(np.zeros((2, 2, 2)), "LPX")
