"""MaskGIT decoding: GenerateCT's schedule and counts, one batched cond + null forward per step,
determinism per seed, any 1 + 2k slice count, batched prompts, one compilation per shape, filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctgen.models.maskgit import MaskGIT, MaskGITConfig
from ctgen.sampling.mask_schedule import decoding_counts, training_mask
from ctgen.sampling.maskgit import SampleConfig, draw, filter_logits, generate_ids, gumbel_draw, sample

V = 16


def test_decoding_counts_follow_generatect():
    counts = decoding_counts("cosine", 18, 6464)
    assert counts[0] == 6464 and counts[-1] == round(6464 * np.cos(np.pi / 2 * 17 / 18))
    assert np.all(np.diff(counts) <= 0) and counts.min() >= 1
    assert decoding_counts("cosine", 18, 1).tolist() == [1] * 18  # at least one token per step
    with pytest.raises(ValueError, match="unknown mask schedule"):
        decoding_counts("exp", 4, 10)


def test_training_mask_masks_at_least_one_and_at_most_all():
    m = np.asarray(training_mask(jax.random.key(0), 256, 40))
    counts = m.sum(1)
    assert counts.min() >= 1 and counts.max() == 40  # level 0 masks everything
    allowed = {max(1, int(np.round(40 * np.cos(np.pi / 2 * s / 18)))) for s in range(18)}
    assert set(counts.tolist()) <= allowed


def _table_logits(seed=0):
    """A fake network: position- and condition-dependent logits; records every call's batch."""
    table = jax.random.normal(jax.random.key(seed), (2, 48, V)) * 3.0
    calls = []

    def tokens_to_logits(ids, conditioned):
        calls.append((ids.shape, conditioned.shape))
        visible = jnp.sum(ids != V, axis=-1, keepdims=True)[..., None].astype(jnp.float32)
        return jnp.where(conditioned[:, None, None], table[0], table[1]) + 0.01 * visible

    return tokens_to_logits, calls, table


def test_one_batched_cond_and_null_forward_per_step_and_guidance():
    fn, calls, table = _table_logits()
    ids = sample(fn, rng=jax.random.key(1), batch_size=3, grid=(3, 4, 4), mask_id=V, steps=5, cond_scale=5.0,
                 temperature=0.0)
    assert ids.shape == (3, 3, 4, 4) and ids.dtype == jnp.int32 and int(ids.max()) < V
    # traced once inside the loop: 2B rows, the first B conditioned and the last B not
    assert calls == [((6, 48), (6,))]
    guided = table[1] + 5.0 * (table[0] - table[1])
    # temperature 0: every token is the argmax of the guided logits (the visible-count term is uniform)
    np.testing.assert_array_equal(np.asarray(ids).reshape(3, 48), np.broadcast_to(np.argmax(guided, -1), (3, 48)))
    calls.clear()
    sample(fn, rng=jax.random.key(1), batch_size=3, grid=(3, 4, 4), mask_id=V, steps=5, cond_scale=1.0)
    assert calls == [((3, 48), (3,))]  # no guidance: one conditioned forward of B rows


def _model():
    return MaskGIT(MaskGITConfig.tiny(num_tokens=V), rngs=nnx.Rngs(0))


def _prompts(b, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, 4, 16)).astype(np.float32)),
            jnp.asarray(np.arange(4)[None, :] < rng.integers(1, 5, (b, 1))))


def test_generate_ids_deterministic_per_seed_batched_and_compiled_once_per_shape(monkeypatch):
    traces = []
    forward = MaskGIT.__call__

    def counting(self, *args, **kwargs):  # runs only while tracing
        traces.append(args[0].shape)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MaskGIT, "__call__", counting)
    model = _model()
    ctx, mask = _prompts(2)
    opts = SampleConfig(steps=4)
    grid = (2, 4, 4)  # 3 slices
    a = generate_ids(model, ctx, mask, jax.random.key(7), grid=grid, options=opts)
    b = generate_ids(model, ctx, mask, jax.random.key(7), grid=grid, options=opts)
    c = generate_ids(model, ctx, mask, jax.random.key(8), grid=grid, options=opts)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert a.shape == (2, *grid) and int(a.max()) < V and int(a.min()) >= 0
    # the prompts are arguments, not constants: new text, same compiled program
    generate_ids(model, *_prompts(2, seed=1), jax.random.key(7), grid=grid, options=opts)
    assert traces == [(4, 32)]  # one trace (2 prompts x cond/null) for all four calls
    # a batch decodes each prompt as it would alone
    one = generate_ids(model, ctx[:1], mask[:1], jax.random.key(7), grid=grid, options=SampleConfig(steps=4,
                                                                                                    temperature=0.0))
    two = generate_ids(model, ctx, mask, jax.random.key(7), grid=grid, options=SampleConfig(steps=4, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(two[0]))
    # any 1 + 2k slices: 5 slices = 3 groups
    assert generate_ids(model, ctx, mask, jax.random.key(7), grid=(3, 4, 4), options=opts).shape == (2, 3, 4, 4)


def test_filters_and_options():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(np.asarray(filter_logits(logits, top_k=2))).sum() == 2
    assert np.isfinite(np.asarray(filter_logits(logits, top_p=0.7))).sum() == 2  # 0.5 + 0.3 >= 0.7
    assert np.isfinite(np.asarray(filter_logits(logits, top_p=0.4))).sum() == 1
    np.testing.assert_array_equal(np.asarray(filter_logits(logits)), np.asarray(logits))
    fn, _, _ = _table_logits()
    ids = sample(fn, rng=jax.random.key(3), batch_size=2, grid=(3, 4, 4), mask_id=V, steps=3, top_k=1,
                 schedule="linear")
    guided = np.asarray(_table_logits()[2])
    np.testing.assert_array_equal(np.asarray(ids).reshape(2, 48)[0], np.argmax(guided[1] + 5 * (guided[0] - guided[1]), -1))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SampleConfig(steps=0)
    with pytest.raises(ValueError, match="top_p"):
        SampleConfig(top_p=0.0)


@pytest.mark.parametrize("v,temperature,fn", [(12, 1.0, draw), (12, 0.5, draw), (7, 0.9, draw), (64, 2.0, draw),
                                              (12, 0.5, gumbel_draw)], ids=["cdf"] * 4 + ["gumbel"])
def test_draw_follows_the_tempered_softmax(v, temperature, fn):
    logits = jax.random.normal(jax.random.key(v), (v,)) * 2.0
    n = 200_000
    ids = np.asarray(fn(jax.random.key(3), jnp.broadcast_to(logits, (n, v)), jnp.float32(temperature)))
    p = np.asarray(jax.nn.softmax(logits / temperature))
    freq = np.bincount(ids, minlength=v) / n
    assert ids.min() >= 0 and ids.max() < v
    # each code's frequency within 5 standard errors of its probability (a wrong group or offset is far off)
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-4)


def test_draw_never_picks_filtered_codes_and_is_argmax_when_cold():
    logits = jnp.asarray([[-jnp.inf, 0.0, -jnp.inf, -jnp.inf, 0.3, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf]])
    ids = np.asarray(draw(jax.random.key(0), jnp.broadcast_to(logits, (5000, 9)), jnp.float32(1.0)))
    assert set(np.unique(ids).tolist()) == {1, 4}  # the only finite codes, in groups 0 and 1 of 3
    # near-zero temperature on large logits: exactly the argmax (no overflow of exp)
    big = jax.random.normal(jax.random.key(1), (64, 8192)) * 50.0
    np.testing.assert_array_equal(np.asarray(draw(jax.random.key(2), big, jnp.float32(1e-10))),
                                  np.asarray(jnp.argmax(big, axis=-1)))


def test_gumbel_draw_option_decodes_like_the_default_when_cold():
    fn, _, table = _table_logits()
    kw = dict(rng=jax.random.key(1), batch_size=2, grid=(3, 4, 4), mask_id=V, steps=4, cond_scale=5.0, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(sample(fn, draw="gumbel", **kw)), np.asarray(sample(fn, **kw)))
    warm = dict(kw, cond_scale=1.0, temperature=5.0)
    assert not np.array_equal(np.asarray(sample(fn, draw="gumbel", **warm)), np.asarray(sample(fn, **warm)))
    with pytest.raises(ValueError, match="unknown draw"):
        SampleConfig(draw="multinomial")
