"""`ctgen generate` around the cascade: settings, errors (one line, exit code 2), checkpoint layout,
work split, resume after an interruption, provenance hashes. The cascade is replaced by a stand-in
that makes a seed-determined volume, so everything but the models runs for real."""
import json
import os
import re
import shutil

import numpy as np
import pytest

from ctgen.cli import main
from ctgen.generate import cascade
from ctgen.generate.checkpoints import latest_step_dir
from ctgen.generate.outputs import output_paths
from ctgen.generate.provenance import sha256_file
from ctgen.models.ctvit import CTViTConfig
from ctgen.models.ctvit_losses import model_config_dict
from ctgen.text.load import builtin_dir

from fake_cascade import FakeCascade, fake_weights_dir
from two_processes import launch_two

PROMPTS = ["64 years old female: Cardiomegaly.", "Bilateral pleural effusion.", "Emphysema.", "No findings."]


@pytest.fixture
def checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(builtin_dir(), root / "text")  # a Hugging Face T5 directory
    fake_weights_dir(root / "ctvit", "ctvit", model_config_dict(CTViTConfig.tiny(), None))
    fake_weights_dir(root / "maskgit", "maskgit")
    fake_weights_dir(root / "superres", "superres")
    return str(root)


@pytest.fixture
def prompts_csv(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("name,prompt\n" + "".join(f"case{i},\"{p}\"\n" for i, p in enumerate(PROMPTS)))
    return str(path)


def _run(capsys, *argv):
    rc = main(["generate", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _made(out):
    return sorted(f[:-len(".nii.gz")] for f in os.listdir(out) if f.endswith(".nii.gz"))


def test_two_processes_then_rerun_fill_only_what_is_missing(tmp_path, checkpoints, prompts_csv, capsys, monkeypatch):
    out = str(tmp_path / "out")
    base = ["--prompts", prompts_csv, "--out", out, "--checkpoints", checkpoints, "--no-compile-cache"]
    killed = FakeCascade(fail_after=1)
    monkeypatch.setattr(cascade, "run_cascade", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(capsys, *base, "--shard", "1/2")  # process 1 makes case1, dies before case3
    fine = FakeCascade()
    monkeypatch.setattr(cascade, "run_cascade", fine)
    assert _run(capsys, *base, "--shard", "0/2")[0] == 0
    assert killed.calls == [["case1", "case3"]] and fine.calls == [["case0", "case2"]]
    assert _made(out) == ["case0", "case1", "case2"]
    rerun = FakeCascade()
    monkeypatch.setattr(cascade, "run_cascade", rerun)
    rc, stdout, _ = _run(capsys, *base)  # one process: only the sample that is missing
    assert rc == 0 and rerun.calls == [["case3"]] and "1 to make, 3 finished" in stdout
    assert _made(out) == ["case0", "case1", "case2", "case3"]
    again = FakeCascade()
    monkeypatch.setattr(cascade, "run_cascade", again)
    assert _run(capsys, *base)[0] == 0 and again.calls == []  # nothing left: the cascade is not even called
    # same seed -> same volume whichever process made it
    import nibabel as nib

    redo = str(tmp_path / "redo")
    assert _run(capsys, "--prompts", prompts_csv, "--out", redo, "--checkpoints", checkpoints,
                "--no-compile-cache")[0] == 0
    for name in _made(out):
        a, b = (np.asarray(nib.load(os.path.join(d, f"{name}.nii.gz")).dataobj) for d in (out, redo))
        np.testing.assert_array_equal(a, b)


def test_provenance_records_the_run(tmp_path, checkpoints, capsys, monkeypatch):
    monkeypatch.setattr(cascade, "run_cascade", FakeCascade())
    out = str(tmp_path / "out")
    rc, stdout, _ = _run(capsys, "Cardiomegaly (mild).", "--name", "heart", "--out", out, "--checkpoints", checkpoints,
                         "--seed", "5", "--steps", "7", "--config.maskgit.steps=9", "--slices", "5", "--no-sr",
                         "--no-compile-cache")
    assert rc == 0 and "heart: 5x12x12 voxels" in stdout
    for label, path in (("volume", "heart.nii.gz"), ("preview", "previews/heart.png"), ("provenance", "provenance/heart.json")):
        assert re.search(rf"^  {label} +\S*{re.escape(path)}$", stdout, re.M), stdout
    prov = json.load(open(output_paths(out, "heart").provenance))
    assert prov["prompt"] == "Cardiomegaly mild." and prov["name"] == "heart"
    req = prov["request"]
    assert req["seed"] == 5 and req["settings"]["maskgit"]["steps"] == 7  # the option wins over --config.*
    assert req["settings"]["slices"] == 5 and req["settings"]["superres"] == {"enabled": False}
    assert req["settings"]["layout"] == "canonical"
    for stage in ("text", "ctvit", "maskgit"):
        record = prov["checkpoints"][stage]
        assert req["checkpoints"][stage] == record["sha256"]
        for rel, digest in record["files"].items():
            assert sha256_file(os.path.join(record["path"], rel)) == digest
    assert set(prov["checkpoints"]["text"]["files"]) == set(os.listdir(os.path.join(checkpoints, "text")))
    assert prov["versions"]["ctgen"] and prov["versions"]["jax"] and prov["versions"]["jaxlib"]
    assert prov["devices"]["count"] == 8 and prov["process"]["count"] == 1
    assert prov["seconds"]["maskgit"] == 0.5 and prov["compile_seconds"] == {"maskgit": 2.0}
    assert prov["peak_memory"]["host_peak_rss_bytes"] > 0
    assert prov["geometry"]["spacing_mm_dhw"] == [301.5 / 5, 350.0 / 12, 350.0 / 12]
    # asking for DICOM later adds it from the NIfTI, without generating again
    later = FakeCascade()
    monkeypatch.setattr(cascade, "run_cascade", later)
    rc, stdout, _ = _run(capsys, "Cardiomegaly (mild).", "--name", "heart", "--out", out, "--checkpoints",
                         checkpoints, "--seed", "5", "--steps", "7", "--slices", "5", "--no-sr", "--dicom",
                         "--no-compile-cache")
    assert rc == 0 and later.calls == [] and "heart: added dicom from its NIfTI" in stdout
    assert len(os.listdir(output_paths(out, "heart").dicom)) == 5
    # another request into the same folder is refused instead of silently skipped
    rc, _, err = _run(capsys, "Cardiomegaly (mild).", "--name", "heart", "--out", out, "--checkpoints", checkpoints,
                      "--seed", "6", "--steps", "7", "--slices", "5", "--no-sr", "--no-compile-cache")
    assert rc == 2 and "made from another request (sample_seed:" in err


def test_no_compile_cache_flag_turns_the_cache_off(tmp_path, checkpoints, capsys, monkeypatch):
    """`--no-compile-cache` on the command line (not only $CTGEN_COMPILE_CACHE=0): JAX compiles
    without the persistent cache while the cascade runs, and the provenance says so."""
    import jax

    monkeypatch.setenv("CTGEN_COMPILE_CACHE", str(tmp_path / "cache"))
    seen = []

    class Spy(FakeCascade):
        def __call__(self, *args, **kwargs):
            seen.append(jax.config.jax_compilation_cache_dir)
            yield from super().__call__(*args, **kwargs)

    previous = jax.config.jax_compilation_cache_dir  # the test session's own cache (conftest)
    out = str(tmp_path / "out")
    try:
        for name, flags in (("on", []), ("off", ["--no-compile-cache"])):
            monkeypatch.setattr(cascade, "run_cascade", Spy())
            rc, _, err = _run(capsys, "Emphysema.", "--name", name, "--out", out, "--checkpoints", checkpoints,
                              "--slices", "3", "--no-sr", *flags)
            assert rc == 0, err
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
    assert seen == [str(tmp_path / "cache"), None]
    caches = [json.load(open(output_paths(out, n).provenance))["compile_cache"] for n in ("on", "off")]
    assert caches == [str(tmp_path / "cache"), None]


def test_imported_generatect_weights_are_reoriented(tmp_path, checkpoints, capsys, monkeypatch):
    """Weights imported from GenerateCT make volumes in its layout; the NIfTI written must show the
    anatomy canonically. The stand-in model makes a phantom's label map (as HU) exactly as
    GenerateCT's pipeline laid out its training files (stored LPS, the default codes)."""
    from PIL import Image

    from ctgen.data.phantom import make_phantom
    from ctgen.generate.cascade import CascadeOutput
    from ctgen.io.nifti import read_nifti
    from ctgen.volume import extent_spacing, to_canonical

    from phantom_layout import anatomy_is_canonical, generatect_pipeline, write_as

    shape = (33, 40, 40)
    phantom = make_phantom(3, shape, extent_spacing(shape))
    write_as(tmp_path / "labels.nii.gz", phantom.labels, "LPS")
    model_labels = generatect_pipeline(tmp_path / "labels.nii.gz", shape[1], Image.NEAREST)
    assert not all(anatomy_is_canonical(model_labels).values())  # the model's own layout is not canonical

    def generatect_model(samples, config, stages, *, timer, progress):
        for s in samples:
            yield CascadeOutput(sample=s, hu_DxHxW=model_labels.astype(np.float32) * 100.0 - 1000.0)

    fake_weights_dir(os.path.join(checkpoints, "maskgit"), "maskgit", source="/w/transformer_pretrained.pt")
    monkeypatch.setattr(cascade, "run_cascade", generatect_model)
    out = str(tmp_path / "out")
    assert _run(capsys, "Emphysema.", "--out", out, "--checkpoints", checkpoints, "--no-compile-cache",
                "--slices", "33")[0] == 0
    prov = json.load(open(output_paths(out, "emphysema_0001").provenance))
    assert prov["request"]["settings"]["layout"] == "generatect"
    assert prov["request"]["settings"]["generatect_axcodes"] == "LPS"
    nii = read_nifti(output_paths(out, "emphysema_0001").nifti)
    hu, _, _ = to_canonical(nii.data_ijk, nii.affine)  # patient space, whatever the file's storage
    labels = np.rint((hu + 1000.0) / 100.0).astype(np.uint8)
    assert anatomy_is_canonical(labels) == dict.fromkeys(anatomy_is_canonical(labels), True)
    np.testing.assert_array_equal(labels, phantom.labels)


def test_workdir_checkpoints_hash_their_latest_step(tmp_path, checkpoints, capsys, monkeypatch):
    work = os.path.join(checkpoints, "maskgit")
    shutil.rmtree(work)
    for step in (10, 20):
        os.makedirs(os.path.join(work, "checkpoints", str(step), "state"))
        open(os.path.join(work, "checkpoints", str(step), "state", "data"), "w").write(str(step))
    os.makedirs(os.path.join(work, "checkpoints", "30.orbax-checkpoint-tmp-1"))
    json.dump({"stage": "maskgit", "model": {}}, open(os.path.join(work, "config.json"), "w"))
    assert latest_step_dir(work).endswith(os.path.join("checkpoints", "20"))
    monkeypatch.setattr(cascade, "run_cascade", FakeCascade())
    out = str(tmp_path / "out")
    assert _run(capsys, "Emphysema.", "--out", out, "--checkpoints", checkpoints, "--no-compile-cache",
                "--slices", "3", "--no-sr")[0] == 0
    files = json.load(open(output_paths(out, "emphysema_0001").provenance))["checkpoints"]["maskgit"]["files"]
    assert sorted(files) == ["checkpoints/20/state/data", "config.json"]


def _bad_checkpoints(root, case):
    if case == "missing stage":
        shutil.rmtree(os.path.join(root, "maskgit"))
    elif case == "wrong stage":
        shutil.rmtree(os.path.join(root, "maskgit"))
        shutil.copytree(os.path.join(root, "ctvit"), os.path.join(root, "maskgit"))
    elif case == "wrong workdir":
        shutil.rmtree(os.path.join(root, "superres"))
        os.makedirs(os.path.join(root, "superres", "checkpoints", "5"))
        json.dump({"stage": "ctvit"}, open(os.path.join(root, "superres", "config.json"), "w"))
    elif case == "no weights":
        os.remove(os.path.join(root, "ctvit", "ctgen_weights.json"))
    elif case == "text not a T5":
        shutil.rmtree(os.path.join(root, "text"))
        os.makedirs(os.path.join(root, "text"))
    return root


@pytest.mark.parametrize("case,message", [
    ("missing stage", "no .*ckpt/maskgit \\(the MaskGIT transformer\\); make it with `ctgen import "
                      "generatect-transformer"),
    ("wrong stage", "ckpt/maskgit: holds weights of model 'ctvit', not the MaskGIT transformer"),
    ("wrong workdir", "ckpt/superres: a training workdir of stage 'ctvit', not of the super-resolution U-Net"),
    ("no weights", "ckpt/ctvit: neither a ctgen weights directory .* found weights.bin"),
    ("text not a T5", "ckpt/text is not a text encoder"),
])
def test_checkpoint_errors(tmp_path, checkpoints, capsys, case, message):
    import re

    _bad_checkpoints(checkpoints, case)
    rc, _, err = _run(capsys, "Emphysema.", "--out", str(tmp_path / "out"), "--checkpoints", checkpoints)
    assert rc == 2 and re.search(message, err), err
    assert err.startswith("ctgen: error: ") and err.count("\n") == 1


def test_input_errors(tmp_path, checkpoints, prompts_csv, capsys, monkeypatch):
    from ctgen.generate import demo_cascade

    # No --checkpoints falls back to the built-in cascade; point it at an empty place so this case does not
    # depend on how much of the built-in cascade this version ships (tests/generate/test_demo_cascade.py).
    monkeypatch.setattr(demo_cascade, "default_dir", lambda: str(tmp_path / "no_demo"))
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    no_column = tmp_path / "bad.csv"
    no_column.write_text("VolumeName,Findings\nv1,x\n")
    out = str(tmp_path / "out")
    cases = [
        (["", "--out", out, "--checkpoints", checkpoints], "empty prompt"),
        (["--prompts", str(no_column), "--out", out, "--checkpoints", checkpoints],
         "no prompt column .*found columns: VolumeName, Findings"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--slices", "200"], "--slices 200: not 1 \\+ 2k .* 199 or 201"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--slices", "0"], "--slices 0: must be at least 1"),
        (["x", "--out", str(blocker / "out"), "--checkpoints", checkpoints], "--out .*blocker/out: cannot write there"),
        (["x", "--prompts", prompts_csv, "--out", out, "--checkpoints", checkpoints], "either a prompt or --prompts"),
        (["--out", out, "--checkpoints", checkpoints], "nothing to generate"),
        (["x", "--checkpoints", checkpoints], "--out DIR is required"),
        (["x", "--out", out], "no built-in demo cascade here .*give --checkpoints DIR"),
        (["x", "--out", out, "--checkpoints", os.path.join(checkpoints, "ctvit")], "this is one model's directory"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--steps", "0"], "maskgit.steps=0: must be at least 1"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--config.superres.sampler=euler"], "superres.sampler"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--config.maskgit.draw=multinomial"],
         "maskgit.draw='multinomial': choose 'cdf' or 'gumbel'"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--config.superres.threshold=1.5"],
         "superres.threshold=1.5: must be 0 .* or a percentile in \\(0, 1\\)"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--config.maskgit.attention_block=-1"],
         "maskgit.attention_block=-1: must be at least 0"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--config.superres.average=0"],
         "superres.average=0: must be at least 1"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--config.stepz=3"], "unknown config key"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--shard", "2/2"], "--shard 2/2: need 0 <= I < N"),
        (["x", "--out", out, "--checkpoints", checkpoints, "--config.layout=generatect",
          "--config.generatect_axcodes=XYZ"], "axis codes 'XYZ'"),
    ]
    import re

    for argv, message in cases:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and re.search(message, err), (argv, err)
        assert err.startswith("ctgen: error: ") and err.count("\n") == 1, err


def test_print_config(capsys):
    rc, stdout, _ = _run(capsys, "--print-config", "--cond-scale", "3", "--config.superres.steps=10", "--no-sr")
    assert rc == 0 and "cond_scale: 3.0" in stdout and "steps: 10" in stdout and "enabled: false" in stdout


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_jax_processes_share_the_prompts_and_a_rerun_fills_the_gaps(tmp_path, checkpoints, prompts_csv):
    out = str(tmp_path / "out")
    argv = ["--prompts", prompts_csv, "--out", out, "--checkpoints", checkpoints, "--no-compile-cache", "--no-sr",
            "--num-samples", "2", "--slices", "3"]
    first = launch_two(tmp_path, "first", argv)
    assert [info["process_count"] for info in first] == [2, 2]
    assert [info["calls"] for info in first] == [[["case0_s0", "case1_s0", "case2_s0", "case3_s0"]],
                                                 [["case0_s1", "case1_s1", "case2_s1", "case3_s1"]]]
    assert len(_made(out)) == 8
    # an interrupted sample (no marker, a temporary file left) and a lost one are made again, nothing else
    os.remove(output_paths(out, "case1_s1").provenance)
    open(os.path.join(out, ".tmp-0badf00d.case1_s1.nii.gz"), "wb").write(b"partial")
    os.remove(output_paths(out, "case2_s0").nifti)
    second = launch_two(tmp_path, "second", argv)
    assert [info["calls"] for info in second] == [[["case2_s0"]], [["case1_s1"]]]
    assert len(_made(out)) == 8 and not [f for f in os.listdir(out) if f.startswith(".tmp-")]
