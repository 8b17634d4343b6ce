"""SR U-Net <-> GenerateCT layouts: the paper manifest, the trainer checkpoint's EMA block, round
trips through `Unet` state_dicts, which weights an import takes, and safe loading."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctgen.convert import superres as sv
from ctgen.errors import UserError
from ctgen.models.unet import UNet, UNetConfig, param_count
from ctgen.weights import flatten_state

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference", "generatect_superres.txt")
TINY = UNetConfig.tiny()


def _manifest_rows():
    """(key, shape) of `Superres.state_dict()` and the non-weight keys of its EMA block."""
    model, ema = [], []
    with open(REF, encoding="utf-8") as f:
        lines = f.read().splitlines()
    target = model
    for line in lines:
        if line.startswith("# checkpoint['ema']"):
            target = ema
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")[:3]
        target.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()),
                       dtype.removeprefix("torch.")))
    return model, ema


def test_paper_manifest_is_generatects():
    model_rows, _ = _manifest_rows()
    assert len(model_rows) == 448
    assert [(e.key, e.shape) for e in sv.superres_manifest(UNetConfig.paper())] == [r[:2] for r in model_rows]


def test_paper_model_exports_every_key_and_has_22190440_parameters():
    cfg = UNetConfig.paper()
    abstract = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
    assert param_count(abstract) == 22_190_440
    zero = np.zeros((), np.float32)
    flat = {k: np.broadcast_to(zero, v.shape) for k, v in flatten_state(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))).items()}
    sd = sv.superres_state_dict(sv.to_generatect(flat, cfg))
    model_rows, _ = _manifest_rows()
    assert [(k, tuple(v.shape), str(v.dtype)) for k, v in sd.items()] == model_rows


def test_trainer_checkpoint_ema_block_layout():
    model_sd = sv.to_generatect(UNet(TINY, rngs=nnx.Rngs(0)), TINY)
    ema_sd = {k: v + 1 for k, v in model_sd.items()}
    ckpt = sv.trainer_checkpoint(model_sd, ema_sd, steps=7)
    _, ema_rows = _manifest_rows()
    for key, shape, dtype in ema_rows:
        assert ckpt["ema"][key].shape == shape and str(ckpt["ema"][key].dtype) == dtype, key
    n = len(ckpt["model"])
    assert len(ckpt["ema"]) == 4 + 2 * n
    assert list(ckpt["steps"]) == [0, 7] and ckpt["ema"]["1.step"] == 7
    for k in model_sd:
        np.testing.assert_array_equal(ckpt["ema"]["1.online_model." + k], model_sd[k])
        np.testing.assert_array_equal(ckpt["ema"]["1.ema_model." + k], ema_sd[k])
        np.testing.assert_array_equal(ckpt["model"]["unets.1." + k], model_sd[k])
    assert sv.select_unet_weights(ckpt).which == "ema"
    np.testing.assert_array_equal(sv.select_unet_weights(ckpt).state_dict["final_conv.bias"], ema_sd["final_conv.bias"])
    assert sv.select_unet_weights(ckpt, prefer_ema=False).which == "model"
    assert sv.select_unet_weights(ckpt["model"]).which == "superres"
    assert sv.select_unet_weights(model_sd).which == "unet"
    with pytest.raises(UserError, match="no GenerateCT SR U-Net weights"):
        sv.select_unet_weights({"foo": np.zeros(1)})


def _perturbed_tiny(seed: int) -> UNet:
    model = UNet(TINY, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):  # zero-initialised and unit tensors get distinct values too
            var[...] = var[...] + jnp.asarray(0.05 * rng.standard_normal(var.shape), jnp.float32)
    return model


def test_round_trip_and_inferred_config():
    model = _perturbed_tiny(1)
    sd = sv.to_generatect(model, TINY)
    assert [(k, v.shape) for k, v in sd.items()] == [(e.key, e.shape) for e in sv.unet_manifest(TINY)]
    assert sv.infer_config(sd, resnet_groups=TINY.resnet_groups) == TINY
    back = sv.from_generatect(sd, TINY).model()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 1)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    mask = jnp.asarray([[True] * 5, [True, True, False, False, False]])
    t = jnp.asarray([0.5, -3.0])
    a = model(x, t, x * 0.5, t + 1, text, mask)
    b = back(x, t, x * 0.5, t + 1, text, mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a).max()) > 0  # the perturbed final convolution is not zero


def test_wrong_shapes_name_the_file():
    sd = sv.to_generatect(UNet(TINY, rngs=nnx.Rngs(0)), TINY)
    sd["final_conv.weight"] = np.zeros((1, 17, 5, 5), np.float32)
    with pytest.raises(UserError, match="bad.pt"):
        sv.from_generatect(sd, TINY, source="bad.pt")


def test_import_reads_pt_without_unpickling_objects(tmp_path):
    torch = pytest.importorskip("torch")
    from ctgen.convert.superres_store import import_to_dir, load_superres

    sd = sv.to_generatect(_perturbed_tiny(2), TINY)
    ckpt = sv.trainer_checkpoint(sd, {k: v * 2 for k, v in sd.items()}, steps=3)
    from ctgen.convert.torch_files import write_torch_object

    good = str(tmp_path / "sr.pt")
    write_torch_object(ckpt, good)
    report = import_to_dir(good, str(tmp_path / "ema"), resnet_groups=TINY.resnet_groups)
    assert "weights used: its EMA weights" in report and "trained 3 steps" in report
    model, which = load_superres(str(tmp_path / "ema"))
    np.testing.assert_allclose(np.asarray(model.final_conv.bias[...]), sd["final_conv.bias"] * 2)
    report = import_to_dir(good, str(tmp_path / "live"), prefer_ema=False, resnet_groups=TINY.resnet_groups)
    assert "its live weights" in report
    model, _ = load_superres(good, use_ema=False)  # straight from the file
    np.testing.assert_allclose(np.asarray(model.final_conv.bias[...]), sd["final_conv.bias"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = str(tmp_path / "evil.pt")
    torch.save({"model": {"x": torch.zeros(1)}, "hook": Evil()}, bad)
    with pytest.raises(UserError, match="weights_only=True"):
        import_to_dir(bad, str(tmp_path / "never"))


def test_safetensors_export_is_the_sampling_unet(tmp_path):
    pytest.importorskip("safetensors")
    from ctgen.convert.superres_store import export_superres, save_superres_dir
    from ctgen.convert.torch_files import read_state_dict

    model = _perturbed_tiny(3)
    wdir = str(tmp_path / "w")
    save_superres_dir(wdir, TINY, nnx.state(model, nnx.Param))
    out = str(tmp_path / "unet.safetensors")
    export_superres(wdir, out)
    sd = read_state_dict(out)
    want = sv.to_generatect(model, TINY)
    assert sorted(sd) == sorted(want)  # safetensors stores keys sorted
    np.testing.assert_array_equal(sd["init_conv.convs.1.weight"], want["init_conv.convs.1.weight"])
    with pytest.raises(UserError, match="out.bin"):
        export_superres(wdir, str(tmp_path / "out.bin"))


def test_a_residual_unet_is_not_exported_for_generatects_sampler(tmp_path):
    import dataclasses

    from ctgen.convert.superres_store import export_superres, save_superres_dir

    model = _perturbed_tiny(3)
    wdir = str(tmp_path / "w")
    save_superres_dir(wdir, dataclasses.replace(TINY, residual=True), nnx.state(model, nnx.Param))
    with pytest.raises(UserError, match="residual"):
        export_superres(wdir, str(tmp_path / "unet.safetensors"))
