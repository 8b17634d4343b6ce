"""`ctgen prepare --source tokens`: CT-ViT ids of a prepared dataset, keyed like the volumes, sharded
encoding equal to a direct encode, a centred slice window, and errors that name the fault."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from ctgen.cli import main
from ctgen.convert.ctvit_store import save_ctvit_dir
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.volume import hu_to_model

CFG = CTViTConfig.tiny(image_size=24)  # the phantom fixture's 17 x 24 x 24 grid


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    model = CTViT(CFG, rngs=nnx.Rngs(0))
    path = str(tmp_path_factory.mktemp("tok") / "ctvit")
    save_ctvit_dir(path, CFG, nnx.state(model))
    return path, model


def test_prepare_tokens_matches_a_direct_encode(phantom_dataset, tokenizer, tmp_path, capsys):
    path, model = tokenizer
    out = str(tmp_path / "tokens")
    assert main(["prepare", "--source", "tokens", "--dataset", phantom_dataset, "--tokenizer", path, "--out", out,
                 "--token-batch-size", "3"]) == 0
    assert "wrote CT-ViT token dataset" in capsys.readouterr().out
    src = tfds.builder_from_directory(phantom_dataset)
    tok = tfds.builder_from_directory(out)
    for split, n in (("train", 8), ("validation", 2)):
        vols, toks = src.as_data_source(split), tok.as_data_source(split)
        assert len(toks) == n
        first = vols[0]
        direct = np.asarray(model.encode(jnp.asarray(hu_to_model(np.asarray(first["volume"])))[None]))[0]
        assert toks[0]["tokens"].shape == (9, 3, 3) and toks[0]["tokens"].dtype == np.int16
        np.testing.assert_array_equal(toks[0]["tokens"], direct)
        assert [t["source_id"] for t in toks] == [v["source_id"] for v in vols]
        np.testing.assert_allclose(toks[0]["spacing"], np.asarray(first["spacing"], np.float32))
        assert toks[0]["prompt"] == first["prompt"]

    window = str(tmp_path / "window")
    assert main(["prepare", "--source", "tokens", "--dataset", phantom_dataset, "--tokenizer", path, "--out", window,
                 "--token-slices", "5", "--split", "validation"]) == 0
    assert tfds.builder_from_directory(window).as_data_source("validation")[0]["tokens"].shape == (3, 3, 3)


def test_prepare_tokens_errors(phantom_dataset, tokenizer, tmp_path, capsys):
    path, _ = tokenizer
    assert main(["prepare", "--source", "tokens", "--dataset", phantom_dataset, "--out", str(tmp_path / "a")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["prepare", "--source", "tokens", "--dataset", phantom_dataset, "--tokenizer", path,
                 "--out", str(tmp_path / "b"), "--token-slices", "4"]) == 2
    assert "--token-slices 4" in capsys.readouterr().err
    other = str(tmp_path / "ctvit32")
    save_ctvit_dir(other, CTViTConfig.tiny(), nnx.state(CTViT(CTViTConfig.tiny(), rngs=nnx.Rngs(1))))
    assert main(["prepare", "--source", "tokens", "--dataset", phantom_dataset, "--tokenizer", other,
                 "--out", str(tmp_path / "c")]) == 2
    assert "--resolution 32" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")
