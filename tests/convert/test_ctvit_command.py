"""`ctgen import generatect-ctvit` / `ctgen export ctvit` (Python functions and the CLI),
weights directories (today's and the layout before the loss networks left the CT-ViT), loading
the tokenizer alone, and torchvision VGG16 weights for the perceptual loss."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from ctgen import weights as weights_lib
from ctgen.cli import main
from ctgen.convert import ctvit as cv
from ctgen.convert.ctvit_command import export_workdir, import_to_dir
from ctgen.convert.ctvit_store import load_ctvit, load_ctvit_state
from ctgen.convert.torch_files import read_state_dict, write_state_dict
from ctgen.errors import UserError
from ctgen.models import discriminator as discriminator_lib
from ctgen.models import vgg as vgg_lib
from ctgen.models.ctvit import CTViTConfig
from ctgen.models.ctvit_losses import LossNetworksConfig, model_config_dict, split_model_config
from ctgen.models.vgg import VGG16, VGGConfig
from ctgen.parallel.mesh import make_mesh
from ctgen.stages.ctvit import CTViTTrainer
from ctgen.train.checkpoint import Checkpointer

TINY = CTViTConfig.tiny(max_slices=9)
NETS = LossNetworksConfig.tiny()


def _arrays(path):
    return {k: np.asarray(v) for k, v in read_state_dict(path).items()}


@pytest.fixture(scope="module")
def generatect_file(tmp_path_factory):
    """A GenerateCT-layout file with every key (the tiny counterpart of the 379-key checkpoint)."""
    model = CTViTTrainer(TINY, NETS, rngs=nnx.Rngs(5))
    path = str(tmp_path_factory.mktemp("gct") / "ctvit_pretrained.safetensors")
    cv.export_ctvit(model, path)
    return path, model


def test_import_writes_a_weights_dir_and_export_reproduces_the_file(generatect_file, tmp_path):
    path, model = generatect_file
    summary = import_to_dir(path, str(tmp_path / "imported"), max_slices=9)
    assert "converted 147 tensors" in summary and "vgg/discriminator: yes" in summary
    info = weights_lib.weights_info(str(tmp_path / "imported"))
    assert info["model"] == "ctvit" and split_model_config(info["model_config"]) == (TINY, NETS)
    loaded = load_ctvit(str(tmp_path / "imported"))
    np.testing.assert_array_equal(np.asarray(loaded.vq.embed[...]), np.asarray(model.ctvit.vq.embed[...]))
    out = str(tmp_path / "again.safetensors")
    assert export_workdir(str(tmp_path / "imported"), out) == 171
    a, b = _arrays(path), _arrays(out)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cli_commands(generatect_file, tmp_path, capsys):
    path, _ = generatect_file
    assert main(["import", "generatect-ctvit", path, "--out", str(tmp_path / "d"), "--max-slices", "9"]) == 0
    assert "imported" in capsys.readouterr().out
    out = str(tmp_path / "x.safetensors")
    assert main(["export", "ctvit", "--workdir", str(tmp_path / "d"), "--out", out]) == 0
    assert len(read_state_dict(out)) == 171
    capsys.readouterr()
    assert main(["export", "ctvit", "--workdir", str(tmp_path / "d"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "unknown output format" in capsys.readouterr().err


def test_tokenizer_load_allocates_no_loss_networks(generatect_file, tmp_path, monkeypatch):
    """Loading the CT-ViT for later stages from a full (379-key style) import reads only the
    autoencoder: the restore's abstract target holds nothing of the VGG16 or the discriminator,
    neither is ever built (not even abstractly), and the weights land sharded on the mesh."""
    path, model = generatect_file
    imported = str(tmp_path / "imported")
    import_to_dir(path, imported, max_slices=9)
    targets = []
    restore = weights_lib._restore
    monkeypatch.setattr(weights_lib, "_restore", lambda p, target: targets.append(target) or restore(p, target))

    def refuse(*args, **kwargs):
        raise AssertionError("a loss network was built")

    monkeypatch.setattr(vgg_lib.VGG16, "__init__", refuse)
    monkeypatch.setattr(discriminator_lib.Discriminator, "__init__", refuse)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for source in (imported, path):
        loaded = load_ctvit(source, mesh=mesh)
        kernel = loaded.enc_spatial.layers[0].attn.to_q.kernel[...]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        expected = model.ctvit.enc_spatial.layers[0].attn.to_q.kernel[...]
        np.testing.assert_array_equal(np.asarray(kernel), np.asarray(expected))
    (target,) = targets  # the directory load; the file load skips the loss networks' keys
    paths = weights_lib.flatten_state(weights_lib.to_pure(target))
    assert paths and all(p.startswith(("params/ctvit/", "model_state/ctvit/")) for p in paths)
    autoencoder = weights_lib.flatten_state(weights_lib.to_pure(nnx.state(model.ctvit)))

    def size(flat):
        return sum(int(np.prod(v.shape)) for v in flat.values())

    assert size(paths) == size(autoencoder)


def _old_layout(model: CTViTTrainer) -> tuple[dict, dict]:
    """The (params, model_state) tree the CT-ViT stage wrote before the split: the autoencoder at
    the root, its loss networks as attributes."""
    params, rest = nnx.split_state(nnx.state(model), nnx.Param, ...)
    params, rest = weights_lib.to_pure(params), weights_lib.to_pure(rest)
    return {**params["ctvit"], "vgg": params["vgg"], "discr": params["discr"]}, rest["ctvit"]


def test_old_layout_weights_dir_and_workdir_still_load_and_export(generatect_file, tmp_path):
    path, model = generatect_file
    params, model_state = _old_layout(model)
    old_dir = str(tmp_path / "old_dir")
    weights_lib.save_weights(old_dir, params, model_state, model="ignored", model_config={})
    with open(os.path.join(old_dir, weights_lib.WEIGHTS_MARKER), "w", encoding="utf-8") as f:  # today's marker
        json.dump({"format": "ctgen-weights-v1", "written": "2025-01-01T00:00:00", "stage": "ctvit",
                   "ctvit_config": model_config_dict(TINY, NETS)}, f)
    workdir = str(tmp_path / "old_run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"stage": "ctvit", "model": model_config_dict(TINY, NETS)}, f)
    ckpt = Checkpointer(workdir)
    ckpt.save(3, {"step": np.int32(3), "params": params, "model_state": model_state, "opt": {}}, {"pos": 0})
    ckpt.close()
    expected = _arrays(path)
    for source in (old_dir, workdir):
        cfg, nets, states = load_ctvit_state(source)
        assert (cfg, nets, sorted(states)) == (TINY, NETS, ["ctvit", "discr", "vgg"])
        loaded = load_ctvit(source)
        np.testing.assert_array_equal(np.asarray(loaded.vq.embed[...]), np.asarray(model.ctvit.vq.embed[...]))
        out = str(tmp_path / f"{os.path.basename(source)}.safetensors")
        assert export_workdir(source, out) == 171
        got = _arrays(out)
        assert list(got) == list(expected)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


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
    write_state_dict(sd, path)
    arrays = cv.load_torchvision_vgg16(path, cfg)
    np.testing.assert_array_equal(arrays["fc6/kernel"], np.asarray(vgg.fc6.kernel[...]))
    np.testing.assert_array_equal(arrays["convs/12/kernel"], np.asarray(vgg.convs[12].kernel[...]))
    with pytest.raises(UserError, match="not a torchvision VGG16"):
        cv.load_torchvision_vgg16(path, VGGConfig(widths=(2, 4, 4, 8, 16), fc_dim=16))
