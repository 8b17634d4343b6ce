"""Cosine-similarity EMA vector quantiser: assignment, EMA update, straight-through, data parallelism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ctgen.models.layers import Buffer
from ctgen.models.vq import VectorQuantizer, codebook_metrics
from ctgen.parallel.axes import DEFAULT_RULES, state_shardings

D, K = 8, 16


def _l2(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _numpy_step(embed, cluster, x, decay=0.8):
    """vector-quantize-pytorch 1.1.2 CosineSimCodebook training step, written out in numpy."""
    flat = _l2(x.reshape(-1, x.shape[-1]))
    ids = np.argmax(flat @ _l2(embed).T, axis=-1)
    q = embed[ids]
    bins = np.bincount(ids, minlength=len(embed)).astype(np.float32)
    cluster = cluster + (1 - decay) * (bins - cluster)
    sums = np.zeros_like(embed)
    np.add.at(sums, ids, flat)
    means = _l2(sums / np.where(bins == 0, 1, bins)[:, None])
    target = np.where((bins == 0)[:, None], _l2(embed), means)
    return ids.reshape(x.shape[:-1]), q.reshape(x.shape), cluster, embed + (1 - decay) * (target - embed)


def _vq():
    return VectorQuantizer(D, K, rngs=nnx.Rngs(0))


def test_buffers_are_not_params():
    vq = _vq()
    assert not nnx.state(vq, nnx.Param)
    assert set(nnx.state(vq, Buffer).to_pure_dict()) == {"embed", "cluster_size", "initted"}


def test_training_step_matches_reference_semantics():
    vq = _vq()
    vq.embed[...] = vq.embed[...] * jnp.linspace(0.5, 2.0, K)[:, None]  # raw rows are not unit norm
    embed0, cluster0 = np.asarray(vq.embed[...]), np.asarray(vq.cluster_size[...])
    x = np.random.default_rng(0).normal(size=(2, 5, D)).astype(np.float32) * 3
    out = vq(jnp.asarray(x), train=True)
    ids, q, cluster, embed = _numpy_step(embed0, cluster0, x)
    np.testing.assert_array_equal(np.asarray(out.ids), ids)
    np.testing.assert_allclose(np.asarray(out.quantized), q, atol=1e-6)  # the pre-update raw codes
    np.testing.assert_allclose(float(out.commit_loss), np.mean((q - x) ** 2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(vq.cluster_size[...]), cluster, atol=1e-5)  # XLA vs numpy rounding
    np.testing.assert_allclose(np.asarray(vq.embed[...]), embed, atol=1e-5)


def test_eval_leaves_codebook_untouched_and_decode_uses_raw_rows():
    vq = _vq()
    before = np.asarray(vq.embed[...])
    x = jax.random.normal(jax.random.key(1), (3, D))
    out = vq(x, train=False)
    np.testing.assert_array_equal(np.asarray(vq.embed[...]), before)
    assert float(out.commit_loss) == 0.0
    np.testing.assert_array_equal(np.asarray(vq.lookup(out.ids)), before[np.asarray(out.ids)])


def test_straight_through_gradient():
    graphdef, state = nnx.split(_vq())
    x = jax.random.normal(jax.random.key(2), (4, D))

    def f(x):
        vq = nnx.merge(graphdef, state, copy=True)  # the update mutates buffers at this trace level
        return jnp.sum(vq(x, train=True).quantized * jnp.arange(D, dtype=jnp.float32)[None, :])

    g = jax.grad(f)(x)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(np.arange(D, dtype=np.float32), (4, D)))


def test_codebook_metrics():
    m = codebook_metrics(jnp.array([2.0, 2.0, 0.0, 0.0]))
    assert float(m["codebook_usage"]) == pytest.approx(0.5)
    assert float(m["codebook_perplexity"]) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_ema_update_identical_on_a_data_parallel_mesh(mesh_shape):
    """One update with the batch split over 8 devices (and the codebook over fsdp) equals the
    single-device update: statistics are reduced across the mesh before the EMA."""
    x = jax.random.normal(jax.random.key(3), (8, 6, D))
    vq = _vq()
    graphdef, state = nnx.split(vq)

    def step(state, x):
        m = nnx.merge(graphdef, state)
        out = m(x, train=True)
        return nnx.state(m), out.ids

    ref_state, ref_ids = jax.jit(step)(state, x)

    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    shardings = state_shardings(state, DEFAULT_RULES, mesh)
    x_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        sharded = jax.jit(step, in_shardings=(shardings, x_sharding), out_shardings=(shardings, x_sharding))
        new_state, ids = sharded(jax.device_put(state, shardings), jax.device_put(x, x_sharding))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)  # sharded reductions round differently
    # every replica holds the same codebook
    embed = new_state["embed"][...]
    shards = {}
    for s in embed.addressable_shards:
        shards.setdefault(str(s.index), []).append(np.asarray(s.data))
    for copies in shards.values():
        for c in copies[1:]:
            np.testing.assert_array_equal(c, copies[0])


@pytest.mark.parametrize("n_tokens", [40, 7])  # more batch vectors than codes (a permutation) and fewer
def test_dead_code_expiry_replaces_only_dead_codes_with_batch_vectors(n_tokens):
    thr = 0.5
    vq = VectorQuantizer(D, K, dead_code_threshold=thr, rngs=nnx.Rngs(0))
    ref = VectorQuantizer(D, K, rngs=nnx.Rngs(0))  # same codebook, no expiry
    x = np.random.default_rng(1).normal(size=(n_tokens, D)).astype(np.float32)
    # Codes 0..3 were busy before this step (they stay above the threshold), the rest never used.
    busy = np.zeros(K, np.float32)
    busy[:4] = 10.0
    vq.cluster_size[...] = jnp.asarray(busy)
    ref.cluster_size[...] = jnp.asarray(busy)
    out = vq(jnp.asarray(x), train=True)
    ref_out = ref(jnp.asarray(x), train=True)
    ref_cluster, ref_embed = np.asarray(ref.cluster_size[...]), np.asarray(ref.embed[...])
    dead = ref_cluster < thr
    assert 0 < dead.sum() < K and not dead[:4].any()
    cluster, embed = np.asarray(vq.cluster_size[...]), np.asarray(vq.embed[...])
    # Live codes: exactly the EMA update without expiry. Dead ones: reset to the threshold and
    # replaced by unit-norm vectors of this batch (distinct ones when the batch is large enough).
    np.testing.assert_allclose(embed[~dead], ref_embed[~dead], atol=1e-6)
    np.testing.assert_allclose(cluster[~dead], ref_cluster[~dead], atol=1e-6)
    np.testing.assert_allclose(cluster[dead], thr)
    batch = _l2(x)
    match = np.abs(embed[dead] @ batch.T - 1.0).min(axis=1)
    assert match.max() < 1e-5, "every replaced code is a normalised batch vector"
    if n_tokens >= K:
        picked = np.argmin(np.abs(embed[dead] @ batch.T - 1.0), axis=1)
        assert len(set(picked.tolist())) == int(dead.sum())
    # The step's own outputs are those of the pre-update codebook: expiry only changes the next step.
    np.testing.assert_array_equal(np.asarray(out.ids), np.asarray(ref_out.ids))
    np.testing.assert_allclose(np.asarray(out.quantized), np.asarray(ref_out.quantized), atol=1e-6)


def test_dead_code_expiry_is_deterministic_and_raises_usage():
    x = np.random.default_rng(2).normal(size=(64, D)).astype(np.float32)
    a = VectorQuantizer(D, K, dead_code_threshold=1.0, rngs=nnx.Rngs(0))
    b = VectorQuantizer(D, K, dead_code_threshold=1.0, rngs=nnx.Rngs(0))
    off = VectorQuantizer(D, K, rngs=nnx.Rngs(0))
    for _ in range(5):
        a(jnp.asarray(x), train=True)
        b(jnp.asarray(x), train=True)
        off(jnp.asarray(x), train=True)
    np.testing.assert_array_equal(np.asarray(a.embed[...]), np.asarray(b.embed[...]))
    used = lambda vq: len(np.unique(np.asarray(vq.assign(jnp.asarray(x)))))  # noqa: E731
    assert used(a) > used(off)
    with pytest.raises(ValueError, match="dead_code_threshold"):
        VectorQuantizer(D, K, dead_code_threshold=-1.0, rngs=nnx.Rngs(0))
