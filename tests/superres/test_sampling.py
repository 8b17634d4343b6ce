"""Diffusion maths and samplers (pure functions), and volume sampling batched over 8 emulated devices."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctgen.errors import UserError
from ctgen.models.unet import UNet, UNetConfig
from ctgen.parallel.mesh import make_mesh
from ctgen.sampling import diffusion as df
from ctgen.sampling.superres import SamplerConfig, nearest_upsample, upsample_volumes


def test_schedules_and_v_parameterisation():
    ts = [0.0, 0.25, 0.5, 0.9]  # (at t = 1 float32 cos(pi/2) is not 0: GenerateCT's float32 value is kept)
    s = 0.008
    want = [-math.log(max(math.cos((v + s) / (1 + s) * math.pi / 2) ** -2 - 1, 1e-5)) for v in ts]
    np.testing.assert_allclose(np.asarray(df.cosine_log_snr(jnp.asarray(ts))), want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(df.linear_log_snr(jnp.asarray(ts))),
                               [-math.log(math.expm1(1e-4 + 10 * v ** 2)) for v in ts], rtol=1e-4)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 1)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((3, 4, 4, 1)), jnp.float32)
    log_snr = jnp.asarray([-4.0, 0.0, 5.0])
    alpha, sigma = df.alpha_sigma(log_snr)
    np.testing.assert_allclose(np.asarray(alpha ** 2 + sigma ** 2), 1.0, rtol=1e-6)
    x_t = df.q_sample(x0, log_snr, noise)
    v = df.v_target(x0, noise, log_snr)
    np.testing.assert_allclose(np.asarray(df.x0_from_v(x_t, v, log_snr)), np.asarray(x0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(df.p2_weight(log_snr)), (1 + np.exp([-4.0, 0.0, 5.0])) ** -0.5, rtol=1e-6)


def test_dynamic_threshold_matches_quantile_definition():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32) * np.array([0.3, 3.0], np.float32)[:, None, None, None]
    out = np.asarray(df.dynamic_threshold(jnp.asarray(x), 0.95))
    for b in range(2):
        s = max(1.0, np.quantile(np.abs(x[b]).ravel(), 0.95))  # numpy's default is linear, like torch.quantile
        np.testing.assert_allclose(out[b], np.clip(x[b], -s, s) / s, rtol=1e-6)
    assert np.abs(out[0]).max() < 1  # the small sample is left as it is
    np.testing.assert_array_equal(out[0], x[0])


def _oracle(x0):
    """A perfect denoiser for a known x0: returns the exact v of x_t."""
    def denoise(x_t, log_snr):
        alpha, sigma = df.alpha_sigma(log_snr.reshape(-1, 1, 1, 1))
        eps = (x_t - alpha * x0) / sigma
        return alpha * eps - sigma * x0
    return denoise


def test_samplers_with_a_perfect_denoiser_return_the_data():
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 8, 8, 1)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    x_T, step_noise = df.per_sample_noise(keys, (8, 8, 1))
    ddim = df.sample_ddim(_oracle(x0), x_T, steps=3)  # its last step returns the predicted x0
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(x0), atol=1e-5)
    # the ancestral sampler ends on the posterior mean at t = 0, where the cosine schedule still
    # has sigma = sqrt(sigmoid(-8.77)) = 0.0125 (as in GenerateCT): close to x0, not equal
    ancestral = np.asarray(df.sample_ancestral(_oracle(x0), x_T, step_noise, steps=6))
    err = np.abs(ancestral - np.asarray(x0)).max()
    assert 1e-5 < err < 0.0125, err


def test_ancestral_sampler_is_deterministic_per_sample_key():
    """Each sample's noise comes from its own key: sampling a sample alone or in a batch is the same."""
    target = jnp.full((1, 4, 4, 1), 0.2)

    def denoise(x, log_snr):  # an imperfect network, so that the step noise matters
        alpha, sigma = df.alpha_sigma(log_snr.reshape(-1, 1, 1, 1))
        return 0.5 * (alpha * x - target) - sigma * target

    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    x_T, noise = df.per_sample_noise(keys, (4, 4, 1))
    batch = np.asarray(df.sample_ancestral(denoise, x_T, noise, steps=5))
    x1, noise1 = df.per_sample_noise(keys[1:2], (4, 4, 1))
    alone = np.asarray(df.sample_ancestral(denoise, x1, noise1, steps=5))
    np.testing.assert_allclose(batch[1:2], alone, atol=1e-6)
    assert not np.allclose(batch[0], batch[1])


def test_guidance_combines_the_two_predictions():
    cond = lambda x, s: x + 1.0  # noqa: E731
    null = lambda x, s: x * 0.0  # noqa: E731
    x = jnp.ones((1, 2, 2, 1))
    np.testing.assert_allclose(np.asarray(df.guided(cond, null, 3.0)(x, jnp.zeros(1))), 6.0)
    assert df.guided(cond, null, 1.0) is cond


def test_nearest_upsample_is_torch_nearest():
    x = jnp.arange(6.0).reshape(1, 2, 3, 1)
    out = np.asarray(nearest_upsample(x, (4, 6)))[0, ..., 0]
    np.testing.assert_array_equal(out, np.repeat(np.repeat(np.arange(6.0).reshape(2, 3), 2, 0), 2, 1))


def test_sampler_config_rejects_unknown_samplers():
    with pytest.raises(UserError, match="unknown sampler 'euler'"):
        SamplerConfig(sampler="euler")


@pytest.fixture(scope="module")
def tiny_model():
    model = UNet(UNetConfig.tiny(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    final = model.final_conv  # a non-zero final convolution, so the output depends on the network
    final.kernel[...] = jnp.asarray(0.1 * rng.standard_normal(final.kernel.shape), jnp.float32)
    return model


def test_volume_sampling_batched_over_8_devices_equals_slice_by_slice(tiny_model):
    rng = np.random.default_rng(4)
    vols = [rng.uniform(0, 1, (5, 8, 8)).astype(np.float32), rng.uniform(0, 1, (3, 8, 8)).astype(np.float32)]
    texts = [rng.standard_normal((6, 64)).astype(np.float32) for _ in vols]
    masks = [np.array([1, 1, 1, 0, 0, 0], bool), np.ones(6, bool)]
    sampler = SamplerConfig(sampler="ancestral", steps=2)
    mesh = make_mesh({"data": 8, "fsdp": 1})
    batched = upsample_volumes(tiny_model, vols, texts, masks, mesh=mesh, rng=11, sampler=sampler, batch=8,
                               progress=False)
    assert [b.shape for b in batched] == [(5, 32, 32), (3, 32, 32)]
    alone = upsample_volumes(tiny_model, [vols[0][:1], vols[1]], texts, masks, rng=11, sampler=sampler, batch=1,
                             progress=False)  # one slice per call, no mesh
    np.testing.assert_allclose(alone[1], batched[1], atol=1e-5)
    np.testing.assert_allclose(alone[0][0], batched[0][0], atol=1e-5)
    assert 0 <= batched[0].min() and batched[0].max() <= 1
    # CT-ViT-range input, HU output: the same slices through the shared value-range conversions
    hu = upsample_volumes(tiny_model, [v * 2 - 1 for v in vols], texts, masks, rng=11, sampler=sampler, batch=8,
                          mesh=mesh, input_range="model", output_range="hu", progress=False)
    from ctgen.volume import sr_to_hu

    np.testing.assert_allclose(hu[1], sr_to_hu(batched[1]), atol=0.05)
    with pytest.raises(UserError, match="multiple of the 8 batch shards"):
        upsample_volumes(tiny_model, vols, texts, masks, mesh=mesh, batch=4, sampler=sampler, progress=False)


def test_memory_bounded_batch_follows_free_memory(tiny_model, monkeypatch):
    """batch=0: the batch is as many slices as fit the free memory, measured from the compiled loop
    at one slice per device (the same executable then runs: compiled once per shape)."""
    from ctgen.sampling import superres as sr

    mesh = make_mesh({"data": 8, "fsdp": 1})
    sampler = sr.SliceSampler(tiny_model, SamplerConfig(sampler="ddim", steps=2), (32, 32), mesh, None)
    per_device = sampler.bytes_per_batch(8, (8, 8), (6, 64))
    assert per_device and per_device > 0
    compiled_once = sampler.compile_seconds
    for slices_per_device, total, expected in ((3, 40, 24), (1, 40, 8), (0.2, 40, 8), (100, 20, 24)):
        monkeypatch.setattr(sr, "_available_bytes", lambda: int(per_device * slices_per_device / 0.6) + 1)
        assert sr.choose_batch(sampler, total, (8, 8), (6, 64)) == expected, slices_per_device
    assert sampler.compile_seconds == compiled_once  # measured once per shape, not per call


def test_a_residual_unet_adds_its_sample_to_bicubic_upsampling():
    """The same network and keys: the residual sampler's output is clip(bicubic + x0) where the plain
    sampler's is (x0 + 1) / 2 of the very same x0."""
    from ctgen.sampling.superres import bicubic_upsample, sample_slices

    cfg = UNetConfig.tiny()
    model = UNet(cfg, rngs=nnx.Rngs(0))
    residual = UNet(dataclasses.replace(cfg, residual=True), rngs=nnx.Rngs(0))
    nnx.update(residual, nnx.state(model))
    rng = np.random.default_rng(4)
    lowres = jnp.asarray(rng.uniform(size=(2, 8, 8)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, 4, cfg.text_embed_dim)), jnp.float32)
    mask = jnp.ones((2, 4), bool)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    sampler = SamplerConfig(steps=2, threshold=0.0)
    plain = np.asarray(sample_slices(model, lowres, text, mask, keys, (32, 32), sampler))
    res = np.asarray(sample_slices(residual, lowres, text, mask, keys, (32, 32), sampler))
    base = np.asarray(bicubic_upsample(lowres, (32, 32)))
    np.testing.assert_allclose(res, np.clip(base + (plain * 2 - 1), 0, 1), atol=1e-5)
    assert np.abs(res - plain).max() > 0.05  # the flag changes the output


def test_averaged_sampling_is_the_mean_of_independent_samples(tiny_model):
    """average=K: slice b is the mean of K ordinary samples drawn with keys fold_in(key_b, k)."""
    from ctgen.sampling.superres import sample_slices

    rng = np.random.default_rng(5)
    lowres = jnp.asarray(rng.uniform(size=(2, 8, 8)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    mask = jnp.ones((2, 4), bool)
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    one = SamplerConfig(steps=2, threshold=0.0)
    avg = np.asarray(sample_slices(tiny_model, lowres, text, mask, keys, (32, 32), dataclasses.replace(one, average=3)))
    draws = [np.asarray(sample_slices(tiny_model, lowres, text, mask, jax.vmap(lambda k: jax.random.fold_in(k, i))(keys),
                                      (32, 32), one)) for i in range(3)]
    np.testing.assert_allclose(avg, np.mean(draws, axis=0), atol=1e-5)
    assert np.abs(draws[0] - draws[1]).max() > 0.01  # the draws differ, so the mean is not one of them
    assert avg.std() < np.mean([d.std() for d in draws])  # averaging flattens
    with pytest.raises(UserError, match="average"):
        SamplerConfig(average=0)
