"""Loading T5X checkpoints: a checkpoint in T5X's on-disk format is written here, from the
transformers model's weights, and must load and compute the same states.

Format facts used (google-research/t5x `t5x/checkpoints.py`): `checkpoint_<step>/checkpoint` is
flax msgpack of `{"version": 3, "optimizer": {"target": params, "state": {...}}}`; partitioned
parameters are zarr arrays (gzip) in `checkpoint_<step>/<name with / -> .>`, referenced from the
msgpack by a TensorStore spec with a relative path; others are stored inline. T5X layouts:
attention kernels `(embed, heads*d_kv)`, out `(heads*d_kv, embed)`, `relpos_bias/rel_embedding`
`(heads, buckets)`, norms `.../scale`.
"""
import os
import shutil

import numpy as np
import pytest
from t5_testing import TINY_HF, hf_last_hidden, random_batch, randomize_

from ctgen.errors import UserError
from ctgen.text.load import builtin_dir, detect_format, load_text_config, load_text_encoder

torch = pytest.importorskip("torch")
ts = pytest.importorskip("tensorstore")
serialization = pytest.importorskip("flax.serialization")


def t5x_params_from_hf(hf_model) -> dict[str, np.ndarray]:
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    out = {"target/token_embedder/embedding": sd["shared.weight"],
           "target/encoder/relpos_bias/rel_embedding":
               sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T,
           "target/encoder/encoder_norm/scale": sd["encoder.final_layer_norm.weight"]}
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    for i in range(n_layers):
        hf, t = f"encoder.block.{i}.layer.", f"target/encoder/layers_{i}/"
        out[t + "pre_attention_layer_norm/scale"] = sd[hf + "0.layer_norm.weight"]
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
            out[t + f"attention/{ours}/kernel"] = sd[hf + f"0.SelfAttention.{theirs}.weight"].T
        out[t + "pre_mlp_layer_norm/scale"] = sd[hf + "1.layer_norm.weight"]
        for name in ("wi_0", "wi_1", "wo"):
            out[t + f"mlp/{name}/kernel"] = sd[hf + f"1.DenseReluDense.{name}.weight"].T
    rng = np.random.default_rng(0)  # a decoder and Adafactor state, which the encoder must ignore
    d = out["target/encoder/encoder_norm/scale"].shape[0]
    inner = out["target/encoder/layers_0/attention/query/kernel"].shape[1]
    out["target/decoder/layers_0/self_attention/query/kernel"] = rng.normal(size=(d, inner)).astype(np.float32)
    out["target/decoder/decoder_norm/scale"] = np.ones(d, np.float32)
    out["target/decoder/logits_dense/kernel"] = rng.normal(size=(d, 512)).astype(np.float32)
    out["state/param_states/encoder/encoder_norm/scale/v"] = np.zeros(d, np.float32)
    out["state/param_states/token_embedder/embedding/v_row"] = np.zeros(512, np.float32)
    out["state/step"] = np.asarray(1000, np.int32)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_t5x_checkpoint(step_dir: str, flat: dict, *, kvstore: str = "file", state_subdir: bool = False) -> None:
    """Write `flat` ('/'-joined names) in T5X's layout; matrices go to zarr, vectors and scalars inline."""
    ckpt_dir = os.path.join(step_dir, "state") if state_subdir else step_dir
    os.makedirs(ckpt_dir)
    tree: dict = {}
    for name, value in flat.items():
        leaf = value
        if value.ndim >= 2:
            rel = name.replace("/", ".")
            chunks = [max(1, value.shape[0] // 2)] + list(value.shape[1:])
            meta = {"compressor": {"id": "gzip"}, "shape": list(value.shape), "chunks": chunks}
            store = ts.open({"driver": "zarr", "dtype": value.dtype.name, "metadata": meta,
                             "kvstore": {"driver": "file", "path": os.path.join(ckpt_dir, rel)}},
                            create=True).result()
            store.write(value).result()
            if kvstore == "file":  # tensorstore >= 0.1.14 spec: path inside the kvstore
                leaf = {"driver": "zarr", "dtype": value.dtype.name, "metadata": meta,
                        "kvstore": {"driver": "file", "path": rel}}
            else:  # written to GCS, with the placeholder bucket and the older top-level path
                leaf = {"driver": "zarr", "dtype": value.dtype.name, "metadata": meta, "path": rel,
                        "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"}}
        node = tree
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    with open(os.path.join(ckpt_dir, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize({"version": 3, "optimizer": tree}))


@pytest.fixture(scope="module")
def hf_encoder():
    """T5X directories carry no config: max_distance is T5 v1.1's 128, so the reference uses it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    model = transformers.T5EncoderModel(transformers.T5Config(**{**TINY_HF, "relative_attention_max_distance": 128}))
    randomize_(model.eval(), 3)
    return model


@pytest.fixture(scope="module")
def t5x_params(hf_encoder):
    return t5x_params_from_hf(hf_encoder)


@pytest.mark.parametrize("kvstore,state_subdir", [("file", False), ("gcs", True)])
def test_t5x_checkpoint_matches_transformers(hf_encoder, t5x_params, tmp_path, kvstore, state_subdir):
    model_dir = tmp_path / "t5_1_1_tiny"
    write_t5x_checkpoint(str(model_dir / "checkpoint_1000"), t5x_params, kvstore=kvstore, state_subdir=state_subdir)
    # An older step with a broken encoder: the highest step must be the one read.
    older = dict(t5x_params)
    older["target/encoder/encoder_norm/scale"] = np.zeros_like(older["target/encoder/encoder_norm/scale"])
    write_t5x_checkpoint(str(model_dir / "checkpoint_500"), older)
    shutil.copy(os.path.join(builtin_dir(), "spiece.model"), model_dir / "spiece.model")  # found in the parent dir

    assert detect_format(str(model_dir))[0] == "t5x"
    cfg = load_text_config(str(model_dir))
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads,
            cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (512, 32, 8, 48, 2, 4, 16, 128)
    model, tokenizer, cfg = load_text_encoder(str(model_dir))
    assert tokenizer.source == str(model_dir / "spiece.model")
    ids, mask = random_batch(seed=7)
    want = hf_last_hidden(hf_encoder, ids, mask)
    assert np.abs(np.asarray(model(ids, mask)) - want).max() <= 1e-5
    # A step directory or the msgpack file itself also works; the vocabulary is found above it.
    msgpack = model_dir / "checkpoint_1000" / ("state" if state_subdir else "") / "checkpoint"
    by_file, _, _ = load_text_encoder(str(msgpack))
    np.testing.assert_array_equal(np.asarray(by_file(ids, mask)), np.asarray(model(ids, mask)))


def test_t5x_errors_name_the_problem(t5x_params, tmp_path):
    incomplete = dict(t5x_params)
    del incomplete["target/encoder/layers_1/mlp/wi_1/kernel"]
    step = tmp_path / "missing" / "checkpoint_1"
    write_t5x_checkpoint(str(step), incomplete)
    shutil.copy(os.path.join(builtin_dir(), "spiece.model"), tmp_path / "missing" / "spiece.model")
    with pytest.raises(UserError, match="encoder/layers_1/mlp/wi_1/kernel"):
        load_text_encoder(str(tmp_path / "missing"))

    step = tmp_path / "nozarr" / "checkpoint_1"
    write_t5x_checkpoint(str(step), t5x_params)
    shutil.rmtree(step / "target.encoder.layers_0.mlp.wo.kernel")
    with pytest.raises(UserError, match=r"target\.encoder\.layers_0\.mlp\.wo\.kernel.*missing"):
        load_text_encoder(str(tmp_path / "nozarr"))

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.npz").write_bytes(b"nothing")
    with pytest.raises(UserError, match="is not a text encoder"):
        load_text_encoder(str(tmp_path / "junk"))
