"""The `ctgen train` command line: overrides, locked config, clear errors, help."""
import subprocess
import sys

import numpy as np
import pytest

from ctgen.cli import main
from ctgen.configuration import ConfigError, load, parse_arg, split_overrides
from ctgen.stages.toy import ToyStage

from helpers import REPO, TOY

CTVIT = f"{REPO}/configs/ctvit.py"


def test_overrides_are_typed():
    cfg = load(f"{TOY}:tiny", [("train.steps", "12"), ("optim.main.learning_rate", "1e-2"),
                               ("train.async_checkpointing", "false"), ("train.phase_cycle", "('main','aux')"),
                               ("mesh.fsdp", "-1"), ("init_from", "/some/dir")])
    assert cfg.train.steps == 12 and cfg.optim.main.learning_rate == 0.01
    assert cfg.train.async_checkpointing is False and cfg.train.phase_cycle == ("main", "aux")
    assert cfg.init_from == "/some/dir"


def test_split_overrides_both_forms():
    ov, rest = split_overrides(["train", "--config", "x.py", "--config.a.b=1", "--config.c", "2", "--workdir", "w"])
    assert ov == [("a.b", "1"), ("c", "2")]
    assert rest == ["train", "--config", "x.py", "--workdir", "w"]


@pytest.mark.parametrize("key,value,msg", [
    ("train.stepz", "3", r"unknown config key --config.train.stepz; did you mean --config.train.steps"),
    ("trian.steps", "3", r"unknown config key --config.trian.steps; did you mean --config.train.steps"),
    ("train.steps", "many", "expected an integer"),
    ("train.async_checkpointing", "maybe", "expected a boolean"),
    ("train", "3", "is a group of settings"),
])
def test_bad_overrides_fail_clearly(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        load(f"{TOY}:tiny", [(key, value)])


def test_bad_config_file_and_variant():
    with pytest.raises(ConfigError, match="no such file"):
        load("configs/nope.py:tiny")
    with pytest.raises(ConfigError, match=r"unknown variant 'bogus' \(known variants: tiny; keys: two_phase=False"):
        load(f"{TOY}:bogus")


def test_parse_arg_variant_and_typed_keys():
    a = parse_arg("tiny,res=64,scale=0.5,name=x,flag", variants=("paper", "tiny"), res=0, scale=1.0, name="",
                  flag=False)
    assert (a.variant, a.res, a.scale, a.name, a.flag) == ("tiny", 64, 0.5, "x", True)
    assert parse_arg("", variants=("paper", "tiny"), res=0).variant == "paper"  # the first is the default
    for arg, msg in [("tiny,rez=3", r"unknown key 'rez' \(known variants: paper, tiny; keys: res=0\)"),
                     ("papr", r"unknown variant 'papr' \(known variants: paper, tiny"),
                     ("tiny,res=big", "res='big': expected an integer"),
                     ("tiny,res", "res needs a value, e.g. res=0"),
                     ("tiny,paper", "variants tiny, paper exclude each other")]:
        with pytest.raises(ConfigError, match=msg):
            parse_arg(arg, variants=("paper", "tiny"), res=0)


def test_ctvit_variant_keys_set_their_fields():
    c = load(f"{CTVIT}:small,res=32,slices=5,batch=2,steps=4")
    assert (c.model.image_size, c.model.discr.image_size, c.data.num_slices, c.model.max_slices) == (32, 32, 5, 17)
    assert (c.train.batch_size, c.data.eval_batch_size, c.train.steps) == (2, 2, 4)
    small = load(f"{CTVIT}:small")
    assert (small.model.image_size, small.model.dim, small.data.num_slices, small.train.steps) == (64, 128, 17, 300)
    assert load(f"{CTVIT}:paper,slices=241").model.max_slices == 241


def test_unknown_config_variant_is_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "--config", f"{CTVIT}:papr", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("ctgen: error: --config") and "unknown variant 'papr'" in err
    # Every variant the config defines is listed (read from the error, checked against the config).
    listed = err.split("known variants: ")[1].split(";")[0].split(", ")
    assert {"paper", "tiny", "phantom"} <= set(listed)
    for name in listed:
        load(f"{CTVIT}:{name}")


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "--config", f"{TOY}:tiny", "--workdir", str(tmp_path), "--config.train.stepz=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key --config.train.stepz" in err and "Traceback" not in err
    # 8 emulated devices: a mesh needing 3 fails before anything is built
    assert main(["train", "--config", f"{TOY}:tiny", "--workdir", str(tmp_path), "--config.mesh.fsdp=3"]) == 2
    err = capsys.readouterr().err
    assert "needs 3 devices but 8 are available" in err
    assert main(["train", "--config", f"{TOY}:tiny", "--workdir", str(tmp_path), "--config.train.batch_size=12"]) == 2
    assert "must be divisible by data*fsdp=8" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["train", "--config", f"{TOY}:tiny", "--print-config", "--config.train.steps=77"]) == 0
    assert "steps: 77" in capsys.readouterr().out


def test_help_explains_subcommands():
    out = subprocess.run([sys.executable, "-m", "ctgen", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ctgen", "train", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0
    for phrase in ("--config.<path>=<value>", "resumed", "init_from", "75", "--distributed"):
        assert phrase in out.stdout, phrase
    # init_from also loads non-trainable state (e.g. the VQ codebook), not parameters only.
    from ctgen.train import config as train_config

    for text in (" ".join(out.stdout.split()), " ".join(train_config.__doc__.split())):
        assert "non-trainable state" in text and "parameters only" not in text and "(only)" not in text


HEAVY = ("jax", "flax", "orbax", "tensorflow", "tensorflow_datasets", "grain", "torch", "nibabel", "pydicom")
HELP_PROBE = """
import json, sys
from ctgen.cli import main
loaded = {}
for cmd in json.loads(sys.argv[1]):
    try:
        main(cmd + ["--help"])
    except SystemExit:
        pass
    loaded[" ".join(cmd)] = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps(loaded))
"""


def test_help_imports_no_heavy_library():
    """`ctgen --help` and every `ctgen <command> --help` build their parsers without JAX & co."""
    import json

    commands = [[], ["prepare"], ["train"], ["eval"], ["generate"], ["export"], ["export", "ctvit"],
                ["export", "maskgit"], ["import"], ["import", "generatect-ctvit"], ["import", "generatect-transformer"],
                ["bench"], ["demo"]]
    from ctgen.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {c[0] for c in commands if c} == set(sub.choices)  # a new command joins this test
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, json.dumps(commands), json.dumps(HEAVY)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert loaded == {" ".join(c): [] for c in commands}


def test_eval_command_on_workdir_and_weights(tmp_path, capsys):
    import json

    from ctgen.train.loop import train
    from ctgen.weights import save_weights

    from helpers import toy_config

    config = toy_config(**{"train.steps": 20, "train.eval_every": -1})
    out = train(config, str(tmp_path / "run"), ToyStage(config))
    st = out["state"]
    save_weights(str(tmp_path / "w"), st["params"], st["model_state"], model="toy",
                 model_config=config.model.to_dict())
    results = []
    for src in ("run", "w"):
        rc = main(["eval", "--config", f"{TOY}:tiny", "--weights", str(tmp_path / src),
                   "--json", str(tmp_path / f"{src}.json"), "--previews", str(tmp_path / f"prev_{src}")])
        assert rc == 0
        results.append(json.load(open(tmp_path / f"{src}.json")))
        assert (tmp_path / f"prev_{src}" / "preview.npz").exists()
    assert results[0] == results[1] and results[0]["mse"] > 0
    assert "mse:" in capsys.readouterr().out
    assert main(["eval", "--config", f"{TOY}:tiny", "--weights", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_eval_batch_that_does_not_split_over_the_mesh_fails_clearly(tmp_path, capsys):
    rc = main(["train", "--config", f"{TOY}:tiny", "--workdir", str(tmp_path), "--config.train.steps=2",
               "--config.train.eval_every=2", "--config.data.eval_batch_size=4", "--config.train.progress_bar=false"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "a batch of 4 examples" in err and "data*fsdp=8" in err and "data.eval_batch_size" in err


def test_eval_reads_params_and_ema_only(tmp_path):
    """`ctgen eval` on a workdir takes its EMA parameters (as the loop's own eval does) without
    reading optimizer state: here the eval config's optimizer has another state layout."""
    from ctgen.train import state as state_lib
    from ctgen.train.evaluate import evaluate, load_for_inference
    from ctgen.train.loop import train

    from helpers import assert_params_equal, params_numpy, toy_config

    run = str(tmp_path / "run")
    ema_cfg = toy_config("ema", **{"train.steps": 20, "train.eval_every": 0})
    out = train(ema_cfg, run, ToyStage(ema_cfg))
    other_optimizer = {"optim.main.name": "adam", "optim.main.grad_clip_norm": 0.0}  # no clipping state
    cfg = toy_config("ema", **other_optimizer)
    _, state = load_for_inference(cfg, run, ToyStage(cfg))
    with_ema = params_numpy({"params": state_lib.eval_params(out["state"], use_ema=True)})
    live = params_numpy(out["state"])
    assert not np.array_equal(with_ema["mid/kernel"], live["mid/kernel"])
    assert_params_equal(params_numpy(state), with_ema)
    assert evaluate(cfg, run, ToyStage(cfg)) == pytest.approx(out["eval"], rel=1e-5)  # not the loop's compiled eval
    live_cfg = toy_config("ema", **other_optimizer, **{"train.eval_with_ema": False})
    _, state = load_for_inference(live_cfg, run, ToyStage(live_cfg))
    assert_params_equal(params_numpy(state), live)
