"""CT-ViT <-> GenerateCT state_dict conversion: manifest, round trips, import variants, error reports,
and numerics against GenerateCT outputs stored in tests/reference (hermetic parity)."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctgen.convert import ctvit as cv
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViTConfig
from ctgen.models.ctvit_losses import LossNetworksConfig
from ctgen.stages.ctvit import CTViTTrainer
from ctgen.weights import flatten_state, to_pure

REF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference")
MANIFEST = os.path.join(REF_DIR, "generatect_ctvit.txt")
GOLDEN = os.path.join(REF_DIR, "generatect_ctvit_tiny_golden.npz")
TINY = CTViTConfig.tiny(max_slices=9)
NETS = LossNetworksConfig.tiny()


def _read_manifest():
    rows = []
    with open(MANIFEST, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype, kind = line.rstrip("\n").split("\t")
            rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype, kind))
    return rows


def test_manifest_of_paper_config_is_generatects():
    rows = _read_manifest()
    assert len(rows) == 379
    ours = [(e.key, e.shape, "float32", e.kind) for e in cv.generatect_manifest(CTViTConfig.paper(),
                                                                                 LossNetworksConfig())]
    assert ours == rows


def test_export_of_paper_model_has_every_key_shape_and_dtype():
    """Export the (abstract) paper model with its loss networks: exactly the manifest's keys,
    shapes and dtypes."""
    cfg, nets = CTViTConfig.paper(), LossNetworksConfig()
    abstract = nnx.eval_shape(lambda: CTViTTrainer(cfg, nets, rngs=nnx.Rngs(0)))
    zero = np.zeros((), np.float32)
    flat = {k: np.broadcast_to(zero, v.shape) for k, v in flatten_state(nnx.state(abstract).to_pure_dict()).items()}
    sd = cv.to_generatect(flat, cfg, nets, materialize=False)
    assert [(k, tuple(v.shape), str(v.dtype)) for k, v in sd.items()] == [(r[0], r[1], r[2]) for r in _read_manifest()]


@pytest.fixture(scope="module")
def tiny_model():
    m = CTViTTrainer(TINY, NETS, rngs=nnx.Rngs(3))
    m.ctvit.vq.cluster_size[...] = jnp.linspace(0.0, 2.0, TINY.codebook_size)
    return m


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_import_round_trip(tmp_path, tiny_model, suffix):
    pytest.importorskip("torch") if suffix == ".pt" else None
    path = str(tmp_path / f"ctvit{suffix}")
    n = cv.export_ctvit(tiny_model, path)
    assert n == len(cv.generatect_manifest(TINY, NETS))
    result = cv.import_generatect_ctvit(path, max_slices=9)
    assert result.config == TINY and result.nets == NETS and result.report.ok and not result.notes
    before = flatten_state(nnx.state(tiny_model).to_pure_dict())
    after = flatten_state(to_pure(result.states))
    assert sorted(before) == sorted(after)
    for k in before:
        np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]), err_msg=k)
    vol = jax.random.uniform(jax.random.key(0), (1, 5, 32, 32), minval=-1, maxval=1)
    np.testing.assert_array_equal(np.asarray(tiny_model.ctvit.encode(vol)), np.asarray(result.model().encode(vol)))


def test_pt_export_is_a_plain_tensor_dict_loadable_with_weights_only(tmp_path, tiny_model):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "ctvit.pt")
    cv.export_ctvit(tiny_model, path)
    sd = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in sd.values())
    assert sd["vq._codebook.initted"].tolist() == [1.0]
    assert sd["enc_spatial_transformer.layers.0.1.null_kv"].shape == (2, 0, 8)
    assert float(sd["enc_spatial_transformer.norm_out.beta"].abs().sum()) == 0.0


def test_import_transformer_checkpoint_ctvit_block(tiny_model):
    sd = cv.to_generatect(tiny_model, TINY, NETS)
    core = {k: v for k, v in sd.items() if not k.startswith(("vgg.", "discr."))}
    assert len(core) == len(cv.generatect_manifest(TINY))
    blob = {f"ctvit.{k}": v for k, v in core.items()}
    blob["maskgit.to_logits.weight"] = np.zeros((3, 3), np.float32)
    result = cv.from_generatect(blob, source="transformer_pretrained.pt")
    assert result.nets is None and result.config.image_size == 128  # GenerateCT's default
    result = cv.from_generatect(blob, TINY)
    vol = jax.random.uniform(jax.random.key(1), (1, 3, 32, 32), minval=-1, maxval=1)
    np.testing.assert_array_equal(np.asarray(tiny_model.ctvit.encode(vol)), np.asarray(result.model().encode(vol)))


def test_import_reports_missing_unexpected_and_misshaped_keys(tiny_model):
    sd = dict(cv.to_generatect(tiny_model, TINY, NETS))
    del sd["to_pixels.0.bias"]
    sd["to_pixels.0.weight"] = np.zeros((3, 3), np.float32)
    sd["stray.weight"] = np.zeros(2, np.float32)
    with pytest.raises(UserError) as err:
        cv.from_generatect(sd, TINY, NETS, source="broken.pt")
    msg = str(err.value)
    assert "broken.pt" in msg and "rest_to_pixels/bias" in msg and "stray.weight" in msg
    assert "rest_to_pixels/kernel" in msg and "(3, 3)" in msg


def test_import_checks_generatect_constants(tiny_model):
    sd = dict(cv.to_generatect(tiny_model, TINY, NETS))
    sd["enc_spatial_transformer.layers.0.1.context_norm.gamma"] = np.full(32, 2.0, np.float32)
    result = cv.from_generatect(sd, TINY, NETS)
    assert result.notes and "context_norm.gamma" in result.notes[0]  # unused by GenerateCT: a note
    sd["enc_spatial_transformer.layers.0.1.norm.beta"] = np.ones(32, np.float32)
    with pytest.raises(UserError, match="norm.beta"):
        cv.from_generatect(sd, TINY, NETS)
    sd = dict(cv.to_generatect(tiny_model, TINY, NETS))
    sd["vq._codebook.initted"] = np.zeros(1, np.float32)
    with pytest.raises(UserError, match="initted"):
        cv.from_generatect(sd, TINY, NETS)
    sd = dict(cv.to_generatect(tiny_model, TINY, NETS))
    del sd["dec_temporal_transformer.norm_out.beta"]
    with pytest.raises(UserError, match="norm_out.beta"):
        cv.from_generatect(sd, TINY, NETS)


def test_import_never_unpickles_objects(tmp_path):
    pytest.importorskip("torch")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(UserError, match="evil.pt"):
        cv.import_generatect_ctvit(path)


def test_import_rejects_non_ctvit_files(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "other.safetensors")
    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, path)
    with pytest.raises(UserError, match="no CT-ViT weights"):
        cv.import_generatect_ctvit(path)
    with pytest.raises(UserError, match="no such file"):
        cv.import_generatect_ctvit(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("f", [1, 3, 9])
def test_matches_stored_generatect_outputs(f):
    """GenerateCT's own ids and reconstructions for a tiny CTViT (tests/reference/*golden.npz,
    regenerated by tests/convert/test_ctvit_parity.py): imported into ctgen they are reproduced."""
    golden = np.load(GOLDEN)
    sd = {k[3:]: golden[k] for k in golden.files if k.startswith("sd/")}
    model = cv.from_generatect(sd, CTViTConfig.tiny(temporal_depth=2, max_slices=9), source=GOLDEN).model()
    vol = jnp.asarray(golden[f"input_{f}"])
    np.testing.assert_array_equal(np.asarray(model.encode(vol)), golden[f"ids_{f}"])
    np.testing.assert_allclose(np.asarray(model.reconstruct(vol)), golden[f"recon_{f}"], atol=1e-5)
