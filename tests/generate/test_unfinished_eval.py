"""`ctgen eval --generated` on a `ctgen generate` folder leaves out volumes that generate does not
count as finished: a NIfTI renamed into place whose run was stopped before its provenance."""
import json
import logging
import os
import shutil

import numpy as np
import pytest

from ctgen.cli import main
from ctgen.generate import cascade, outputs
from ctgen.generate.cascade import CascadeOutput
from ctgen.generate.outputs import is_generate_folder, unfinished_volumes
from ctgen.models.ctvit import CTViTConfig
from ctgen.models.ctvit_losses import model_config_dict
from ctgen.text.load import builtin_dir

from fake_cascade import fake_weights_dir

SHAPE = (17, 64, 64)


def phantom_cascade(samples, config, stages, *, timer, progress):
    """Stands in for the models: a phantom with a right pleural effusion per sample."""
    from ctgen.data.phantom import make_phantom
    from ctgen.volume import extent_spacing

    for s in samples:
        ph = make_phantom(s.seed % 1000, SHAPE, extent_spacing(SHAPE), p_normal=1.0,
                          effusion={"right_ml": 600.0, "left_ml": 0.0})
        yield CascadeOutput(sample=s, hu_DxHxW=ph.hu.astype(np.float32))


@pytest.fixture
def checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(builtin_dir(), root / "text")
    fake_weights_dir(root / "ctvit", "ctvit", model_config_dict(CTViTConfig.tiny(max_slices=17), None))
    fake_weights_dir(root / "maskgit", "maskgit")
    return str(root)


def _stop_before_provenance_of(monkeypatch, name):
    """The process is killed after `name`'s files are in place, before its provenance is written."""
    real = outputs.write_json

    def write_json(path, data):
        if os.path.basename(path) == f"{name}.json":
            raise KeyboardInterrupt("killed")
        real(path, data)

    monkeypatch.setattr(outputs, "write_json", write_json)


def test_eval_leaves_out_what_generate_has_not_finished(tmp_path, checkpoints, capsys, caplog, monkeypatch):
    monkeypatch.setattr(cascade, "run_cascade", phantom_cascade)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("name,prompt\n" + "".join(f"case{i},Right pleural effusion.\n" for i in range(3)))
    out = str(tmp_path / "out")
    _stop_before_provenance_of(monkeypatch, "case1")
    with pytest.raises(KeyboardInterrupt):
        main(["generate", "--prompts", str(prompts), "--out", out, "--checkpoints", checkpoints, "--no-sr",
              "--no-compile-cache"])
    assert sorted(f for f in os.listdir(out) if f.endswith(".nii.gz")) == ["case0.nii.gz", "case1.nii.gz"]
    assert is_generate_folder(out) and unfinished_volumes(out) == [os.path.join(out, "case1.nii.gz")]
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctgen"):
        assert main(["eval", "--generated", out, "--out", str(tmp_path / "adherence")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "skipping 1 volume(s)" in warnings[0], warnings
    assert warnings[0].endswith(": case1.nii.gz") and "\n" not in warnings[0]
    assert "prompt adherence of 1 generated volumes (1 unfinished left out)" in capsys.readouterr().out
    report = json.load(open(tmp_path / "adherence" / "adherence.json"))
    assert report["generated"]["count"] == 1 and report["generated"]["unfinished_skipped"] == ["case1"]
    # against a reference set too; a rerun finishes case1 and case2, and nothing is left out
    ref = str(tmp_path / "reference")
    os.makedirs(ref)
    os.link(os.path.join(out, "case0.nii.gz"), os.path.join(ref, "real0.nii.gz"))
    os.link(os.path.join(out, "case0.nii.gz"), os.path.join(ref, "real1.nii.gz"))
    from ctgen.eval.report import evaluate_generated

    assert evaluate_generated(out, ref, str(tmp_path / "r1"))["generated"]["unfinished_skipped"] == ["case1"]
    monkeypatch.undo()
    monkeypatch.setattr(cascade, "run_cascade", phantom_cascade)
    assert main(["generate", "--prompts", str(prompts), "--out", out, "--checkpoints", checkpoints, "--no-sr",
                 "--no-compile-cache"]) == 0
    assert unfinished_volumes(out) == []
    report = evaluate_generated(out, ref, str(tmp_path / "r2"))
    assert report["generated"]["count"] == 3 and "unfinished_skipped" not in report["generated"]


def test_a_folder_whose_only_volume_is_unfinished(tmp_path, checkpoints, capsys, monkeypatch):
    """Killed during the first sample: provenance/ is there (made before any volume) but empty."""
    monkeypatch.setattr(cascade, "run_cascade", phantom_cascade)
    out = str(tmp_path / "out")
    _stop_before_provenance_of(monkeypatch, "effusion")
    with pytest.raises(KeyboardInterrupt):
        main(["generate", "Right pleural effusion.", "--name", "effusion", "--out", out, "--checkpoints",
              checkpoints, "--no-sr", "--no-compile-cache"])
    assert os.listdir(os.path.join(out, "provenance")) == [] and is_generate_folder(out)
    capsys.readouterr()
    assert main(["eval", "--generated", out, "--out", str(tmp_path / "adherence")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctgen: error: --generated") and "none of its 1 volumes is finished" in err
    # a folder of volumes with hand-made prompt records is not generate's: everything is read
    other = tmp_path / "other"
    os.makedirs(other / "provenance")
    (other / "provenance" / "x.json").write_text(json.dumps({"prompt": "Right pleural effusion."}))
    assert not is_generate_folder(str(other)) and unfinished_volumes(str(other)) == []
