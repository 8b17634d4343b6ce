"""The CT-ViT stage in the shared loop on 8 emulated devices: phantoms train, the EMA codebook
stays replicated, a checkpoint restores onto another mesh, previews/eval are written, export works."""
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "ctvit.py")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> str:
    """12 phantoms on a 9 x 32 x 32 grid (9 train / 3 validation)."""
    out = str(tmp_path_factory.mktemp("ctvit_phantoms"))
    grid = GridConfig(shape=(9, 32, 32))
    summary = build(PhantomSource(12, 3, grid), DatasetConfig(name="ctvit_tiny", grid=grid, phantom=True), out,
                    validation_fraction=0.25, examples_per_shard=4, progress=False, log=lambda s: None)
    return summary["path"]


def _config(data_dir: str, **overrides):
    over = {"data.dir": data_dir, "train.progress_bar": False, **overrides}
    return load(f"{CONFIG}:tiny", [(k, str(v)) for k, v in over.items()])


def _rows(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _trained_paths(config) -> dict[str, set[str]]:
    """Per phase, the parameter paths it trains and the ones its optimizer state holds."""
    from ctgen.parallel.mesh import make_mesh
    from ctgen.train import state as state_lib

    setup = state_lib.setup_from_config(config, make_mesh(config.mesh.to_dict()), get_stage(config))
    params = setup.abstract["params"]
    out = {}
    for name, phase in setup.phases.items():
        trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.filter_state(params, phase.trains))}
        opt = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)
               for p, _ in jax.tree_util.tree_flatten_with_path(setup.abstract["opt"][name])[0]}
        out[name] = (trained, opt)
    return out


def test_vgg_is_frozen_without_perceptual_loss():
    """No VGG weights (the default run): the perceptual loss is off, so the generator neither trains
    the VGG nor holds optimizer state for it; with weights (here: init_from) it trains it."""
    trained, opt = _trained_paths(_config("unused"))["generator"]
    assert trained and not any("vgg" in p for p in trained)
    assert any("enc_spatial" in p for p in opt) and not any("vgg" in p for p in opt)
    trained, opt = _trained_paths(_config("unused", init_from="/imported/generatect"))["generator"]
    assert any("vgg" in p for p in trained) and any("vgg" in p for p in opt)
    trained, _ = _trained_paths(_config("unused", init_from="/imported/generatect",
                                        **{"loss.vgg_trainable": False}))["generator"]
    assert not any("vgg" in p for p in trained)


@pytest.mark.slow
def test_tiny_training_on_8_devices(phantoms, tmp_path):
    workdir = str(tmp_path / "run")
    cfg = _config(phantoms, **{"mesh.data": 8, "mesh.fsdp": 1, "train.steps": 24, "train.log_every": 4,
                               "train.checkpoint_every": 12, "train.eval_every": 24, "train.preview_every": 24})
    summary = train(cfg, workdir, get_stage(cfg))
    rows = _rows(workdir)
    first, last = rows[0]["generator/recon_loss"], rows[-1]["generator/recon_loss"]
    assert last < 0.7 * first, (first, last)
    assert "discriminator/grad_penalty" in rows[-1] and "generator/codebook_perplexity" in rows[-1]
    ev = _rows(workdir, "eval")[-1]
    assert np.isfinite(ev["psnr"]) and 0 < ev["ssim"] <= 1 and ev["codebook_usage"] > 0
    assert os.path.exists(os.path.join(workdir, "previews", "step_00000024", "ctvit_recon.png"))
    # the EMA codebook moved and is identical on every device of the data-parallel mesh
    embed = summary["state"]["model_state"]["ctvit"]["vq"]["embed"][...]
    copies = [np.asarray(s.data) for s in embed.addressable_shards]
    assert len(copies) == 8 and all(np.array_equal(c, copies[0]) for c in copies)

    # resume on another mesh (data=2 x fsdp=2 x tensor=2) from the step-24 checkpoint and continue
    cfg2 = _config(phantoms, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.steps": 26,
                                "train.log_every": 4, "train.checkpoint_every": 12, "train.eval_every": -1,
                                "train.preview_every": -1})
    summary2 = train(cfg2, workdir, get_stage(cfg2))
    assert summary2["start_step"] == 24 and summary2["final_step"] == 26  # generator steps only
    assert _rows(workdir)[-1]["step"] == 26

    # export the workdir to GenerateCT's format and import it back
    from ctgen.convert.ctvit import import_generatect_ctvit
    from ctgen.convert.ctvit_command import export_workdir

    out = str(tmp_path / "ctvit.safetensors")
    n = export_workdir(workdir, out)
    assert n == 171
    back = import_generatect_ctvit(out, max_slices=17, remat=True)
    final = summary2["state"]
    np.testing.assert_array_equal(np.asarray(back.state["vq"]["embed"][...]),
                                  np.asarray(jax.device_get(final["model_state"]["ctvit"]["vq"]["embed"][...])))


@pytest.mark.slow
def test_warm_start_from_imported_generatect_checkpoint_with_vgg_weights(phantoms, tmp_path):
    """init_from = an imported 379-key-style checkpoint (weights + codebook); VGG16 from a
    torchvision-layout file: the perceptual loss is on and the run starts from the import."""
    from ctgen.convert import ctvit as cv
    from ctgen.convert.ctvit_command import import_to_dir
    from ctgen.convert.torch_files import write_state_dict
    from ctgen.models.ctvit import CTViTConfig
    from ctgen.models.ctvit_losses import LossNetworksConfig
    from ctgen.stages.ctvit import CTViTTrainer

    cfg = CTViTConfig.tiny(max_slices=17, remat=True)
    source = CTViTTrainer(cfg, LossNetworksConfig.tiny(), rngs=nnx.Rngs(11))
    pt = str(tmp_path / "pretrained.safetensors")
    cv.export_ctvit(source, pt)
    import_to_dir(pt, str(tmp_path / "imported"), max_slices=17)
    vgg_file = str(tmp_path / "vgg16.safetensors")
    write_state_dict(cv.vgg_to_torchvision(source.vgg), vgg_file)

    workdir = str(tmp_path / "run")
    config = _config(phantoms, **{"init_from": str(tmp_path / "imported"), "loss.vgg_weights": vgg_file,
                                  "train.steps": 4, "train.log_every": 4, "train.eval_every": -1,
                                  "train.preview_every": -1, "optim.generator.learning_rate": 0.0})
    summary = train(config, workdir, get_stage(config))
    row = _rows(workdir)[-1]
    assert row["generator/perceptual_loss"] > 0
    # learning rate 0: the generator's weights are still the imported ones
    np.testing.assert_allclose(np.asarray(summary["state"]["params"]["ctvit"]["rest_to_pixels"]["kernel"][...]),
                               np.asarray(source.ctvit.rest_to_pixels.kernel[...]), atol=0)


def test_eval_command_on_real_ct_volumes(data_dir, tmp_path, capsys):
    """`ctgen eval` reconstructs the real CT volumes (in-plane resized, 1+2k slices) and prints PSNR."""
    from ctgen.cli import main
    from ctgen.convert.ctvit_store import save_ctvit_dir
    from ctgen.eval.ctvit_eval import evaluate_files
    from ctgen.models.ctvit import CTViT, CTViTConfig

    cfg = CTViTConfig.tiny(max_slices=17, remat=True)
    model = CTViT(cfg, rngs=nnx.Rngs(0))
    weights = str(tmp_path / "weights")
    save_ctvit_dir(weights, cfg, nnx.state(model))
    files = [os.path.join(data_dir, "real_ct", f) for f in ("example_ct.nii.gz", "example_ct_sm.nii.gz")]
    rows = evaluate_files(model, files, num_slices=9, out_dir=str(tmp_path / "out"))
    assert [r["slices"] for r in rows] == [9, 9] and all(np.isfinite(r["psnr"]) for r in rows)
    assert os.path.exists(tmp_path / "out" / "example_ct_ctvit.png")
    assert os.path.exists(tmp_path / "out" / "example_ct_ctvit_recon.nii.gz")
    from ctgen.eval.ctvit_eval import main as eval_main

    assert eval_main(["--model", weights, "--input", files[1], "--slices", "9"]) == 0
    assert "PSNR" in capsys.readouterr().out

    code = main(["eval", "--config", f"{CONFIG}:tiny", "--weights", weights,
                 "--config.model.use_vgg_and_gan=False", "--config.train.phase_cycle=('generator',)",
                 f"--config.data.eval_nifti={','.join(files)}", "--config.data.eval_num_slices=9",
                 "--config.data.eval_batch_size=8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "psnr:" in captured.out and "ssim:" in captured.out


def test_eval_means_cover_the_whole_split(phantoms, tmp_path):
    """3 validation volumes in eval batches of 2 (the second padded with an invalid row): `ctgen eval`'s
    PSNR/SSIM/MSE/soft-tissue MAE are the means over the 3 volumes and codebook usage/perplexity come from the
    histogram of all their tokens, as computed directly on the host."""
    from ctgen.convert.ctvit_store import save_ctvit_dir
    from ctgen.data.pipelines import volume_pipeline
    from ctgen.eval.image_metrics import psnr, ssim
    from ctgen.models.ctvit import CTViT, CTViTConfig
    from ctgen.models.vq import codebook_metrics
    from ctgen.train.evaluate import evaluate

    cfg = CTViTConfig.tiny(max_slices=17, remat=True)
    model = CTViT(cfg, rngs=nnx.Rngs(3))
    weights = str(tmp_path / "weights")
    save_ctvit_dir(weights, cfg, nnx.state(model))
    config = _config(phantoms, **{"model.use_vgg_and_gan": False, "train.phase_cycle": "('generator',)",
                                  "mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 4, "data.eval_batch_size": 2,
                                  "train.eval_batches": 0})
    metrics = evaluate(config, weights, get_stage(config))

    (batch,) = list(volume_pipeline(phantoms, "validation", global_batch_size=3, train=False, num_slices=9))
    assert batch["valid"].all()
    vol = batch["volume"]
    out = model(vol, train=False)
    recon = np.clip(np.asarray(out.recon_BxFxHxW), -1, 1)
    bins = np.bincount(np.asarray(out.ids_BxTxhxw).ravel(), minlength=cfg.codebook_size).astype(np.float32)
    vol_np = np.asarray(vol)
    soft = [np.abs(r - v)[(v >= -0.2) & (v <= 0.2)].mean() * 1000 for r, v in zip(recon, vol_np)]  # (-200, 200) HU
    assert all(np.isfinite(soft))
    want = {"psnr": np.mean(psnr(recon, vol)), "ssim": np.mean(ssim(recon, vol)),
            "recon_mse": np.mean((np.asarray(out.recon_BxFxHxW) - vol) ** 2), "soft_tissue_mae_hu": np.mean(soft),
            **{k: float(v) for k, v in codebook_metrics(bins).items()}}
    assert set(metrics) == set(want)
    for k, v in want.items():
        assert metrics[k] == pytest.approx(float(v), rel=1e-4), k
