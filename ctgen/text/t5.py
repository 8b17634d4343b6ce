"""T5 v1.1 encoder in Flax NNX, with T5X parameter names and logical axis names.

Parameter tree (identical to T5X's `target/...` minus the prefix):

    token_embedder/embedding                     (vocab, embed)
    encoder/relpos_bias/rel_embedding            (heads, pos)      shared by all layers
    encoder/layers_N/pre_attention_layer_norm/scale          (norm,)
    encoder/layers_N/attention/{query,key,value}/kernel      (embed, joined_kv)
    encoder/layers_N/attention/out/kernel                    (joined_kv, embed)
    encoder/layers_N/pre_mlp_layer_norm/scale                (norm,)
    encoder/layers_N/mlp/{wi_0,wi_1}/kernel                  (embed, mlp)
    encoder/layers_N/mlp/wo/kernel                           (mlp, embed)
    encoder/encoder_norm/scale                               (norm,)

Numerics follow T5 v1.1 as run by `transformers` (GenerateCT's reference): no embedding scale, no
biases, no 1/sqrt(d) in attention (folded into the query initialisation), RMS norms computed in
float32, tanh-approximated GELU, bidirectional bucketed relative position bias. The encoder is
inference-only (GenerateCT keeps T5 frozen), so there is no dropout.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctgen.parallel.axes import constrain, with_axes
from ctgen.text.config import T5Config


def _bcast(v: jax.Array, ndim: int) -> jax.Array:
    """A 1-D vector reshaped to broadcast along the last axis of an `ndim` array (rank-promotion safe)."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


@functools.lru_cache(maxsize=64)
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of (key - query) for every pair, int32 `[q_len, k_len]`.

    Half the buckets are for keys after the query. Within a half, distances below
    `num_buckets/4` get their own bucket, larger ones share log-spaced buckets up to
    `max_distance`. The log is taken in float32 as `transformers` and Mesh TensorFlow do, so
    bucket boundaries match the published checkpoints exactly.
    """
    rel_QxK = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    out = (rel_QxK > 0).astype(np.int64) * half
    n = np.abs(rel_QxK)
    max_exact = half // 2
    # The log is only used where n >= max_exact; elsewhere n itself is the bucket.
    n_large = np.maximum(n, max_exact).astype(np.float32)
    log_ratio = np.log(n_large / np.float32(max_exact))
    large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    out = out + np.where(n < max_exact, n, large)
    out = out.astype(np.int32)
    out.setflags(write=False)
    return out


class Dense(nnx.Module):
    """Bias-free projection `x @ kernel` in the compute dtype."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], init, cfg: T5Config, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(with_axes(init, *names)(rngs.params(), (d_in, d_out), jnp.dtype(cfg.param_dtype)))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(self.dtype)
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), k)


class RMSNorm(nnx.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.ones
        self.scale = nnx.Param(with_axes(init, "norm")(rngs.params(), (cfg.d_model,), jnp.dtype(cfg.param_dtype)))
        self.eps = cfg.layer_norm_epsilon
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (_bcast(self.scale[...].astype(jnp.float32), y.ndim) * y).astype(self.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        fan_in = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

        def query_init(key, shape, dtype):  # T5: 1/sqrt(d_kv) lives in the query init
            return fan_in(key, shape, dtype) / np.sqrt(cfg.d_kv).astype(dtype)

        self.query = Dense(cfg.d_model, cfg.inner_dim, ("embed", "joined_kv"), query_init, cfg, rngs=rngs)
        self.key = Dense(cfg.d_model, cfg.inner_dim, ("embed", "joined_kv"), fan_in, cfg, rngs=rngs)
        self.value = Dense(cfg.d_model, cfg.inner_dim, ("embed", "joined_kv"), fan_in, cfg, rngs=rngs)
        self.out = Dense(cfg.inner_dim, cfg.d_model, ("joined_kv", "embed"), fan_in, cfg, rngs=rngs)
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv

    def __call__(self, x_BxLxD: jax.Array, bias_BxHxLxL: jax.Array) -> jax.Array:
        b, l, _ = x_BxLxD.shape
        split = lambda t: t.reshape(b, l, self.num_heads, self.d_kv)  # noqa: E731
        heads = ("batch", "length", "heads", "kv")
        q_BxLxHxK = constrain(split(self.query(x_BxLxD)), heads)
        k_BxLxHxK = constrain(split(self.key(x_BxLxD)), heads)
        v_BxLxHxK = constrain(split(self.value(x_BxLxD)), heads)
        logits_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK,
                                    preferred_element_type=jnp.float32)
        probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL + bias_BxHxLxL, axis=-1).astype(v_BxLxHxK.dtype)
        o_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxK)
        return self.out(o_BxLxHxK.reshape(b, l, self.num_heads * self.d_kv))


class GatedMLP(nnx.Module):
    """T5 v1.1 feed-forward: `wo(gelu_tanh(wi_0 x) * wi_1 x)`."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.wi_0 = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), init, cfg, rngs=rngs)
        self.wi_1 = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), init, cfg, rngs=rngs)
        self.wo = Dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), init, cfg, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = jax.nn.gelu(self.wi_0(x_BxLxD), approximate=True) * self.wi_1(x_BxLxD)
        return self.wo(constrain(h_BxLxF, ("batch", "length", "mlp")))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.pre_attention_layer_norm = RMSNorm(cfg, rngs=rngs)
        self.attention = SelfAttention(cfg, rngs=rngs)
        self.pre_mlp_layer_norm = RMSNorm(cfg, rngs=rngs)
        self.mlp = GatedMLP(cfg, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array, bias_BxHxLxL: jax.Array) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attention(self.pre_attention_layer_norm(x_BxLxD), bias_BxHxLxL)
        return x_BxLxD + self.mlp(self.pre_mlp_layer_norm(x_BxLxD))


class RelativePositionBias(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        shape = (cfg.num_heads, cfg.relative_attention_num_buckets)
        value = with_axes(init, "heads", "pos")(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
        self.rel_embedding = nnx.Param(value)
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance

    def __call__(self, q_len: int, k_len: int) -> jax.Array:
        """Bias `[1, heads, q_len, k_len]` in float32."""
        buckets_QxK = relative_position_buckets(q_len, k_len, self.num_buckets, self.max_distance)
        bias_HxQxK = jnp.take(self.rel_embedding[...].astype(jnp.float32), jnp.asarray(buckets_QxK), axis=1)
        return bias_HxQxK[None]


class Embedder(nnx.Module):
    def __init__(self, cfg: T5Config, init, *, rngs: nnx.Rngs):
        shape = (cfg.vocab_size, cfg.d_model)
        self.embedding = nnx.Param(with_axes(init, "vocab", "embed")(rngs.params(), shape, jnp.dtype(cfg.param_dtype)))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, ids_BxL: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids_BxL, axis=0).astype(self.dtype)


class Encoder(nnx.Module):
    """The transformer stack: shared relative position bias, `layers_N`, final norm."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.relpos_bias = RelativePositionBias(cfg, rngs=rngs)
        for i in range(cfg.num_layers):  # attribute names match T5X's `layers_N`
            setattr(self, f"layers_{i}", EncoderLayer(cfg, rngs=rngs))
        self.encoder_norm = RMSNorm(cfg, rngs=rngs)
        self.num_layers = cfg.num_layers

    def __call__(self, x_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        _, l, _ = x_BxLxD.shape
        # Padded keys get float32's most negative value, as transformers does (not -inf: no NaNs).
        mask_bias_Bx1x1xL = jnp.where(mask_BxL, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        bias_BxHxLxL = self.relpos_bias(l, l) + mask_bias_Bx1x1xL
        for i in range(self.num_layers):
            x_BxLxD = constrain(getattr(self, f"layers_{i}")(x_BxLxD, bias_BxHxLxL), ("batch", "length", "embed"))
        return self.encoder_norm(x_BxLxD)


class T5Encoder(nnx.Module):
    """T5 v1.1 encoder: token ids `[B, L]` + mask -> last hidden state `[B, L, d_model]` float32.

    The output is the raw last hidden state (padded positions are *not* zeroed here; see
    `ctgen.text.encode.encode_text` for GenerateCT's zero-padded convention).
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        init = jax.nn.initializers.normal(stddev=1.0)
        self.token_embedder = Embedder(cfg, init, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)

    def __call__(self, ids_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        if ids_BxL.ndim != 2 or mask_BxL.shape != ids_BxL.shape:
            raise ValueError(f"ids and mask must both be [batch, length]; got {ids_BxL.shape} and {mask_BxL.shape}")
        x_BxLxD = constrain(self.token_embedder(ids_BxL), ("batch", "length", "embed"))
        x_BxLxD = self.encoder(x_BxLxD, mask_BxL.astype(bool))
        return x_BxLxD.astype(jnp.float32)


def abstract_encoder(cfg: T5Config) -> T5Encoder:
    """The encoder with shapes only (no memory, no random init), for loading weights into."""
    return nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
