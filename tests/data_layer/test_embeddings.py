"""Embedding cache: a tiny TFDS source written here -> side dataset -> same states as encode_text."""
import ml_dtypes
import numpy as np
import pytest

from ctgen.errors import UserError
from ctgen.text import encode_text, load_text_encoder
from ctgen.data.embeddings import build_embedding_cache, main, read_embeddings

tfds = pytest.importorskip("tensorflow_datasets")

SPLITS = {
    "train": [("vol_a_1", "64 years old male: Emphysema."),
              ("vol_a_2", "64 years old male: Emphysema."),  # same study, second reconstruction
              ("vol_b_1", "23 years old female: Bilateral pleural effusions, large on the right."),
              ("vol_c_1", "None years old None: No acute cardiopulmonary abnormality."),
              ("vol_d_1", "Ünïcode: 肺 nodule 5 mm."),
              ("vol_e_1", "70 years old male: " + "Diffuse centrilobular emphysema in both upper lobes. " * 60),
              ("vol_f_1", "41 years old female: Cardiomegaly.")],
    "validation": [("vol_g_1", "55 years old male: Pulmonary nodule, follow-up recommended."),
                   ("vol_h_1", "30 years old female: Normal chest CT.")],
}


class TinyReports(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for a prepared ctgen dataset: prompt + source_id + a volume the cache must not need."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(), "source_id": tfds.features.Text(),
            "volume": tfds.features.Tensor(shape=(None, 4, 4), dtype=np.int16, encoding="zlib")}))

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(rows) for name, rows in SPLITS.items()}

    def _generate_examples(self, rows):
        for i, (sid, prompt) in enumerate(rows):
            yield i, {"prompt": prompt, "source_id": sid, "volume": np.full((i + 1, 4, 4), i, np.int16)}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    builder = TinyReports(data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


@pytest.mark.parametrize("dtype,storage", [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_cache_matches_encode_text(source_dir, tmp_path, dtype, storage):
    out = build_embedding_cache(source_dir, str(tmp_path / "emb"), "builtin", batch_size=4, dtype=dtype)
    model, tok, cfg = load_text_encoder("builtin")
    for split, rows in SPLITS.items():
        src = read_embeddings(out, split)
        assert len(src) == len(rows)
        want, mask = encode_text(model, tok, [p for _, p in rows])
        want, mask = np.asarray(want), np.asarray(mask)
        for i, (sid, _) in enumerate(rows):
            ex = src[i]
            assert ex["source_id"].decode() == sid  # same order as the source
            n = int(mask[i].sum())
            assert ex["length"] == n and ex["embedding"].shape == (n, cfg.d_model)
            assert ex["embedding"].dtype == storage
            np.testing.assert_allclose(ex["embedding"].astype(np.float32), want[i, :n], rtol=1e-2, atol=1e-2)
    assert read_embeddings(out, "train")[5]["length"] == 256  # truncated like GenerateCT
    # ctgen's side-dataset reader finds examples by source_id (via the sidecar the cache writes).
    from ctgen.data.side import KeyedSource

    keyed = KeyedSource(out, "validation")
    assert open(f"{out}/source_ids.validation.txt").read().split() == ["vol_g_1", "vol_h_1"]
    assert keyed["vol_h_1"]["length"] == read_embeddings(out, "validation")[1]["length"]


def test_cache_single_split_cli_and_errors(source_dir, tmp_path, capsys):
    out = str(tmp_path / "val")
    assert main(["--dataset", source_dir, "--out", out, "--split", "validation", "--batch-size", "3"]) == 0
    assert "wrote T5 embedding cache" in capsys.readouterr().out
    builder = tfds.builder_from_directory(out)
    assert list(builder.info.splits.keys()) == ["validation"]
    with pytest.raises(UserError, match="not empty"):
        build_embedding_cache(source_dir, out, batch_size=2)
    assert main(["--dataset", source_dir, "--out", out, "--split", "nope", "--overwrite"]) == 2
    assert "no split(s) ['nope']" in capsys.readouterr().err
    assert len(read_embeddings(out, "validation")) == 2  # a failed --overwrite run keeps the old output
    with pytest.raises(UserError, match=r"need text features \['prompt', 'source_id'\]; missing \['prompt'\]"):
        build_embedding_cache(out, str(tmp_path / "x"), batch_size=2)  # a dataset, but without prompts
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no prepared TFDS dataset"):
        build_embedding_cache(str(tmp_path / "empty"), str(tmp_path / "x"), batch_size=2)
    with pytest.raises(UserError, match="dtype"):
        build_embedding_cache(source_dir, str(tmp_path / "y"), batch_size=2, dtype="float32")
