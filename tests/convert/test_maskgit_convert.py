"""MaskGIT <-> GenerateCT `MaskGITTransformer` state_dicts: manifest, export/import round trips
(.pt and .safetensors), weights directories with their tokenizer, the CLI commands and their errors."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctgen import weights as weights_lib
from ctgen.cli import main
from ctgen.convert import maskgit as mc
from ctgen.convert.ctvit_store import load_ctvit
from ctgen.convert.maskgit_store import load_maskgit, stored_config, tokenizer_path
from ctgen.convert.namemap import convert
from ctgen.convert.torch_files import read_state_dict
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.maskgit import MaskGIT, MaskGITConfig

MANIFEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference",
                        "generatect_maskgit.txt")
TINY = MaskGITConfig.tiny()
TINY_CTVIT = CTViTConfig.tiny(codebook_size=TINY.num_tokens, image_size=128, max_slices=201)  # what an import infers
GRID = (2, 4, 4)


def _read_manifest(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype, kind = line.rstrip("\n").split("\t")
            rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype, kind))
    return rows


def test_manifest_of_paper_config_is_generatects():
    rows = _read_manifest(MANIFEST)
    assert len(rows) == 457
    ours = [(e.key, e.shape, "float32", e.kind) for e in mc.generatect_manifest(MaskGITConfig.paper(),
                                                                                 CTViTConfig.paper())]
    assert ours == rows
    params = sum(int(np.prod(s)) for k, s, _, kind in rows if k.startswith("maskgit.") and kind == "param")
    assert params == 40_378_184


def test_paper_model_parameters_fill_the_manifest_exactly():
    """The abstract paper MaskGIT converts to exactly the `maskgit.*` keys and shapes of the manifest
    that are parameters (the rest are GenerateCT's constant buffers and empty null_kv)."""
    cfg = MaskGITConfig.paper()
    abstract = nnx.eval_shape(lambda: MaskGIT(cfg, rngs=nnx.Rngs(0)))
    flat = weights_lib.flatten_state(weights_lib.to_pure(nnx.state(abstract)))
    entries = {e.key: e.shape for e in mc.maskgit_entries(cfg) if e.constant is None}
    zeros = {k: np.broadcast_to(np.zeros((), np.float32), v.shape) for k, v in flat.items()}
    converted, _ = convert(zeros, mc.maskgit_rules(), direction="to_foreign", expected_shapes=entries)
    assert {k: tuple(v.shape) for k, v in converted.items()} == entries
    # GenerateCT's 40,378,184 parameters less the 6 self-attention context_norm gains its forward never reads
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 40_378_184 - 6 * 512


@pytest.fixture(scope="module")
def models():
    maskgit = MaskGIT(TINY, rngs=nnx.Rngs(3))
    for path, var in nnx.iter_graph(maskgit):  # move 1-D parameters off their init: a mix-up shows
        if isinstance(var, nnx.Param) and var.ndim == 1:
            var[...] = var[...] + jnp.linspace(-0.1, 0.2, var.shape[0])
    return maskgit, CTViT(TINY_CTVIT, rngs=nnx.Rngs(4))


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(GRID))
    ids = jnp.asarray(rng.integers(0, cfg.num_tokens + 1, (2, n)))
    ctx = jnp.asarray(rng.normal(size=(2, 6, cfg.dim_context)).astype(np.float32))
    mask = jnp.asarray(np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool))
    return ids, ctx, mask


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_import_round_trip(models, tmp_path, suffix):
    maskgit, ctvit = models
    path = str(tmp_path / f"transformer{suffix}")
    n = mc.export_maskgit(maskgit, TINY, ctvit, TINY_CTVIT, path)
    sd = read_state_dict(path)
    assert n == len(sd) == len(mc.generatect_manifest(TINY, TINY_CTVIT))
    keys = [e.key for e in mc.generatect_manifest(TINY, TINY_CTVIT)]
    assert list(sd) == (keys if suffix == ".pt" else sorted(keys))  # safetensors stores keys sorted
    result = mc.import_generatect_maskgit(path)
    assert result.config == TINY and result.report.ok and not result.notes
    assert result.tokenizer is not None and result.tokenizer.config == TINY_CTVIT
    ids, ctx, mask = _inputs(TINY)
    np.testing.assert_array_equal(np.asarray(result.model()(ids, GRID, ctx, mask)),
                                  np.asarray(maskgit(ids, GRID, ctx, mask)))
    np.testing.assert_array_equal(np.asarray(result.tokenizer.model().vq.embed[...]), np.asarray(ctvit.vq.embed[...]))


def test_import_command_writes_maskgit_and_tokenizer_and_export_reproduces_the_file(models, tmp_path):
    maskgit, ctvit = models
    src = str(tmp_path / "transformer_pretrained.pt")
    mc.export_maskgit(maskgit, TINY, ctvit, TINY_CTVIT, src)
    out = str(tmp_path / "imported")
    assert main(["import", "generatect-transformer", src, "--out", out]) == 0
    info = weights_lib.weights_info(out)
    assert info["model"] == "maskgit" and info["tokenizer"] == "tokenizer"
    assert info["source"] == src and info["layout"] == "generatect"  # `ctgen generate` re-orients its output
    assert stored_config(out) == (TINY, os.path.join(out, "tokenizer")) and tokenizer_path(out) == os.path.join(
        out, "tokenizer")
    assert load_ctvit(os.path.join(out, "tokenizer")).cfg == TINY_CTVIT
    loaded = load_maskgit(out, attention="blocked")  # an architecture-neutral override
    assert loaded.cfg.attention == "blocked"
    ids, ctx, mask = _inputs(TINY, seed=1)
    np.testing.assert_allclose(np.asarray(loaded(ids, GRID, ctx, mask)), np.asarray(maskgit(ids, GRID, ctx, mask)),
                               atol=1e-5)
    again = str(tmp_path / "again.safetensors")
    assert main(["export", "maskgit", "--workdir", out, "--out", again]) == 0
    a, b = read_state_dict(src), read_state_dict(again)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_import_errors_name_the_file(models, tmp_path, capsys):
    maskgit, ctvit = models
    sd = mc.to_generatect(maskgit, TINY, ctvit, TINY_CTVIT)
    with pytest.raises(UserError, match="no MaskGIT weights"):
        mc.from_generatect({k: v for k, v in sd.items() if k.startswith("ctvit.")}, source="x.pt")
    broken = dict(sd)
    del broken["maskgit.transformer.layers.0.2.norm.beta"]
    with pytest.raises(UserError, match="strict loading needs these keys too"):
        mc.from_generatect(broken, source="x.pt")
    with pytest.raises(UserError, match="spacing tokens"):
        mc.to_generatect(MaskGIT(MaskGITConfig.tiny(spacing_tokens=1), rngs=nnx.Rngs(0)),
                         MaskGITConfig.tiny(spacing_tokens=1), ctvit, TINY_CTVIT)
    bare = str(tmp_path / "bare")
    from ctgen.convert.maskgit_store import save_maskgit_dir

    save_maskgit_dir(bare, TINY, nnx.state(maskgit))
    assert main(["export", "maskgit", "--workdir", bare, "--out", str(tmp_path / "x.pt")]) == 2
    assert "records no CT-ViT tokenizer" in capsys.readouterr().err
