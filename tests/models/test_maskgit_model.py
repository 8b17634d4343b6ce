"""MaskGIT model and the attention entry point: blocked/fused attention equal dense attention, the
position bias per distinct offset equals GenerateCT's N^2 form, and the bias is computed outside
the decoding loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

from ctgen.models.attention import ContinuousPositionBias, relative_positions
from ctgen.models.attention_core import RelativeBias, attend, choose
from ctgen.models.maskgit import MaskGIT, MaskGITConfig

GRID = (3, 4, 4)


def _qkv(b, n, h, d, prefix, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, prefix + n, h, d)), jnp.float32) for _ in range(2))
    return q, k, v


def test_position_bias_per_offset_equals_the_naive_n2_form():
    cpb = ContinuousPositionBias(16, 4, num_dims=3, rngs=nnx.Rngs(0))
    grid = (5, 3, 4)
    table = cpb.offset_table(grid)
    assert table.shape == (4, 9, 5, 7)  # the distinct offsets: (2T-1)(2h-1)(2w-1)
    naive = jnp.transpose(cpb.mlp(jnp.asarray(relative_positions(grid))), (2, 0, 1))  # GenerateCT: MLP on N x N x 3
    rb = cpb.relative_bias(grid)
    assert rb.by_frame_offset.shape == (4, 9, 12, 12) and rb.num_tokens == 60
    np.testing.assert_allclose(np.asarray(rb.dense()), np.asarray(naive), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cpb(grid)), np.asarray(naive), atol=1e-6)
    # the CT-ViT's 2-D bias comes from the same code
    cpb2 = ContinuousPositionBias(16, 4, rngs=nnx.Rngs(1))
    naive2 = jnp.transpose(cpb2.mlp(jnp.asarray(relative_positions((8, 8)))), (2, 0, 1))
    np.testing.assert_allclose(np.asarray(cpb2((8, 8))), np.asarray(naive2), atol=1e-6)


@pytest.mark.parametrize("prefix,with_mask", [(0, False), (2, True)])
def test_blocked_and_fused_attention_equal_dense_attention(prefix, with_mask):
    t, f, h, d, b = 5, 6, 2, 4, 2
    n = t * f
    q, k, v = _qkv(b, n, h, d, prefix)
    table = jnp.asarray(np.random.default_rng(1).normal(size=(h, 2 * t - 1, 5, 3)), jnp.float32)
    rel = RelativeBias.from_offset_table(table)  # a (5, 3, 2) grid: 6 tokens per frame
    mask = jnp.asarray(np.random.default_rng(2).uniform(size=(b, n)) > 0.3) if with_mask else None
    for bias in (None, rel, rel.dense()):
        dense = attend(q, k, v, scale=8.0, bias=bias, mask_BxM=mask, num_prefix=prefix, impl="dense")
        # block sizes: whole frames that do not divide T (padding), one frame, everything at once
        for impl, block in (("blocked", 12), ("blocked", 5), ("blocked", 1024), ("fused", 0)):
            out = attend(q, k, v, scale=8.0, bias=bias, mask_BxM=mask, num_prefix=prefix, impl=impl, block_size=block)
            np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5, err_msg=f"{impl} {block}")


def test_blocked_attention_gradients_equal_dense_ones():
    t, f, h, d = 4, 4, 2, 8
    q, k, v = _qkv(2, t * f, h, d, 0, seed=3)
    table = jnp.asarray(np.random.default_rng(4).normal(size=(h, 2 * t - 1, 3, 3)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(5).normal(size=(2, t * f, h, d)), jnp.float32)

    def loss(impl, q, k, v, table):
        out = attend(q, k, v, scale=8.0, bias=RelativeBias.from_offset_table(table), impl=impl, block_size=8)
        return jnp.sum(out * w)

    dense = jax.grad(lambda *a: loss("dense", *a), argnums=(0, 1, 2, 3))(q, k, v, table)
    blocked = jax.grad(lambda *a: loss("blocked", *a), argnums=(0, 1, 2, 3))(q, k, v, table)
    for g1, g2 in zip(dense, blocked):
        np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), atol=2e-5)


def test_auto_picks_dense_for_short_and_blocked_for_long_sequences_on_cpu():
    assert choose("auto", 64, 64) == "dense"  # CT-ViT slices keep GenerateCT's arithmetic
    assert choose("auto", 6464, 6464) == "blocked"
    with pytest.raises(ValueError, match="attention implementation"):
        MaskGITConfig.tiny(attention="flash")


def _inputs(cfg, b=2, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(GRID))
    ids = rng.integers(0, cfg.num_tokens + 1, (b, n))
    ctx = rng.normal(size=(b, 5, cfg.dim_context)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0]] + [[1] * 5] * (b - 1), bool)
    return jnp.asarray(ids), jnp.asarray(ctx), jnp.asarray(mask)


def test_maskgit_forward_blocked_equals_dense_and_masked_text_has_no_influence():
    dense = MaskGIT(MaskGITConfig.tiny(attention="dense"), rngs=nnx.Rngs(0))
    blocked = MaskGIT(MaskGITConfig.tiny(attention="blocked", attention_block=16), rngs=nnx.Rngs(0))
    ids, ctx, mask = _inputs(dense.cfg)
    out = dense(ids, GRID, ctx, mask)
    assert out.shape == (2, 48, 64) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(blocked(ids.reshape(2, *GRID), GRID, ctx, mask)), np.asarray(out), atol=1e-5)
    changed = dense(ids, GRID, ctx.at[0, 3:].set(50.0), mask)  # padding positions of row 0
    np.testing.assert_allclose(np.asarray(changed), np.asarray(out), atol=1e-5)
    null = dense(ids, GRID, ctx, jnp.zeros_like(mask))  # the null prompt: text has no influence at all
    np.testing.assert_allclose(np.asarray(dense(ids, GRID, ctx * 3.0, jnp.zeros_like(mask))), np.asarray(null),
                               atol=1e-5)
    assert not np.allclose(np.asarray(null), np.asarray(out), atol=1e-3)


def test_grid_and_spacing_checks():
    cfg = MaskGITConfig.tiny(max_seq_len=40)
    model = MaskGIT(cfg, rngs=nnx.Rngs(0))
    ids, ctx, mask = _inputs(cfg)
    with pytest.raises(ValueError, match="max_seq_len=40"):
        model(ids, GRID, ctx, mask)
    spaced = MaskGIT(MaskGITConfig.tiny(spacing_tokens=2), rngs=nnx.Rngs(0))
    ids, ctx, mask = _inputs(spaced.cfg)
    with pytest.raises(ValueError, match="pass spacing_Bx3"):
        spaced(ids, GRID, ctx, mask)
    thin = spaced(ids, GRID, ctx, mask, spacing_Bx3=jnp.array([[1.0, 0.7, 0.7]] * 2))
    thick = spaced(ids, GRID, ctx, mask, spacing_Bx3=jnp.array([[5.0, 0.7, 0.7]] * 2))
    assert not np.allclose(np.asarray(thin), np.asarray(thick))  # the spacing reaches the logits...
    null = spaced(ids, GRID, ctx, jnp.zeros_like(mask), spacing_Bx3=jnp.array([[5.0, 0.7, 0.7]] * 2))
    assert not np.allclose(np.asarray(null), np.asarray(thick))  # ...and the null prompt drops only the text


def test_position_bias_mlp_runs_outside_the_decoding_loop():
    """The sampler's callback computes the bias once; the decoding loop only reads it."""
    from ctgen.sampling.maskgit import maskgit_tokens_to_logits, sample

    model = MaskGIT(MaskGITConfig.tiny(), rngs=nnx.Rngs(0))
    _, ctx, mask = _inputs(model.cfg)

    def run(ctx, mask):
        fn = maskgit_tokens_to_logits(model, GRID, ctx, mask)
        return sample(fn, rng=jax.random.key(0), batch_size=2, grid=GRID, mask_id=model.cfg.mask_id, steps=3)

    def mlp_dots(jaxpr):  # dot products with the bias MLP's (3, dim_head) first-layer kernel
        count = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and any(getattr(v.aval, "shape", ())[:1] == (3,) and
                                                            len(v.aval.shape) == 2 for v in eqn.invars):
                count += 1
            for sub in jex_core.jaxprs_in_params(eqn.params):
                count += mlp_dots(sub)
        return count

    def loop_bodies(jaxpr):
        return [sub for eqn in jaxpr.eqns if eqn.primitive.name == "while"
                for sub in jex_core.jaxprs_in_params(eqn.params)]

    closed = jax.make_jaxpr(run)(ctx, mask)
    assert mlp_dots(closed.jaxpr) == 1
    assert sum(mlp_dots(body) for body in loop_bodies(closed.jaxpr)) == 0


def test_gradients_are_finite_with_zero_padded_text_states():
    """T5 caches pad with zero vectors; their keys normalise to zero and must not turn the gradient
    into NaN (d||x|| at x = 0), masked or not (the null prompt masks every text key)."""
    model = MaskGIT(MaskGITConfig.tiny(), rngs=nnx.Rngs(0))
    ids, ctx, mask = _inputs(model.cfg)
    ctx = ctx * mask[..., None]

    def loss(m, text_mask):
        return jnp.mean(m(ids, GRID, ctx, text_mask) ** 2)

    for text_mask in (mask, jnp.zeros_like(mask)):
        grads = nnx.grad(loss)(model, text_mask)
        assert all(np.isfinite(np.asarray(v[...])).all() for _, v in nnx.to_flat_state(grads))


def test_blocks_are_balanced_to_pad_little():
    from ctgen.models.attention_core import _balanced

    assert _balanced(9, 8) == 5  # the demo MaskGIT's 9 frames: 2 blocks of 5 (10 frames), not 2 of 8 (16)
    assert _balanced(101, 8) == 8  # 201 slices: 13 blocks of 8 frames
    assert _balanced(576, 512) == 288 and _balanced(512, 512) == 512 and _balanced(3, 8) == 3
