"""Building blocks: depthwise PEG convolution, attention, position bias, VGG pooling, discriminator."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctgen.models.attention import Attention, ContinuousPositionBias, Transformer, relative_positions
from ctgen.models.discriminator import Discriminator, DiscriminatorConfig, space_to_depth_2x2
from ctgen.models.layers import GEGLUFeedForward, depthwise_conv3d, layer_norm
from ctgen.models.vgg import VGG16, VGGConfig, adaptive_avg_pool_matrix, max_pool_2x2


@pytest.mark.parametrize("causal", [True, False])
def test_depthwise_conv3d_matches_grouped_convolution(causal):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (2, 4, 5, 3, 6))
    w = jax.random.normal(k2, (3, 3, 3, 6))
    b = jax.random.normal(k3, (6,))
    ours = depthwise_conv3d(x, w, b, causal)
    pad_t = (2, 0) if causal else (1, 1)
    ref = jax.lax.conv_general_dilated(x, w[:, :, :, None, :], (1, 1, 1), (pad_t, (1, 1), (1, 1)),
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=6)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref + b.reshape(1, 1, 1, 1, 6)), atol=1e-5)


def test_causal_conv_does_not_see_the_future():
    x = jax.random.normal(jax.random.key(1), (1, 5, 3, 3, 2))
    w = jnp.ones((3, 3, 3, 2))
    a = depthwise_conv3d(x, w, jnp.zeros(2), True)
    b = depthwise_conv3d(x.at[:, 3:].set(7.0), w, jnp.zeros(2), True)
    np.testing.assert_allclose(np.asarray(a[:, :3]), np.asarray(b[:, :3]))
    assert not np.allclose(np.asarray(a[:, 3:]), np.asarray(b[:, 3:]))


def test_layer_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(3, 7)).astype(np.float32)
    g, b = np.linspace(0.5, 1.5, 7).astype(np.float32), np.linspace(-1, 1, 7).astype(np.float32)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b
    np.testing.assert_allclose(np.asarray(layer_norm(jnp.asarray(x), jnp.asarray(g), jnp.asarray(b))), ref, atol=1e-5)


def test_geglu_inner_width():
    ff = GEGLUFeedForward(512, rngs=nnx.Rngs(0))
    assert ff.w_in.kernel.shape == (512, 2730) and ff.w_out.kernel.shape == (1365, 512)


def _attention_numpy(attn: Attention, x: np.ndarray, bias: np.ndarray | None,
                     context: np.ndarray | None = None) -> np.ndarray:
    """Straightforward numpy rendering of GenerateCT's attention: k/v from the raw input
    (self-attention) or from the normalised context (cross-attention, no null key/values)."""
    h, dh = attn.heads, attn.dim_head

    def ln(v, g):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5) * g

    def l2(v):
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    q = ln(x, np.asarray(attn.norm.scale[...])) @ np.asarray(attn.to_q.kernel[...])
    kv_input = x if context is None else ln(context, np.asarray(attn.context_norm.scale[...]))
    kv = kv_input @ np.asarray(attn.to_kv.kernel[...])
    k, v = kv[..., : h * dh], kv[..., h * dh:]
    split = lambda t: t.reshape(*t.shape[:-1], h, dh).swapaxes(-2, -3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    q = l2(q) * np.asarray(attn.q_scale[...])
    k = l2(k) * np.asarray(attn.k_scale[...])
    s = q @ k.swapaxes(-1, -2) * 8.0
    if bias is not None:
        s = s + bias
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).swapaxes(-2, -3).reshape(*x.shape[:-1], h * dh)
    return o @ np.asarray(attn.to_out.kernel[...])


def test_self_attention_matches_numpy_rendering():
    attn = Attention(16, heads=2, dim_head=4, rngs=nnx.Rngs(0))
    attn.q_scale[...] = jnp.linspace(0.5, 2.0, 4)
    attn.k_scale[...] = jnp.linspace(2.0, 0.5, 4)
    attn.norm.scale[...] = jnp.linspace(0.8, 1.2, 16)
    x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
    bias = np.random.default_rng(1).normal(size=(2, 5, 5)).astype(np.float32)
    ours = attn(jnp.asarray(x), bias_HxNxM=jnp.asarray(bias))
    np.testing.assert_allclose(np.asarray(ours), _attention_numpy(attn, x, bias), atol=1e-5)


def test_cross_attention_to_a_context_of_the_model_width():
    """Cross-attention is explicit: a context as wide as the model and no null key/values (a
    combination that used to crash: the layer inferred self-attention and had no context norm)."""
    attn = Attention(16, heads=2, dim_head=4, cross=True, rngs=nnx.Rngs(0))
    attn.context_norm.scale[...] = jnp.linspace(0.5, 1.5, 16)
    attn.k_scale[...] = jnp.linspace(2.0, 0.5, 4)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 16)).astype(np.float32)
    ctx = rng.normal(size=(3, 7, 16)).astype(np.float32)
    ours = attn(jnp.asarray(x), context=jnp.asarray(ctx))
    np.testing.assert_allclose(np.asarray(ours), _attention_numpy(attn, x, None, ctx), atol=1e-5)
    with pytest.raises(ValueError, match="needs a context"):
        attn(jnp.asarray(x))
    with pytest.raises(ValueError, match="takes no context"):
        Attention(16, heads=2, dim_head=4, rngs=nnx.Rngs(0))(jnp.asarray(x), context=jnp.asarray(ctx))
    with pytest.raises(ValueError, match="cross=True"):
        Attention(16, dim_context=8, rngs=nnx.Rngs(0))
    tr = Transformer(16, depth=1, heads=2, dim_head=4, dim_context=16, cross_num_null_kv=0, rngs=nnx.Rngs(1))
    assert tr(jnp.asarray(x), (3, 1, 5, 1), context=jnp.asarray(ctx)).shape == x.shape


def test_cross_attention_with_null_kv_and_mask():
    attn = Attention(8, heads=2, dim_head=4, cross=True, dim_context=6, num_null_kv=2, rngs=nnx.Rngs(0))
    assert attn.null_kv.shape == (2, 4, 4)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 6))
    mask = jnp.array([[True, True, False, False, False], [True] * 5])
    out = attn(x, context=ctx, mask_BxM=mask)
    # masked context positions have no influence
    ctx2 = ctx.at[0, 2:].set(100.0)
    out2 = attn(x, context=ctx2, mask_BxM=mask)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(out2[0]), atol=1e-5)
    # everything masked: only the null key/values remain, output still finite
    out3 = attn(x, context=ctx, mask_BxM=jnp.zeros((2, 5), bool))
    assert np.isfinite(np.asarray(out3)).all()


def test_relative_positions_and_bias_shape():
    rel = relative_positions((2, 3))
    assert rel.shape == (6, 6, 2)
    # position 0 = (0,0), position 5 = (1,2): d = (-1,-2) -> sign*log(1+|d|)
    np.testing.assert_allclose(rel[0, 5], [-np.log(2), -np.log(3)], rtol=1e-6)
    cpb = ContinuousPositionBias(16, 4, rngs=nnx.Rngs(0))
    assert cpb((8, 8)).shape == (4, 64, 64)


def test_adaptive_avg_pool_bins_match_torch_rule():
    m = adaptive_avg_pool_matrix(4, 7)  # torch: [0,1) [0,2) [1,2) [1,3) [2,3) [2,4) [3,4)
    expected_bins = [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4)]
    for row, (s, e) in zip(m, expected_bins):
        np.testing.assert_allclose(row[s:e], 1.0 / (e - s))
        assert row.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(adaptive_avg_pool_matrix(14, 7), np.kron(np.eye(7), [[0.5, 0.5]]))


def test_max_pool_and_space_to_depth():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    assert max_pool_2x2(x).shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(x))[0, 0, 0], np.asarray(x[0, 1, 1]))
    s = np.asarray(space_to_depth_2x2(x))
    # channel order (c, p1, p2): channel c*4 + p1*2 + p2 holds x[h*2+p1, w*2+p2, c]
    np.testing.assert_array_equal(s[0, 1, 0, 2 * 4 + 1 * 2 + 0], np.asarray(x)[0, 3, 0, 2])


def test_vgg16_paper_layout_and_small_forward():
    abstract = nnx.eval_shape(lambda: VGG16(VGGConfig(), rngs=nnx.Rngs(0)))
    assert len(abstract.convs) == 13 and abstract.fc6.kernel.shape == (25088, 4096)
    vgg = VGG16(VGGConfig(widths=(2, 4, 4, 8, 8), fc_dim=16), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    out = vgg(x)
    assert out.shape == (2, 16) and float(out.min()) >= 0.0  # ReLU(fc7)
    # train-mode dropout changes features, deterministically per key
    d1, d2 = vgg(x, jax.random.key(1)), vgg(x, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    assert not np.allclose(np.asarray(d1), np.asarray(out))
    assert not np.allclose(np.asarray(d1), np.asarray(vgg(x, jax.random.key(2))))


def test_discriminator_layout():
    cfg = DiscriminatorConfig()
    assert cfg.layer_dims == (1, 64, 128, 256, 512, 512, 512)
    assert cfg.attn_block_indices == (3,)
    small = Discriminator(DiscriminatorConfig(base_dim=2, image_size=32, attn_heads=2, attn_dim_head=4, max_dim=16),
                          rngs=nnx.Rngs(0))
    out = small(jax.random.normal(jax.random.key(0), (3, 32, 32, 1)))
    assert out.shape == (3,)
