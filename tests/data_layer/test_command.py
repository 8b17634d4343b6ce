import argparse
import json
import os

import pytest

from ctgen.data import command
from ctgen.data.side import open_split


def test_add_parser_registers_prepare_with_run():
    parser = argparse.ArgumentParser(prog="ctgen")
    sub = parser.add_subparsers(dest="command")
    command.add_parser(sub)
    args = parser.parse_args(["prepare", "--source", "phantom", "--out", "x", "--count", "5"])
    assert args.func is command.run and args.count == 5 and args.slices == 201 and args.resolution == 128
    help_text = sub.choices["prepare"].format_help()
    for opt in ("--strict", "--num-workers", "--validation-fraction", "--hu-mode", "--dataset", "--encoder"):
        assert opt in help_text


def test_prepare_phantoms_from_the_command_line(tmp_path, capsys):
    out = str(tmp_path / "data")
    code = command.main(["--source", "phantom", "--count", "4", "--seed", "9", "--slices", "17", "--resolution", "24",
                         "--out", out, "--validation-fraction", "0.25", "--no-progress",
                         "--prompt-template", "findings", "--name", "demo"])
    assert code == 0
    path = os.path.join(out, "ctgen_ct", "demo", "1.0.0")
    assert path in capsys.readouterr().out
    info = json.load(open(os.path.join(path, "prepare.json")))
    assert info["counts"] == {"train": 3, "validation": 1, "skipped": 0, "warnings": 0}
    import tensorflow_datasets as tfds

    assert len(tfds.data_source("ctgen_ct/demo", data_dir=out, split="train")) == 3  # by name, no TensorFlow
    ex = open_split(out, "train")[0]
    assert ex["volume"].shape == (17, 24, 24) and ex["labels"].shape == (17, 24, 24)
    attrs = json.loads(ex["attributes"])
    assert attrs["seed"] and "measured" in attrs
    assert ex["findings"].decode() in ex["prompt"].decode()  # findings template


def test_bad_options_are_user_errors(tmp_path, capsys):
    assert command.main(["--source", "embeddings", "--out", str(tmp_path)]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert command.main(["--source", "nifti", "--out", str(tmp_path)]) == 2
    assert "--csv" in capsys.readouterr().err
    assert command.main(["--source", "phantom", "--out", str(tmp_path), "--slices", "0"]) == 2
    assert "spacing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        command.main(["--source", "phantom", "--out", str(tmp_path), "--spacing", "a,b"])
    assert command.main(["--source", "phantom", "--out", str(tmp_path), "--spacing", "2,2"]) == 2
    assert "--spacing needs 3 values" in capsys.readouterr().err
    assert command.main(["--source", "phantom", "--out", str(tmp_path), "--slices", "16"]) == 2
    err = capsys.readouterr().err
    assert "--slices 16 is even" in err and "--even-slices" in err
    assert command.main(["--source", "phantom", "--out", str(tmp_path), "--supersample", "0"]) == 2
    assert "--supersample 0" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tmp_path, "ctgen_ct"))  # refused before any work
