"""grain pipelines: exact resume, disjoint host shards, eval padding, SR pairs, MaskGIT token join."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ctgen.data.pipelines import (LoaderOptions, ReconstructionLowRes, select_slices, sr_pipeline, token_pipeline,
                                  volume_pipeline)
from ctgen.data.preprocess import resize_volume
from ctgen.data.side import open_split, write_side_dataset
from ctgen.errors import UserError
from ctgen.volume import hu_to_sr


def _ids(batches):
    return [list(b["source_id"]) for b in batches]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_exactly_the_same_batches(phantom_dataset, workers):
    opts = LoaderOptions(worker_count=workers)
    kw = dict(global_batch_size=2, seed=3, num_slices=9, options=opts)
    n = 6  # 8 train records, 4 batches per epoch: crosses an epoch boundary
    it = volume_pipeline(phantom_dataset, "train", **kw)
    straight = [next(it) for _ in range(n)]
    it2 = volume_pipeline(phantom_dataset, "train", **kw)
    first = [next(it2) for _ in range(n // 2)]
    state = it2.get_state()
    it3 = volume_pipeline(phantom_dataset, "train", **kw)
    it3.set_state(state)
    second = [next(it3) for _ in range(n - n // 2)]
    for i in (it, it2, it3):
        if hasattr(i, "close"):
            i.close()
    _same(straight, first + second)
    b = straight[0]
    assert b["volume"].shape == (2, 9, 24, 24) and b["volume"].dtype == np.float32
    assert b["volume"].min() >= -1 and b["volume"].max() <= 1 and b["valid"].all()
    assert all(p.startswith(("2", "3", "4", "5", "6", "7", "8", "9")) for p in b["prompt"])


def test_epochs_cover_all_records_and_reshuffle(phantom_dataset):
    it = volume_pipeline(phantom_dataset, "train", global_batch_size=2, seed=0)
    ep1 = sum(_ids(next(it) for _ in range(4)), [])
    ep2 = sum(_ids(next(it) for _ in range(4)), [])
    assert sorted(ep1) == sorted(ep2) and len(set(ep1)) == 8
    assert ep1 != ep2
    other = volume_pipeline(phantom_dataset, "train", global_batch_size=2, seed=1)
    assert sum(_ids(next(other) for _ in range(4)), []) != ep1


def test_two_hosts_read_disjoint_shards(phantom_dataset):
    per_host = []
    for pi in range(2):
        it = volume_pipeline(phantom_dataset, "train", global_batch_size=4, process_index=pi, process_count=2, seed=5)
        batches = [next(it) for _ in range(2)]  # one epoch of 4 records per host
        assert batches[0]["volume"].shape[0] == 2
        per_host.append(set(sum(_ids(batches), [])))
    assert len(per_host[0]) == len(per_host[1]) == 4
    assert not per_host[0] & per_host[1]
    all_ids = {bytes(open_split(phantom_dataset, "train")[i]["source_id"]).decode() for i in range(8)}
    assert per_host[0] | per_host[1] == all_ids
    with pytest.raises(UserError, match="multiple"):
        volume_pipeline(phantom_dataset, "train", global_batch_size=3, process_count=2)


def test_eval_is_finite_padded_and_equal_across_hosts(phantom_dataset):
    counts = []
    for pi in range(2):
        batches = list(volume_pipeline(phantom_dataset, "train", global_batch_size=6, process_index=pi,
                                       process_count=2, train=False))
        counts.append(len(batches))
        valid = np.concatenate([b["valid"] for b in batches])
        assert valid.sum() == 4 and len(valid) == 6  # 4 records per host, padded to a batch of 3 x 2
    assert counts[0] == counts[1] == 2
    one = list(volume_pipeline(phantom_dataset, "validation", global_batch_size=2, train=False))
    assert len(one) == 1 and one[0]["valid"].all()


def test_select_slices():
    v = np.arange(10)[:, None, None] * np.ones((1, 2, 2))
    assert select_slices(v, 5, "center", None)[:, 0, 0].tolist() == [2, 3, 4, 5, 6]
    padded = select_slices(v, 13, "random", np.random.default_rng(0))
    assert padded.shape[0] == 13 and padded[0, 0, 0] == -1000 and padded[-1, 0, 0] == -1000
    w = select_slices(v, 3, "random", np.random.default_rng(0))[:, 0, 0]
    assert np.all(np.diff(w) == 1)
    with pytest.raises(UserError):
        volume_pipeline("/nonexistent", "train", global_batch_size=2, num_slices=8)


def test_sr_pairs_default_downsample_and_reconstruction_hook(phantom_dataset, tmp_path):
    it = sr_pipeline(phantom_dataset, "train", global_batch_size=8, slices_per_volume=4, lowres_size=(12, 12), seed=0)
    b = next(it)
    assert b["hires"].shape == (8, 24, 24) and b["lowres"].shape == (8, 12, 12)
    assert 0 <= b["hires"].min() and b["hires"].max() <= 1 and b["lowres"].max() <= 1
    src = open_split(phantom_dataset, "train")
    vols = {bytes(src[i]["source_id"]).decode(): src[i]["volume"] for i in range(len(src))}
    sid, k = b["source_id"][0], b["slice_index"][0]
    np.testing.assert_allclose(b["hires"][0], hu_to_sr(vols[sid][k]))
    expect = hu_to_sr(resize_volume(vols[sid][k:k + 1].astype(np.float32), (1, 12, 12)))[0]
    np.testing.assert_allclose(b["lowres"][0], expect, atol=1e-6)
    # A side dataset of "reconstructions" (here: the volume negated, in the model range).
    feats = {"source_id": tfds.features.Text(),
             "volume": tfds.features.Tensor(shape=(None, 12, 12), dtype=np.float32)}
    recs = [{"source_id": s, "volume": -np.clip(resize_volume(v.astype(np.float32), (v.shape[0], 12, 12)), -1000, 1000) / 1000}
            for s, v in vols.items()]
    side = write_side_dataset(str(tmp_path / "recon"), feats, {"train": recs})
    it = sr_pipeline(phantom_dataset, "train", global_batch_size=8, slices_per_volume=4, seed=0,
                     lowres_fn=ReconstructionLowRes(side, "train"))
    b2 = next(it)
    np.testing.assert_array_equal(b2["hires"], b["hires"])
    np.testing.assert_allclose(b2["lowres"], 1 - b["lowres"], atol=1e-5)


def test_token_pipeline_joins_tokens_and_embeddings_by_source_id(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"vol_{i}" for i in range(6)]
    tok_feats = {"source_id": tfds.features.Text(),
                 "tokens": tfds.features.Tensor(shape=(3, 2, 2), dtype=np.int32)}
    toks = [{"source_id": s, "tokens": np.full((3, 2, 2), 100 + i, np.int32)} for i, s in enumerate(ids)]
    tokens_dir = write_side_dataset(str(tmp_path / "tokens"), tok_feats, {"train": toks})
    # The T5 cache's format: variable-length embedding + length, in another (shuffled) order, no sidecar.
    emb_feats = {"source_id": tfds.features.Text(),
                 "embedding": tfds.features.Tensor(shape=(None, 4), dtype=np.float16,
                                                   encoding=tfds.features.Encoding.BYTES),
                 "length": tfds.features.Scalar(dtype=np.int32)}
    order = rng.permutation(6)
    embs = [{"source_id": ids[i], "embedding": np.full((i + 2, 4), i, np.float16), "length": np.int32(i + 2)}
            for i in order]
    emb_dir = write_side_dataset(str(tmp_path / "emb"), emb_feats, {"train": embs})
    os.remove(os.path.join(emb_dir, "source_ids.train.txt"))
    kw = dict(global_batch_size=2, seed=0, embeddings_dir=emb_dir, max_text_length=5)
    it = token_pipeline(tokens_dir, "train", **kw)
    batches = [next(it) for _ in range(4)]
    for b in batches:
        assert b["tokens"].shape == (2, 3, 2, 2) and b["text_embedding"].shape == (2, 5, 4)
        for j, sid in enumerate(b["source_id"]):
            i = int(sid.split("_")[1])
            assert (b["tokens"][j] == 100 + i).all()
            n = min(i + 2, 5)
            assert b["text_mask"][j].sum() == n and (b["text_embedding"][j, :n] == i).all()
            assert (b["text_embedding"][j, n:] == 0).all()
    state = it.get_state()
    more = [next(it) for _ in range(2)]
    it2 = token_pipeline(tokens_dir, "train", **kw)
    it2.set_state(state)
    _same(more, [next(it2) for _ in range(2)])


def test_sr_resume_reproduces_slice_choices(phantom_dataset):
    kw = dict(global_batch_size=4, slices_per_volume=2, lowres_size=(12, 12), seed=7)
    it = sr_pipeline(phantom_dataset, "train", **kw)
    straight = [next(it) for _ in range(6)]
    it2 = sr_pipeline(phantom_dataset, "train", **kw)
    [next(it2) for _ in range(3)]
    it3 = sr_pipeline(phantom_dataset, "train", **kw)
    it3.set_state(it2.get_state())
    _same(straight[3:], [next(it3) for _ in range(3)])
    assert len({tuple(b["slice_index"]) for b in straight}) > 1


def test_side_dataset_shards_and_lookup(tmp_path):
    from ctgen.data.side import KeyedSource

    feats = {"source_id": tfds.features.Text(), "x": tfds.features.Scalar(dtype=np.int32)}
    path = write_side_dataset(str(tmp_path / "side"), feats,
                              {"train": ({"source_id": f"s{i}", "x": i} for i in range(7)),
                               "validation": iter([])}, examples_per_shard=3)
    names = sorted(os.listdir(path))
    assert [n for n in names if "array_record" in n] == [f"ctgen_side-train.array_record-0000{i}-of-00003" for i in range(3)]
    keyed = KeyedSource(path, "train")
    assert len(keyed) == 7 and "s5" in keyed and keyed["s5"]["x"] == 5
    with pytest.raises(UserError, match="no example"):
        keyed["nope"]
