"""`encode_text`: GenerateCT's zero-padded output, determinism, sharding, truncation, bad input."""
import jax
import numpy as np
import pytest

from ctgen.errors import UserError
from ctgen.parallel.mesh import make_mesh
from ctgen.text import encode_ids, encode_text, load_text_encoder
from ctgen.parallel.axes import DEFAULT_RULES
from ctgen.parallel.mesh import batch_shards

PROMPTS = [
    "64 years old male: Emphysema.",
    "23 years old female: Bilateral pleural effusions, large on the right and small on the left.",
    "None years old None: No acute cardiopulmonary abnormality.",
    "Ünïcode: 肺 nodule 5 mm.",
    "70 years old male: Cardiomegaly.",
]


@pytest.fixture(scope="module")
def builtin():
    return load_text_encoder("builtin")


def test_output_convention_and_determinism(builtin):
    model, tok, cfg = builtin
    emb, mask = encode_text(model, tok, PROMPTS)
    ids, want_mask = tok.batch_encode(PROMPTS)
    assert emb.shape == (5, ids.shape[1], cfg.d_model) and emb.dtype == np.float32 and mask.dtype == bool
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    emb = np.asarray(emb)
    assert not emb[~want_mask].any() and np.abs(emb[want_mask]).min(axis=-1).max() > 0
    raw = np.asarray(model(ids, want_mask))
    # Two different programs (jitted with padding vs a direct call): kernels, and so rounding, may differ
    # by CPU, so only the same program run twice is compared bit for bit (below).
    np.testing.assert_allclose(emb[want_mask], raw[want_mask], rtol=0, atol=1e-5)
    again, _ = encode_text(model, tok, PROMPTS)
    np.testing.assert_array_equal(np.asarray(again), emb)  # bitwise deterministic
    # A prompt's states do not depend on its batch (padding and length bucketing are masked out).
    alone, alone_mask = encode_text(model, tok, PROMPTS[1:2])
    np.testing.assert_allclose(np.asarray(alone)[0], emb[1, : alone_mask.shape[1]], atol=1e-5)
    # Chunked encoding (batch_size) gives the same result.
    chunked, _ = encode_text(model, tok, PROMPTS, batch_size=2)
    np.testing.assert_allclose(np.asarray(chunked), emb, atol=1e-5)


def test_shards_over_8_devices(builtin):
    model, tok, _ = builtin
    assert jax.device_count() == 8
    want, _ = encode_text(model, tok, PROMPTS)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert batch_shards(mesh) == batch_shards(mesh, DEFAULT_RULES) == 4
    assert batch_shards(mesh, [("batch", "data")]) == 2 and batch_shards(None) == 1
    sharded_model, _, _ = load_text_encoder("builtin", mesh=mesh)
    kernel = sharded_model.encoder.layers_0.mlp.wi_0.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # (embed, mlp)
    got, mask = encode_text(sharded_model, tok, PROMPTS, mesh=mesh)  # 5 prompts over 4 batch shards
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # An unsharded model is moved onto the mesh on first use.
    got2, _ = encode_text(model, tok, PROMPTS * 3, mesh=mesh, batch_size=8)
    assert model.token_embedder.embedding[...].sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(np.asarray(got2)[:5, : got.shape[1]], np.asarray(want), atol=1e-5)


def test_truncation_to_256_tokens_is_exact(builtin):
    model, tok, _ = builtin
    long_prompt = "70 years old male: " + "Diffuse centrilobular emphysema in both upper lobes. " * 200
    assert len(long_prompt) > 10_000
    emb, mask = encode_text(model, tok, [long_prompt, "Emphysema."])
    assert emb.shape[1] == 256 and np.asarray(mask)[0].all()
    ids = np.asarray(tok.encode(long_prompt)[:255] + [1], np.int32)[None]
    direct, _ = encode_ids(model, ids, np.ones_like(ids, bool))
    np.testing.assert_allclose(np.asarray(emb)[0], np.asarray(direct)[0], atol=1e-5)
    short, _ = encode_text(model, tok, [long_prompt], max_length=32)
    assert short.shape[1] == 32


def test_bad_input_gives_clear_errors(builtin):
    model, tok, _ = builtin
    with pytest.raises(UserError, match="text 1 is empty"):
        encode_text(model, tok, ["ok", ""])
    with pytest.raises(UserError, match="text 0 is empty"):
        encode_text(model, tok, ["  \n "])
    emb, mask = encode_text(model, tok, ["", "x"], allow_empty=True)
    assert np.asarray(mask)[0].sum() == 1
    with pytest.raises(UserError, match="empty batch"):
        encode_text(model, tok, [])
    with pytest.raises(TypeError):
        encode_text(model, tok, "not a list")
    with pytest.raises(UserError, match="token ids must lie in"):
        encode_ids(model, np.array([[5000, 1]]), np.array([[True, True]]))
    with pytest.raises(UserError, match="at least one real token"):
        encode_ids(model, np.array([[0, 0]]), np.array([[False, False]]))


def test_bfloat16_compute_is_close(builtin):
    model, tok, _ = builtin
    want, mask = encode_text(model, tok, PROMPTS)
    bf_model, _, cfg = load_text_encoder("builtin", dtype="bfloat16")
    got, _ = encode_text(bf_model, tok, PROMPTS)
    assert cfg.dtype == "bfloat16" and got.dtype == np.float32
    err = np.abs(np.asarray(got) - np.asarray(want)).max()
    assert 0 < err <= 0.1 * np.abs(np.asarray(want)).max()
