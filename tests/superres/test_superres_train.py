"""The super-resolution stage in the shared loop on 8 emulated devices: phantom slice pairs train
(the loss falls), eval scores SR and bicubic, previews are written, a checkpoint restores onto
another mesh, and the workdir exports to GenerateCT's trainer checkpoint (EMA for sampling)."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from ctgen.configuration import load
from ctgen.data.features import DatasetConfig
from ctgen.data.preprocess import GridConfig
from ctgen.data.sources import PhantomSource
from ctgen.data.writer import build
from ctgen.stages import get_stage
from ctgen.train.loop import train

pytestmark = pytest.mark.slow  # compiles the U-Net training step twice and its sampler

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "superres.py")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> str:
    """10 phantoms of 5 x 32 x 32 (the high-res slices; 8 x 8 low-res ones are derived)."""
    out = str(tmp_path_factory.mktemp("sr_phantoms"))
    grid = GridConfig(shape=(5, 32, 32))
    summary = build(PhantomSource(10, 5, grid), DatasetConfig(name="sr_tiny", grid=grid, phantom=True), out,
                    validation_fraction=0.2, examples_per_shard=4, progress=False, log=lambda s: None)
    return summary["path"]


def _config(data_dir: str, **overrides):
    over = {"data.dir": data_dir, "train.progress_bar": False, **overrides}
    return load(f"{CONFIG}:tiny", [(k, str(v)) for k, v in over.items()])


def _rows(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_tiny_training_on_8_devices(phantoms, tmp_path):
    workdir = str(tmp_path / "run")
    cfg = _config(phantoms, **{"mesh.data": 8, "mesh.fsdp": 1, "train.steps": 30, "train.log_every": 5,
                               "train.checkpoint_every": 30, "train.eval_every": 30, "train.preview_every": 30})
    summary = train(cfg, workdir, get_stage(cfg))
    rows = _rows(workdir)
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-2:]])
    assert last < 0.8 * first, (first, last)
    ev = _rows(workdir, "eval")[-1]
    for k in ("psnr_sr", "psnr_bicubic", "ssim_sr", "ssim_bicubic"):
        assert np.isfinite(ev[k]), ev
    assert 0 < ev["ssim_bicubic"] <= 1
    assert os.path.exists(os.path.join(workdir, "previews", "step_00000030", "superres.png"))
    ema = summary["state"]["ema"]["main"]
    params = summary["state"]["params"]
    k_ema = np.asarray(jax.device_get(ema["init_conv"]["convs"][0]["kernel"][...]))
    k_live = np.asarray(jax.device_get(params["init_conv"]["convs"][0]["kernel"][...]))
    assert not np.array_equal(k_ema, k_live)  # the EMA is a separate, lagging copy

    # restore the step-30 checkpoint onto another mesh (data 2 x fsdp 2 x tensor 2): same weights and EMA
    cfg2 = _config(phantoms, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.steps": 30,
                                "train.eval_every": -1, "train.preview_every": -1})
    summary2 = train(cfg2, workdir, get_stage(cfg2))
    assert summary2["start_step"] == 30 and summary2["final_step"] == 30
    restored = summary2["state"]["ema"]["main"]["init_conv"]["convs"][0]["kernel"][...]
    assert dict(restored.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_array_equal(np.asarray(jax.device_get(restored)), k_ema)

    # export: `model` = live weights, `ema.1.ema_model` = the EMA ones; import takes the EMA and says so
    from ctgen.convert import superres as sv
    from ctgen.convert.superres_store import export_superres, import_to_dir, load_superres
    from ctgen.convert.torch_files import read_torch_object

    out = str(tmp_path / "sr.pt")
    export_superres(workdir, out)
    ckpt = read_torch_object(out)
    final = summary2["state"]
    cfg_model = get_stage(cfg2).cfg
    live_sd = sv.to_generatect(final["params"], cfg_model)
    ema_sd = sv.to_generatect(final["ema"]["main"], cfg_model)
    key = "init_conv.convs.0.weight"
    np.testing.assert_array_equal(ckpt["model"]["unets.1." + key], live_sd[key])
    np.testing.assert_array_equal(ckpt["ema"]["1.ema_model." + key], ema_sd[key])
    assert int(np.sum(ckpt["steps"])) == 30 and len(ckpt["ema"]) == 4 + 2 * len(ckpt["model"])
    report = import_to_dir(out, str(tmp_path / "imported"))
    assert "EMA weights" in report
    model, which = load_superres(str(tmp_path / "imported"))
    assert which == "live"  # a weights directory holds only the weights meant for sampling
    np.testing.assert_array_equal(sv.to_generatect(nnx.state(model, nnx.Param), cfg_model)[key], ema_sd[key])
    model, which = load_superres(workdir)
    assert which == "ema"
