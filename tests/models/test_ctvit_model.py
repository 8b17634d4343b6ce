"""CT-ViT model: shapes for any 1+2k slice count, batching, input checks, paper-size structure."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.parallel.axes import logical_names

CFG = CTViTConfig.tiny(max_slices=9)


@pytest.fixture(scope="module")
def model():
    return CTViT(CFG, rngs=nnx.Rngs(0))


def _vol(b, f, seed=0, size=32):
    return jax.random.uniform(jax.random.key(seed), (b, f, size, size), minval=-1, maxval=1)


@pytest.mark.parametrize("f", [1, 3, 9])
def test_encode_decode_shapes(model, f):
    vol = _vol(2, f)
    ids = nnx.jit(lambda m, v: m.encode(v))(model, vol)
    assert ids.shape == (2, 1 + (f - 1) // 2, 4, 4) and ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < CFG.codebook_size
    rec = nnx.jit(lambda m, i: m.decode(i))(model, ids)
    assert rec.shape == (2, f, 32, 32)
    # reconstruct == decode(encode) in eval mode
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, v: m.reconstruct(v))(model, vol)), np.asarray(rec),
                               atol=1e-5)


def test_batch_elements_are_independent(model):
    """The temporal PEG's raw reshape must never mix samples of a batch."""
    vol = _vol(3, 5, seed=1)
    rec = nnx.jit(lambda m, v: m.reconstruct(v))
    together = np.asarray(rec(model, vol))
    alone = np.concatenate([np.asarray(rec(model, vol[i:i + 1])) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_time_causal_encoder(model):
    """Time-causal PEGs but non-causal temporal attention: changing the last slices changes the
    first group's tokens (attention sees the future), as in GenerateCT."""
    vol = _vol(1, 5, seed=2)
    z = model.encode_tokens(model.to_tokens(vol))
    vol2 = vol.at[:, 3:].set(0.0)
    z2 = model.encode_tokens(model.to_tokens(vol2))
    assert not np.allclose(np.asarray(z[:, 0]), np.asarray(z2[:, 0]))


@pytest.mark.parametrize("shape,match", [
    ((1, 3, 16, 16), "32x32"),
    ((1, 4, 32, 32), "1 \\+ a multiple of 2"),
    ((1, 11, 32, 32), "max_slices=9"),
    ((3, 32, 32), "batch, slices, height, width"),
])
def test_bad_volume_shapes_raise_clear_errors(model, shape, match):
    with pytest.raises(ValueError, match=match):
        model.encode(jnp.zeros(shape))


def test_decode_rejects_wrong_grid(model):
    with pytest.raises(ValueError, match="ids shaped"):
        model.decode(jnp.zeros((1, 2, 3, 3), jnp.int32))


def test_paper_structure_and_axes():
    from ctgen.models.ctvit_losses import LossNetworksConfig
    from ctgen.stages.ctvit import CTViTTrainer

    cfg = CTViTConfig.paper()
    abstract = nnx.eval_shape(lambda: CTViTTrainer(cfg, LossNetworksConfig(), rngs=nnx.Rngs(0)))

    def count(module):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

    # GenerateCT: 198,202,953 parameters, minus its 16+1 zero-size null_kv and 17 unused
    # context_norm gammas (512 each) that ctgen does not keep as parameters; of these the
    # autoencoder alone has 43,260,168 (16 of the unused gammas), the VGG16 134,260,544.
    assert count(abstract) == 198_202_953 - 17 * 512
    assert count(abstract.ctvit) == 43_260_168 - 16 * 512
    assert count(abstract.vgg) == 134_260_544
    for path, var in nnx.iter_graph(abstract):
        if isinstance(var, nnx.Variable):
            names = logical_names(var)
            assert names is not None and len(names) == len(var.shape), (path, names)


def test_bfloat16_compute_is_close():
    cfg32 = CTViTConfig.tiny()
    m32 = CTViT(cfg32, rngs=nnx.Rngs(0))
    m16 = CTViT(CTViTConfig.tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
    vol = _vol(1, 3, seed=4)
    z32 = m32.encode_tokens(m32.to_tokens(vol))
    z16 = m16.encode_tokens(m16.to_tokens(vol))
    assert z16.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(z16, np.float32) - np.asarray(z32)) / np.linalg.norm(np.asarray(z32))
    assert rel < 0.05


def _count_remat(closed_jaxpr) -> int:
    """Checkpointed computations in a jaxpr, including inside scan bodies."""
    remat = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).jaxpr.eqns[0].primitive

    def count(jaxpr):
        return sum((e.primitive is remat) + sum(count(getattr(sub, "jaxpr", sub))
                                                for sub in jaxprs_in_params(e.params))
                   for e in jaxpr.eqns)

    return count(closed_jaxpr.jaxpr)


def test_remat_gives_same_outputs_and_gradients():
    """Depth 2 (a real scan over blocks): remat=True checkpoints every transformer's scan body and
    computes the same reconstruction and gradients as remat=False."""
    vol = _vol(1, 5, seed=5)

    def loss(m):
        rec = m(vol, train=False).recon_BxFxHxW
        return jnp.mean(jnp.square(rec - vol)), rec

    results = []
    for remat in (False, True):
        m = CTViT(CTViTConfig.tiny(spatial_depth=2, temporal_depth=2, remat=remat),
                  rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(m)
        jaxpr = jax.make_jaxpr(lambda s: loss(nnx.merge(graphdef, s))[0])(state)
        assert _count_remat(jaxpr) == (4 if remat else 0)  # enc/dec x spatial/temporal
        (_, rec), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(m)
        results.append((rec, jax.tree.leaves(grads)))
    (rec0, g0), (rec1, g1) = results
    np.testing.assert_allclose(np.asarray(rec1), np.asarray(rec0), rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_remat_with_a_single_block():
    """A depth-1 transformer also runs its (length-1) checkpointed scan, with the same results."""
    from ctgen.models.attention import Transformer

    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 16))
    results = []
    for remat in (False, True):
        graphdef, state = nnx.split(Transformer(16, depth=1, heads=2, dim_head=8, remat=remat, rngs=nnx.Rngs(0)))

        def f(s):
            return jnp.sum(jnp.square(nnx.merge(graphdef, s)(x, (2, 3, 2, 2))))

        assert _count_remat(jax.make_jaxpr(f)(state)) == int(remat)
        results.append(jax.jit(jax.value_and_grad(f))(state))
    (v0, g0), (v1, g1) = results
    assert float(v1) == pytest.approx(float(v0), rel=1e-5)
    # Two differently compiled programs: some parameters' true gradient is ~0 (e.g. ones softmax is
    # invariant to), where each program leaves float32 rounding noise of the gradients' overall size.
    scale = max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale)
