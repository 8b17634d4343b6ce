"""CT-ViT losses: the single-backward generator loss equals plain autodiff; adaptive weight; GAN pieces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctgen.models.ctvit import CTViTConfig
from ctgen.models.ctvit_losses import (CTViTLossConfig, LossNetworksConfig, discriminator_loss, generator_loss,
                                       perceptual_loss, pick_slices)
from ctgen.stages.ctvit import CTViTTrainer

CFG = CTViTConfig.tiny(max_slices=9)
GEN = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("discr")))


def _gen(m, batch, rng, cfg=CTViTLossConfig(), **kw):
    return generator_loss(m.ctvit, m.vgg, m.discr, batch, rng, cfg, **kw)


def _dis(m, batch, rng, cfg=CTViTLossConfig(), **kw):
    return discriminator_loss(m.ctvit, m.discr, batch, rng, cfg, **kw)


def _model_and_batch():
    """The CT-ViT stage's model (autoencoder, VGG16, discriminator) and a batch."""
    model = CTViTTrainer(CFG, LossNetworksConfig.tiny(), rngs=nnx.Rngs(0))
    for conv in model.vgg.convs:  # a tiny random VGG's features vanish; keep them well above float noise
        conv.kernel[...] = conv.kernel[...] * 2.0
    vol = jax.random.uniform(jax.random.key(1), (2, 5, 32, 32), minval=-1, maxval=1)
    return model, {"volume": vol}


def _naive_generator_loss(model, batch, idx, weight):
    """The loss written plainly (autodiff through VGG and discriminator), with a given weight."""
    vol = batch["volume"]
    out = model.ctvit(vol, train=True)
    recon = out.recon_BxFxHxW
    real, fake = pick_slices(vol, idx), pick_slices(recon, idx)
    perc = perceptual_loss(model.vgg, real, fake, None)
    gan = -jnp.mean(model.discr(fake))
    return jnp.mean(jnp.square(vol - recon)) + out.commit_loss + perc + weight * gan


@pytest.mark.slow
@pytest.mark.parametrize("vgg_trainable", [True, False])
def test_generator_gradients_equal_plain_autodiff(vgg_trainable):
    model, batch = _model_and_batch()
    idx = jnp.array([3, 1], jnp.int32)
    cfg = CTViTLossConfig(vgg_dropout=False, vgg_trainable=vgg_trainable)
    graphdef, state = nnx.split(model)

    def ours(m):
        return _gen(m, batch, jax.random.key(0), cfg, slice_idx=idx)

    (loss, metrics), g1 = nnx.jit(nnx.value_and_grad(ours, argnums=nnx.DiffState(0, GEN), has_aux=True))(
        nnx.merge(graphdef, state, copy=True))
    w = metrics["adaptive_weight"]
    assert float(w) > 0
    naive = nnx.value_and_grad(lambda m, w: _naive_generator_loss(m, batch, idx, w), argnums=nnx.DiffState(0, GEN))
    loss2, g2 = nnx.jit(naive)(nnx.merge(graphdef, state, copy=True), w)
    assert float(loss) == pytest.approx(float(loss2), rel=1e-5)
    flat1, flat2 = nnx.to_flat_state(g1), dict(nnx.to_flat_state(g2))
    for path, v in flat1:
        expected = np.asarray(flat2[path][...])
        if not vgg_trainable and "vgg" in path:
            expected = np.zeros_like(expected)  # not computed when the VGG is frozen
        np.testing.assert_allclose(np.asarray(v[...]), expected, rtol=1e-4, atol=1e-7, err_msg=str(path))


@pytest.mark.slow
def test_adaptive_weight_is_ratio_of_head_gradient_norms():
    model, batch = _model_and_batch()
    idx = jnp.array([2, 4], jnp.int32)
    cfg = CTViTLossConfig(vgg_dropout=False)
    graphdef, state = nnx.split(model)  # before the loss moves the EMA codebook
    _, metrics = _gen(nnx.merge(graphdef, state, copy=True), batch, jax.random.key(0), cfg, slice_idx=idx)

    def head_grad(loss_of_fake):
        def f(kernel):
            m = nnx.merge(graphdef, state, copy=True)
            m.ctvit.rest_to_pixels.kernel[...] = kernel
            out = m.ctvit(batch["volume"], train=True)
            return loss_of_fake(m, pick_slices(batch["volume"], idx), pick_slices(out.recon_BxFxHxW, idx))
        return jnp.linalg.norm(jax.grad(f)(model.ctvit.rest_to_pixels.kernel[...]))

    g_perc = head_grad(lambda m, r, f: perceptual_loss(m.vgg, r, f, None))
    g_gan = head_grad(lambda m, r, f: -jnp.mean(m.discr(f)))
    assert float(metrics["adaptive_weight"]) == pytest.approx(float(g_perc / (g_gan + 1e-8)), rel=1e-3)


def test_slice_zero_gives_zero_adaptive_weight():
    """Slice 0 comes from the first-slice head, so the rest-slices head gets no gradient (GenerateCT)."""
    model, batch = _model_and_batch()
    _, metrics = _gen(model, batch, jax.random.key(0), CTViTLossConfig(vgg_dropout=False),
                      slice_idx=jnp.zeros(2, jnp.int32))
    assert float(metrics["adaptive_weight"]) == 0.0


def test_discriminator_loss_terms():
    model, batch = _model_and_batch()
    graphdef, state = nnx.split(model)  # the loss moves the EMA codebook: each use gets a copy
    loss, m = _dis(nnx.merge(graphdef, state, copy=True), batch, jax.random.key(0))
    hinge = float(jnp.mean(jax.nn.relu(1 + m["d_fake"]) + jax.nn.relu(1 - m["d_real"])))
    assert float(m["discr_hinge"]) == pytest.approx(hinge, rel=0.05)  # d_* are batch means
    assert float(m["grad_penalty"]) > 0

    # the same loss written independently from the discriminator's logits on a fixed slice
    idx = jnp.array([3, 0], jnp.int32)
    loss, m = _dis(nnx.merge(graphdef, state, copy=True), batch, jax.random.key(0), slice_idx=idx)
    ref = nnx.merge(graphdef, state, copy=True)
    vol = batch["volume"]
    real, fake = pick_slices(vol, idx), pick_slices(ref.ctvit(vol, train=True).recon_BxFxHxW, idx)
    d_real, d_fake = np.asarray(ref.discr(real)), np.asarray(ref.discr(fake))
    assert d_real.shape == d_fake.shape == (2,)
    hinge = np.mean(np.maximum(0, 1 + d_fake) + np.maximum(0, 1 - d_real))
    grads = np.stack([np.asarray(jax.grad(lambda x: ref.discr(x[None])[0])(real[i])) for i in range(2)])
    gp = 10.0 * np.mean(np.square(np.linalg.norm(grads.reshape(2, -1), axis=1) - 1.0))
    assert float(m["discr_hinge"]) == pytest.approx(hinge, rel=1e-5)
    assert float(m["grad_penalty"]) == pytest.approx(gp, rel=1e-4)
    assert float(loss) == pytest.approx(hinge + gp, rel=1e-5)


def test_recon_reference_for_adaptive_weight_without_perceptual():
    model, batch = _model_and_batch()
    idx = jnp.array([1, 2], jnp.int32)
    graphdef, state = nnx.split(model)  # the loss moves the EMA codebook: it gets a copy
    _, m = _gen(nnx.merge(graphdef, state, copy=True), batch, jax.random.key(3),
                CTViTLossConfig(perceptual=False, adaptive_weight_ref="recon"), slice_idx=idx)
    assert "perceptual_loss" not in m and float(m["adaptive_weight"]) > 0

    def head_grad_norm(loss_of_recon):  # plain autodiff w.r.t. the rest-slices head only
        def f(kernel):
            mod = nnx.merge(graphdef, state, copy=True)
            mod.ctvit.rest_to_pixels.kernel[...] = kernel
            return loss_of_recon(mod, mod.ctvit(batch["volume"], train=True).recon_BxFxHxW)
        return jnp.linalg.norm(jax.grad(f)(model.ctvit.rest_to_pixels.kernel[...]))

    g_recon = head_grad_norm(lambda mod, rec: jnp.mean(jnp.square(batch["volume"] - rec)))
    g_gan = head_grad_norm(lambda mod, rec: -jnp.mean(mod.discr(pick_slices(rec, idx))))
    assert float(m["adaptive_weight"]) == pytest.approx(float(g_recon / (g_gan + 1e-8)), rel=1e-3)


def test_soft_tissue_term_prices_only_soft_tissue_voxels():
    from ctgen.models.ctvit_losses import soft_tissue_mse

    target = jnp.array([-0.9, 0.01, 0.04, 0.5])  # lung, fluid (10 HU), blood (40 HU), bone
    # an error of 30 HU on each soft-tissue voxel and of 300 HU on the others
    recon = target + jnp.array([0.3, 0.03, -0.03, 0.3])
    np.testing.assert_allclose(float(soft_tissue_mse(target, recon, (-200.0, 200.0))), 0.03 ** 2, rtol=1e-5)
    np.testing.assert_allclose(float(soft_tissue_mse(target, target, (-200.0, 200.0))), 0.0)
    assert float(soft_tissue_mse(jnp.full(3, -0.9), jnp.zeros(3), (-200.0, 200.0))) == 0.0  # no soft tissue


def test_soft_tissue_weight_adds_its_term_to_the_generator_loss():
    from ctgen.models.ctvit_losses import soft_tissue_mse

    def fresh():  # a train-mode call moves the EMA codebook: each call gets the same untouched model
        return CTViTTrainer(CFG, None, rngs=nnx.Rngs(0))

    vol = jax.random.uniform(jax.random.key(1), (2, 5, 32, 32), minval=-0.3, maxval=0.3)
    base, m0 = _gen(fresh(), {"volume": vol}, jax.random.key(0), CTViTLossConfig(perceptual=False, gan=False))
    cfg = CTViTLossConfig(perceptual=False, gan=False, soft_tissue_weight=25.0, soft_tissue_hu=(-100, 100))
    loss, m1 = _gen(fresh(), {"volume": vol}, jax.random.key(0), cfg)
    recon = fresh().ctvit(vol, train=True).recon_BxFxHxW
    soft = soft_tissue_mse(vol, recon, (-100.0, 100.0))
    assert "soft_tissue_loss" not in m0 and float(soft) > 0
    np.testing.assert_allclose(float(m1["soft_tissue_loss"]), float(soft), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(base) + 25.0 * float(soft), rtol=1e-5)


@pytest.mark.parametrize("kw", [{"soft_tissue_weight": -1.0}, {"soft_tissue_weight": 1.0, "soft_tissue_hu": (50, -50)}])
def test_soft_tissue_settings_are_checked(kw):
    from ctgen.errors import UserError

    with pytest.raises(UserError, match="soft_tissue"):
        CTViTLossConfig(**kw)
