"""The real cascade behind `ctgen generate`: tiny random T5 (built in), CT-ViT, MaskGIT and SR U-Net
weights directories, text in, HU volume out, on the 8 emulated devices."""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from ctgen.cli import main
from ctgen.convert.ctvit_store import save_ctvit_dir
from ctgen.convert.maskgit_store import save_maskgit_dir
from ctgen.convert.superres_store import save_superres_dir
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.maskgit import MaskGIT, MaskGITConfig
from ctgen.models.unet import UNet, UNetConfig
from ctgen.text.load import builtin_dir

PROMPTS = ["64 years old female: Cardiomegaly.", "Bilateral pleural effusion.", "No findings."]


def _save(root, ctvit_cfg, maskgit_cfg, unet_cfg):
    shutil.copytree(builtin_dir(), os.path.join(root, "text"))
    ctvit = CTViT(ctvit_cfg, rngs=nnx.Rngs(0))
    save_ctvit_dir(os.path.join(root, "ctvit"), ctvit_cfg, nnx.state(ctvit))
    maskgit = MaskGIT(maskgit_cfg, rngs=nnx.Rngs(1))
    save_maskgit_dir(os.path.join(root, "maskgit"), maskgit_cfg, nnx.state(maskgit))
    unet = UNet(unet_cfg, rngs=nnx.Rngs(2))
    save_superres_dir(os.path.join(root, "superres"), unet_cfg, nnx.state(unet, nnx.Param))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    # the built-in T5 is 64 wide; the CT-ViT codebook has 64 codes
    _save(root, CTViTConfig.tiny(max_slices=5), MaskGITConfig.tiny(dim_context=64, num_tokens=64), UNetConfig.tiny())
    return root


def _generate(capsys, *argv):
    rc = main(["generate", "--slices", "3", "--steps", "2", "--sr-steps", "2", "--config.superres.scale=2",
               "--config.maskgit.batch_size=2", *argv])  # the test's own options win
    return rc, capsys.readouterr()


def _volume(out, name):
    return np.asarray(nib.load(os.path.join(out, f"{name}.nii.gz")).dataobj)


def _check_written(out, name, shape_dhw, checkpoints):
    """One generated sample's files: the NIfTI's axis order, HU range and affine; its DICOM series
    read back with pydicom into the same HU volume and geometry; provenance hashes of every
    checkpoint file. Returns the canonical HU volume."""
    import pydicom

    from ctgen.generate.provenance import sha256_file
    from ctgen.io.nifti import read_nifti
    from ctgen.volume import to_canonical

    d, h, w = shape_dhw
    spacing = (301.5 / d, 350.0 / h, 350.0 / w)  # geometry.extent_mm / shape (D, H, W)
    img = nib.load(os.path.join(out, f"{name}.nii.gz"))
    assert img.shape == (w, h, d) and img.get_data_dtype() == np.int16  # stored (i, j, k) = (W, H, D)
    assert "".join(nib.aff2axcodes(img.affine)) == "LPS"
    np.testing.assert_allclose(img.header.get_zooms(), spacing[::-1], rtol=1e-6)
    nii = read_nifti(os.path.join(out, f"{name}.nii.gz"))
    hu, canonical_spacing, _ = to_canonical(nii.data_ijk, nii.affine)
    assert hu.shape == (d, h, w)  # (slices, rows, columns), not merely the same sizes in some order
    np.testing.assert_allclose(canonical_spacing, spacing, rtol=1e-6)
    # every generated value is clipped to GenerateCT's HU window [-1000, 1000] (ctgen.volume.clip_hu)
    assert -1000 <= hu.min() < hu.max() <= 1000 and np.isfinite(hu).all()

    folder = os.path.join(out, "dicom", name)
    series = [pydicom.dcmread(os.path.join(folder, f)) for f in sorted(os.listdir(folder))]
    assert len(series) == d
    series.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # inferior first, as canonical slice 0
    dicom_hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in series])
    np.testing.assert_array_equal(dicom_hu, hu)
    for k, ds in enumerate(series):
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], spacing[1:], rtol=1e-5)
        np.testing.assert_allclose(float(ds.SliceThickness), spacing[0], rtol=1e-5)
        ras = img.affine @ np.array([0.0, 0.0, k, 1.0])  # voxel (row 0, column 0) of slice k
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-ras[0], -ras[1], ras[2]],
                                   atol=1e-3)
        assert list(ds.ImageType)[0] == "DERIVED" and ds.SeriesDescription.startswith("SYNTHETIC")

    prov = json.load(open(os.path.join(out, "provenance", f"{name}.json")))
    for stage in ("text", "ctvit", "maskgit", "superres"):
        record = prov["checkpoints"][stage]
        root = os.path.join(checkpoints, stage)
        assert os.path.realpath(record["path"]) == os.path.realpath(root)
        on_disk = {os.path.relpath(os.path.join(dp, f), root) for dp, _, fs in os.walk(root) for f in fs}
        assert set(record["files"]) == on_disk
        for rel, digest in record["files"].items():
            assert sha256_file(os.path.join(root, rel)) == digest, (stage, rel)
        assert prov["request"]["checkpoints"][stage] == record["sha256"]
    return hu


class _Bar:
    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False

    def update(self, k=1):
        self.n += k

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_text_in_ct_volume_out_and_each_sample_depends_only_on_its_seed(tmp_path, checkpoints, capsys, monkeypatch):
    import jax

    from ctgen.generate import cascade

    bars = []

    def record(total, desc, **kwargs):  # the cascade's per-stage bars, whatever the terminal
        bars.append(_Bar(total, desc))
        return bars[-1]

    monkeypatch.setattr(cascade, "stage_progress", record)
    jax.clear_caches()  # the T5 encoder compiles in this run (or reads the persistent cache), whatever ran before
    csv = tmp_path / "prompts.csv"
    csv.write_text("name,prompt\n" + "".join(f"case{i},\"{p}\"\n" for i, p in enumerate(PROMPTS)))
    out = str(tmp_path / "out")
    rc, captured = _generate(capsys, "--prompts", str(csv), "--out", out, "--checkpoints", checkpoints, "--dicom")
    assert rc == 0, captured.err
    # 3 slices of 2 x 32 = 64 pixels
    _check_written(out, "case0", (3, 64, 64), checkpoints)
    # a bar per stage over the run (prompts encoded, prompts decoded by MaskGIT, volumes), complete and closed
    assert [(b.desc, b.total, b.n, b.closed) for b in bars] == [
        ("volumes", 3, 3, True), ("text", 3, 3, True), ("maskgit (2 steps)", 3, 3, True)]
    prov = json.load(open(os.path.join(out, "provenance", "case0.json")))
    assert prov["compile_seconds"]["text"] > 0 and prov["compile_seconds"]["maskgit"] > 0  # apart from sampling
    assert set(prov["seconds"]) >= {"text", "maskgit", "superres", "write"}
    volumes = {f"case{i}": _volume(out, f"case{i}") for i in range(3)}
    for v in volumes.values():
        # 3 slices of 2 x 32 = 64 pixels, HU of a CT (GenerateCT's window: -1000..1000)
        assert sorted(v.shape) == [3, 64, 64] and np.isfinite(v).all()
        assert -1000 <= v.min() < v.max() <= 1000
    assert not np.array_equal(volumes["case0"], volumes["case1"])
    # case1 was decoded beside case0 (a longer prompt); generated on its own (beside a padding copy
    # of itself) it comes out the same
    rc, captured = _generate(capsys, PROMPTS[1], "--name", "case1", "--out", str(tmp_path / "single"),
                             "--checkpoints", checkpoints)
    assert rc == 0, captured.err
    np.testing.assert_array_equal(_volume(str(tmp_path / "single"), "case1"), volumes["case1"])


def _replace_maskgit(root, **overrides):
    shutil.rmtree(os.path.join(root, "maskgit"))
    cfg = MaskGITConfig.tiny(**{"dim_context": 64, "num_tokens": 64, **overrides})
    save_maskgit_dir(os.path.join(root, "maskgit"), cfg, nnx.state(MaskGIT(cfg, rngs=nnx.Rngs(0))))


def _relabel_maskgit(root):
    """The marker claims another architecture than the stored arrays have."""
    marker = os.path.join(root, "maskgit", "ctgen_weights.json")
    info = json.load(open(marker))
    info["model_config"]["dim"] = 48
    json.dump(info, open(marker, "w"))


@pytest.mark.parametrize("case,argv,message", [
    ("text width", [], r"ckpt/maskgit: the MaskGIT reads 16-wide text states but the text encoder .*ckpt/text makes "
                       r"64-wide ones"),
    ("codebook", [], r"ckpt/maskgit: the MaskGIT predicts 32 codes but the CT-ViT .*ckpt/ctvit has a codebook of 64"),
    ("positions", ["--slices", "5"], r"ckpt/maskgit: 5 slices: token grid \(3, 4, 4\) has 48 tokens, more than this "
                                     r"model's max_seq_len=32"),
    ("array shapes", [], r"ckpt/maskgit/weights: the stored weights do not fit this model: \d+ of another shape "
                         r"\(stored vs expected\), e.g. params/.*: \(.*\) vs \(.*\) \(all of it with ctgen -v\)"),
])
def test_models_that_do_not_fit_together_are_named(tmp_path, checkpoints, capsys, case, argv, message):
    import re

    root = str(tmp_path / "ckpt")
    shutil.copytree(checkpoints, root)
    if case == "text width":
        _replace_maskgit(root, dim_context=16)  # trained on a 16-wide text encoder
    elif case == "codebook":
        _replace_maskgit(root, num_tokens=32)  # trained on a CT-ViT with 32 codes
    elif case == "positions":
        _replace_maskgit(root, max_seq_len=32)  # 2 token groups of 4 x 4: 3 slices
    else:
        _relabel_maskgit(root)
    rc, captured = _generate(capsys, "Cardiomegaly.", "--out", str(tmp_path / "out"), "--checkpoints", root, "--no-sr",
                             *argv)
    assert rc == 2 and re.search(message, captured.err), captured.err
    assert captured.err.startswith("ctgen: error: ") and captured.err.count("\n") == 1, captured.err
    if case == "text width":
        assert "maskgit" in captured.err and "16-wide" in captured.err and "64-wide" in captured.err


def test_generation_sets_the_maskgit_attention_block(tmp_path, checkpoints, capsys, monkeypatch):
    """maskgit.attention_block (an inference-only knob, default 2048) reaches the loaded MaskGIT; 0
    keeps the block the model was saved with (MaskGITConfig's 512)."""
    import ctgen.convert.maskgit_store as store

    seen, real = [], store.load_maskgit

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(model.cfg.attention_block)
        return model

    monkeypatch.setattr(store, "load_maskgit", spy)
    for i, setting in enumerate(([], ["--config.maskgit.attention_block=0"])):
        rc, captured = _generate(capsys, "Cardiomegaly.", "--out", str(tmp_path / f"out{i}"), "--checkpoints",
                                 checkpoints, "--no-sr", *setting)
        assert rc == 0, captured.err
    assert seen == [2048, 512]


def test_generation_passes_the_sr_sampler_settings(tmp_path, checkpoints, capsys, monkeypatch):
    """superres.threshold / lowres_noise_level / average reach the slice sampler (GenerateCT: 0.95,
    0.1 and one sample)."""
    import ctgen.sampling.superres as sr

    seen, real = [], sr.SliceSampler

    def spy(model, cfg, *args, **kwargs):
        seen.append((cfg.threshold, cfg.noise_level, cfg.average))
        return real(model, cfg, *args, **kwargs)

    monkeypatch.setattr(sr, "SliceSampler", spy)
    for i, setting in enumerate(([], ["--config.superres.threshold=0", "--config.superres.lowres_noise_level=0",
                                      "--config.superres.average=2"])):
        rc, captured = _generate(capsys, "Cardiomegaly.", "--out", str(tmp_path / f"out{i}"), "--checkpoints",
                                 checkpoints, "--sr-steps", "1", *setting)
        assert rc == 0, captured.err
    assert seen == [(0.95, 0.1, 1), (0.0, 0.0, 2)]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_when_one_has_nothing_to_make(tmp_path, checkpoints):
    """One prompt on two jax.distributed processes: process 1 has no sample. Loading weights is
    collective (Orbax's restore waits for every process at a barrier), so process 1 takes part in
    the loads; and it waits for process 0 before exiting, since jax.distributed aborts every
    process once one has waited at its exit barrier for the shutdown timeout (here 2 s, less
    than process 0 needs to compile and sample)."""
    from two_processes import launch_two

    out = str(tmp_path / "out")
    argv = ["Cardiomegaly.", "--name", "heart", "--out", out, "--checkpoints", checkpoints, "--no-sr",
            "--slices", "3", "--steps", "2", "--config.maskgit.batch_size=2"]
    reports = launch_two(tmp_path, "one", argv, real_cascade=True, timeout=240, shutdown_timeout=2)
    assert [r["process_count"] for r in reports] == [2, 2] and [r["rc"] for r in reports] == [0, 0]
    assert sorted(os.listdir(out)) == ["heart.nii.gz", "previews", "provenance"]


@pytest.mark.slow
def test_generatect_pt_files_imported_then_generated(tmp_path, capsys):
    """GenerateCT's three checkpoints (tiny ones in its .pt formats, made by ctgen's exporters)
    go through `ctgen import generatect-*` into one --checkpoints folder, and `ctgen generate`
    runs them end to end (in GenerateCT's layout, which the imported MaskGIT implies)."""
    pytest.importorskip("torch")
    from ctgen.convert import ctvit as cv
    from ctgen.convert import maskgit as mc
    from ctgen.convert import superres as sv
    from ctgen.convert.torch_files import write_torch_object

    ctvit_cfg, unet_cfg = CTViTConfig.tiny(max_slices=5), UNetConfig.tiny()
    maskgit_cfg = MaskGITConfig.tiny(dim_context=64, num_tokens=64)
    ctvit = CTViT(ctvit_cfg, rngs=nnx.Rngs(0))
    files = {s: str(tmp_path / f"{s}_pretrained.pt") for s in ("ctvit", "transformer", "superres")}
    cv.export_ctvit(ctvit, files["ctvit"])
    mc.export_maskgit(MaskGIT(maskgit_cfg, rngs=nnx.Rngs(1)), maskgit_cfg, ctvit, ctvit_cfg, files["transformer"])
    unet_sd = sv.to_generatect(UNet(unet_cfg, rngs=nnx.Rngs(2)), unet_cfg)
    write_torch_object(sv.trainer_checkpoint(unet_sd, unet_sd, steps=1), files["superres"])

    root = str(tmp_path / "ckpt")
    shutil.copytree(builtin_dir(), os.path.join(root, "text"))  # stands in for google/t5-v1_1-base
    for argv in (["generatect-ctvit", files["ctvit"], "--out", f"{root}/ctvit", "--image-size", "32",
                  "--max-slices", "5"],
                 ["generatect-transformer", files["transformer"], "--out", f"{root}/maskgit"],
                 ["generatect-superres", files["superres"], "--out", f"{root}/superres", "--resnet-groups", "4"]):
        assert main(["import", *argv]) == 0, capsys.readouterr().err
    capsys.readouterr()
    out = str(tmp_path / "out")
    rc, captured = _generate(capsys, "Cardiomegaly.", "--name", "heart", "--out", out, "--checkpoints", root,
                             "--dicom")
    assert rc == 0, captured.err
    hu = _check_written(out, "heart", (3, 64, 64), root)
    assert hu.std() > 0
    prov = json.load(open(os.path.join(out, "provenance", "heart.json")))
    assert prov["request"]["settings"]["layout"] == "generatect"
    assert prov["checkpoints"]["maskgit"]["source"] == files["transformer"]
