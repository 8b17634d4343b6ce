"""Built-in model, ctgen's Orbax format, configs and the TextEncoderSpec."""
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from ctgen.errors import UserError
from ctgen.parallel.axes import logical_names
from ctgen.parallel.mesh import make_mesh
from ctgen.text import (
    T5Config,
    TextEncoderSpec,
    builtin_dir,
    encode_text,
    load_text_config,
    load_text_encoder,
    save_text_encoder,
)
from ctgen.text.load import detect_format
from ctgen.weights import WEIGHTS_MARKER

PROMPTS = ["64 years old male: Emphysema.", "23 years old female: Pleural effusion."]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_builtin_is_small_and_regenerates_byte_for_byte(tmp_path):
    import sentencepiece

    from ctgen.text.make_builtin import make_builtin

    shipped = sorted(os.listdir(builtin_dir()))
    assert shipped == ["README.md", "config.json", "model.safetensors", "spiece.model"]
    assert sum(os.path.getsize(os.path.join(builtin_dir(), n)) for n in shipped) < 2 * 2**20
    if not sentencepiece.__version__.startswith("0.2."):
        pytest.skip(f"the shipped spiece.model was trained with sentencepiece 0.2.x, not {sentencepiece.__version__}")
    for path in make_builtin(str(tmp_path)):
        assert _sha(path) == _sha(os.path.join(builtin_dir(), os.path.basename(path))), path


def test_builtin_loads_in_transformers_too():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, tok, cfg = load_text_encoder("builtin")
    assert cfg == T5Config.preset("tiny")
    emb, mask = encode_text(model, tok, PROMPTS)
    hf = transformers.T5EncoderModel.from_pretrained(builtin_dir()).eval()
    ids, m = tok.batch_encode(PROMPTS)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(m).long()).last_hidden_state
    assert np.abs(np.asarray(emb) - want.numpy() * m[:, :, None]).max() <= 1e-5


def test_every_parameter_has_logical_axes():
    from flax import nnx

    model, _, _ = load_text_encoder("builtin")
    names = {"/".join(map(str, path)): logical_names(var)
             for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert names["token_embedder/embedding"] == ("vocab", "embed")
    assert names["encoder/relpos_bias/rel_embedding"] == ("heads", "pos")
    assert names["encoder/layers_1/attention/out/kernel"] == ("joined_kv", "embed")
    assert all(names.values()), [k for k, v in names.items() if not v]


def test_orbax_round_trip_and_errors(tmp_path):
    model, tok, cfg = load_text_encoder("builtin")
    out = save_text_encoder(model, tok, str(tmp_path / "enc"))
    assert detect_format(out)[0] == "ctgen" and load_text_config(out) == cfg
    loaded, tok2, cfg2 = load_text_encoder(out)
    a, _ = encode_text(model, tok, PROMPTS)
    b, _ = encode_text(loaded, tok2, PROMPTS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        save_text_encoder(model, tok, out)
    # A description that does not match the stored parameters names them.
    meta_path = os.path.join(out, WEIGHTS_MARKER)
    meta = json.load(open(meta_path))
    assert meta["model"] == "t5_encoder" and os.path.isfile(os.path.join(out, "spiece.model"))
    meta["model_config"]["d_ff"] = 96
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match=r"encoder/layers_0/mlp/wi_0/kernel: \(64, 128\) vs \(64, 96\)"):
        load_text_encoder(out)
    meta["model"] = "ctvit"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match="ctgen_weights.json does not describe a ctgen text encoder"):
        load_text_encoder(out)


def test_text_encoder_dir_with_an_old_marker_still_loads(tmp_path):
    """Directories written before markers named `model`/`model_config` (they recorded
    `stage: text` and `t5_config`) load as before."""
    model, tok, cfg = load_text_encoder("builtin")
    out = save_text_encoder(model, tok, str(tmp_path / "enc"))
    with open(os.path.join(out, WEIGHTS_MARKER), "w", encoding="utf-8") as f:
        json.dump({"format": "ctgen-weights-v1", "written": "2025-01-01T00:00:00", "stage": "text",
                   "t5_config": cfg.to_dict()}, f)
    assert load_text_config(out) == cfg
    loaded, _, _ = load_text_encoder(out)
    a, _ = encode_text(model, tok, PROMPTS)
    b, _ = encode_text(loaded, tok, PROMPTS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_format_restores_onto_a_mesh(tmp_path):
    model, tok, _ = load_text_encoder("builtin")
    out = save_text_encoder(model, tok, str(tmp_path / "enc"))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _, _ = load_text_encoder(out, mesh=mesh)
    kernel = sharded.encoder.layers_0.mlp.wi_0.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (32, 64)
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.encoder.layers_0.mlp.wi_0.kernel[...]))


def test_config_presets_and_hf_json(tmp_path):
    base = T5Config.preset("base")
    assert (base.d_model, base.d_ff, base.num_layers, base.num_heads, base.inner_dim) == (768, 2048, 12, 12, 768)
    assert T5Config.preset("xxl").d_model == 4096 and T5Config.preset("large", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(UserError, match="unknown T5 preset"):
        T5Config.preset("huge")
    with pytest.raises(UserError, match="dtype"):
        T5Config(dtype="int8")
    path = tmp_path / "config.json"
    hf = json.load(open(os.path.join(builtin_dir(), "config.json")))
    for change, message in [({"model_type": "bert"}, "expected 't5'"),
                            ({"feed_forward_proj": "relu"}, "original T5 \\(relu\\) is not supported")]:
        json.dump({**hf, **change}, open(path, "w"))
        with pytest.raises(UserError, match=message):
            T5Config.from_hf_json(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        T5Config.from_hf_json(path)


def test_text_encoder_spec():
    ml_collections = pytest.importorskip("ml_collections")
    assert TextEncoderSpec.parse("builtin") == TextEncoderSpec()
    spec = TextEncoderSpec.parse(ml_collections.ConfigDict({"path": "builtin", "max_length": 128, "dtype": "bfloat16"}))
    assert spec.max_length == 128 and spec.config().dtype == "bfloat16" and spec.config().d_model == 64
    assert TextEncoderSpec.parse(spec) is spec
    with pytest.raises(UserError, match="unknown text encoder fields"):
        TextEncoderSpec.parse({"path": "builtin", "layers": 3})
    model, tok, cfg = spec.load()
    assert cfg.dtype == "bfloat16"
