"""`ctgen prepare --source sr-pairs`: CT-ViT reconstructions of a prepared dataset, keyed by source_id,
sharded over the 8 emulated devices, read back by the SR pipeline."""
import numpy as np
from flax import nnx

from ctgen.cli import main
from ctgen.convert.ctvit_store import save_ctvit_dir
from ctgen.data.features import DatasetConfig
from ctgen.data.pipelines import ReconstructionLowRes, sr_pipeline
from ctgen.data.preprocess import GridConfig, resize_volume
from ctgen.data.side import open_split
from ctgen.data.sources import PhantomSource
from ctgen.data.writer import build
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.volume import clip_hu, hu_to_model, hu_to_sr, model_to_hu


def test_sr_pairs_are_ctvit_reconstructions(tmp_path):
    grid = GridConfig(shape=(5, 64, 64))
    data = build(PhantomSource(5, 1, grid), DatasetConfig(name="sr_pairs", grid=grid, phantom=True),
                 str(tmp_path / "data"), validation_fraction=0.2, examples_per_shard=4, progress=False,
                 log=lambda s: None)["path"]
    cfg = CTViTConfig.tiny(max_slices=5)
    ctvit = CTViT(cfg, rngs=nnx.Rngs(0))
    save_ctvit_dir(str(tmp_path / "ctvit"), cfg, nnx.state(ctvit))
    out = str(tmp_path / "pairs")
    assert main(["prepare", "--source", "sr-pairs", "--dataset", data, "--tokenizer", str(tmp_path / "ctvit"),
                 "--out", out, "--no-progress"]) == 0

    src = open_split(data, "train")
    pairs = open_split(out, "train")
    assert len(pairs) == len(src)
    ex, rec = src[len(src) - 1], pairs[len(src) - 1]
    assert rec["source_id"] == ex["source_id"] and rec["volume"].shape == (5, 32, 32) and rec["volume"].dtype == np.int16
    x = hu_to_model(resize_volume(clip_hu(ex["volume"].astype(np.float32)), (5, 32, 32)))[None]
    want = model_to_hu(np.asarray(ctvit.reconstruct(x))[0])
    np.testing.assert_allclose(rec["volume"], want, atol=1.0)  # int16 rounding

    batch = next(iter(sr_pipeline(data, "train", global_batch_size=5, slices_per_volume=5, train=False,
                                  lowres_fn=ReconstructionLowRes(out, "train"))))
    sid = batch["source_id"][0]
    i = [pairs[j]["source_id"] for j in range(len(pairs))].index(sid.encode() if isinstance(pairs[0]["source_id"],
                                                                                             bytes) else sid)
    np.testing.assert_allclose(batch["lowres"], hu_to_sr(pairs[i]["volume"]), atol=1e-6)

    assert main(["prepare", "--source", "sr-pairs", "--dataset", data, "--out", out]) == 2  # no --tokenizer
