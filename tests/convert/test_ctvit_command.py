"""`ctgen import generatect-ctvit` / `ctgen export ctvit` (Python functions and the CLI),
weights directories, and torchvision VGG16 weights for the perceptual loss."""
import numpy as np
import pytest
from flax import nnx

from ctgen.convert import ctvit as cv
from ctgen.cli import main
from ctgen.convert.ctvit_command import export_workdir, import_to_dir
from ctgen.convert.ctvit_store import load_ctvit
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.vgg import VGG16, VGGConfig
from ctgen.train import checkpoint as ckpt_lib

TINY = CTViTConfig.tiny(max_slices=9)


@pytest.fixture(scope="module")
def generatect_file(tmp_path_factory):
    model = CTViT(TINY, rngs=nnx.Rngs(5))
    path = str(tmp_path_factory.mktemp("gct") / "ctvit_pretrained.safetensors")
    cv.export_ctvit(model, path)
    return path, model


def test_import_writes_a_weights_dir_and_export_reproduces_the_file(generatect_file, tmp_path):
    path, model = generatect_file
    summary = import_to_dir(path, str(tmp_path / "imported"), max_slices=9)
    assert "converted 147 tensors" in summary and "vgg/discriminator: yes" in summary
    info = ckpt_lib.weights_info(str(tmp_path / "imported"))
    assert info["stage"] == "ctvit" and CTViTConfig.from_dict(info["ctvit_config"]) == TINY
    loaded = load_ctvit(str(tmp_path / "imported"))
    np.testing.assert_array_equal(np.asarray(loaded.vq.embed[...]), np.asarray(model.vq.embed[...]))
    out = str(tmp_path / "again.safetensors")
    assert export_workdir(str(tmp_path / "imported"), out) == 171
    a, b = cv.load_state_dict(path), cv.load_state_dict(out)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cli_commands(generatect_file, tmp_path, capsys):
    path, _ = generatect_file
    assert main(["import", "generatect-ctvit", path, "--out", str(tmp_path / "d"), "--max-slices", "9"]) == 0
    assert "imported" in capsys.readouterr().out
    out = str(tmp_path / "x.safetensors")
    assert main(["export", "ctvit", "--workdir", str(tmp_path / "d"), "--out", out]) == 0
    assert len(cv.load_state_dict(out)) == 171
    capsys.readouterr()
    assert main(["export", "ctvit", "--workdir", str(tmp_path / "d"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "unknown output format" in capsys.readouterr().err


def test_load_ctvit_explains_bad_locations(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_ctvit(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_ctvit(str(tmp_path / "empty"))


def test_torchvision_vgg16_weights_round_trip(tmp_path):
    cfg = VGGConfig(widths=(2, 4, 4, 8, 8), fc_dim=16)
    vgg = VGG16(cfg, rngs=nnx.Rngs(0))
    sd = cv.vgg_to_torchvision(vgg)
    assert list(sd)[:2] == ["features.0.weight", "features.0.bias"] and "classifier.3.weight" in sd
    sd["classifier.6.weight"] = np.zeros((1000, 16), np.float32)  # the ImageNet head is ignored
    sd["classifier.6.bias"] = np.zeros(1000, np.float32)
    path = str(tmp_path / "vgg16.safetensors")
    cv.save_state_dict(sd, path)
    arrays = cv.load_torchvision_vgg16(path, cfg)
    np.testing.assert_array_equal(arrays["fc6/kernel"], np.asarray(vgg.fc6.kernel[...]))
    np.testing.assert_array_equal(arrays["convs/12/kernel"], np.asarray(vgg.convs[12].kernel[...]))
    with pytest.raises(UserError, match="not a torchvision VGG16"):
        cv.load_torchvision_vgg16(path, VGGConfig(widths=(2, 4, 4, 8, 16), fc_dim=16))
