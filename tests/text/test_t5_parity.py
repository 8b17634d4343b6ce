"""Parity with transformers' PyTorch T5 v1.1 encoder, loaded from save_pretrained directories."""
import os

import numpy as np
import pytest
from t5_testing import TINY_HF, hf_last_hidden, random_batch

from ctgen.errors import UserError
from ctgen.text.encode import encode_ids
from ctgen.text.load import load_text_encoder
from ctgen.text.t5 import relative_position_buckets

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity


def _copy_config_and_vocab(src_dir, dst_dir):
    """A new model directory holding only src_dir's config.json and spiece.model."""
    os.makedirs(dst_dir)
    for name in ("config.json", "spiece.model"):
        with open(os.path.join(src_dir, name), "rb") as f, open(os.path.join(dst_dir, name), "wb") as g:
            g.write(f.read())
    return dst_dir


@pytest.mark.parametrize("kind", ["encoder", "full"])
def test_last_hidden_state_matches_transformers(hf_models, kind):
    directory, hf = hf_models[kind]
    model, tokenizer, cfg = load_text_encoder(directory)
    assert (cfg.d_model, cfg.num_layers, cfg.relative_attention_max_distance) == (32, 2, 24)
    ids, mask = random_batch(seed=3)
    want = hf_last_hidden(hf, ids, mask)
    raw = np.asarray(model(ids, mask))
    # Every position, padding included, is the same computation as transformers'.
    assert np.abs(raw - want).max() <= 1e-5
    emb, out_mask = encode_ids(model, ids, mask)
    emb = np.asarray(emb)
    # GenerateCT (tm/t5.py) zeroes padded positions of the last hidden state.
    np.testing.assert_array_equal(np.asarray(out_mask), mask)
    assert np.abs(emb - want * mask[:, :, None]).max() <= 1e-5
    assert not emb[~mask].any()
    assert emb.dtype == np.float32 and emb.shape == ids.shape + (32,)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for q, k, nb, md in [(300, 300, 32, 128), (40, 40, 16, 24), (1, 7, 32, 128)]:
        rel = torch.arange(k)[None, :] - torch.arange(q)[:, None]
        want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
        np.testing.assert_array_equal(relative_position_buckets(q, k, nb, md), want.numpy())


def test_pytorch_bin_checkpoint_loads_with_weights_only(hf_models, tmp_path):
    directory, hf = hf_models["encoder"]
    d = _copy_config_and_vocab(directory, tmp_path / "bin")
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    model, _, _ = load_text_encoder(str(d))
    ids, mask = random_batch(seed=4)
    assert np.abs(np.asarray(model(ids, mask)) - hf_last_hidden(hf, ids, mask)).max() <= 1e-5


class _Exploit:
    marker = None

    def __reduce__(self):  # would create a file if unpickled
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused(hf_models, tmp_path):
    directory, hf = hf_models["encoder"]
    d = _copy_config_and_vocab(directory, tmp_path / "evil")
    exploit = _Exploit()
    exploit.marker = str(tmp_path / "pwned")
    torch.save({"shared.weight": torch.zeros(3), "x": exploit}, d / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights_only"):
        load_text_encoder(str(d))
    assert not os.path.exists(exploit.marker)


def _rewrite_safetensors(src_dir, dst_dir, edit):
    from safetensors.torch import load_file, save_file

    _copy_config_and_vocab(src_dir, dst_dir)
    sd = load_file(os.path.join(src_dir, "model.safetensors"))
    save_file(edit(dict(sd)), os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
    return str(dst_dir)


def test_missing_unexpected_and_mismatched_tensors_are_named(hf_models, tmp_path):
    directory, _ = hf_models["encoder"]

    def drop(sd):
        del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
        sd["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(2, 2)
        sd["encoder.final_layer_norm.weight"] = torch.zeros(31)
        return sd

    bad = _rewrite_safetensors(directory, tmp_path / "bad", drop)
    with pytest.raises(UserError) as err:
        load_text_encoder(bad)
    msg = str(err.value)
    assert "model.safetensors" in msg
    assert "encoder/layers_1/mlp/wo/kernel" in msg  # missing
    assert "encoder.block.0.layer.0.SelfAttention.extra.weight" in msg  # unexpected
    assert "encoder/encoder_norm/scale: (31,) vs (32,)" in msg  # shape mismatch


def test_sharded_safetensors_with_index(hf_models, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    directory, hf = hf_models["full"]
    d = _copy_config_and_vocab(directory, tmp_path / "sharded")
    sd = load_file(os.path.join(directory, "model.safetensors"))
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, d / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(d / "model.safetensors.index.json", "w"))
    model, _, _ = load_text_encoder(str(d))
    ids, mask = random_batch(seed=6)
    assert np.abs(np.asarray(model(ids, mask)) - hf_last_hidden(hf, ids, mask)).max() <= 1e-5
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(UserError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        load_text_encoder(str(d))


def test_bfloat16_safetensors_and_compute(hf_models, tmp_path):
    directory, hf = hf_models["encoder"]
    bf = _rewrite_safetensors(directory, tmp_path / "bf16", lambda sd: {k: v.bfloat16() for k, v in sd.items()})
    model, _, cfg = load_text_encoder(bf, dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    ids, mask = random_batch(seed=5)
    got = np.asarray(model(ids, mask))
    want = hf_last_hidden(hf, ids, mask)
    assert got.dtype == np.float32
    # bf16 weights and bf16 matmuls: a few percent of the activation scale.
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


def test_config_mismatch_with_weights_is_reported(hf_models, tmp_path):
    import json

    directory, _ = hf_models["encoder"]
    d = _rewrite_safetensors(directory, tmp_path / "cfg", lambda sd: sd)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["d_ff"] = TINY_HF["d_ff"] * 2
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(UserError, match=r"encoder/layers_0/mlp/wi_0/kernel: \(32, 48\) vs \(32, 96\)"):
        load_text_encoder(d)
