"""Cosine-similarity vector quantiser with an EMA codebook (vector-quantize-pytorch 1.1.2 semantics).

GenerateCT uses `VectorQuantize(dim, codebook_size, use_cosine_sim=True)` with every other option at
its default: one codebook, no projections, EMA decay 0.8, no k-means init (`initted` = 1), no
dead-code expiry, commitment weight 1, argmax assignment. Forward, always in float32:

  ids   = argmax_k <l2(x), l2(embed_k)>
  q     = embed[ids]                      (the raw row, not re-normalised; the pre-update codebook)
  train: q_st = x + stop_grad(q - x);  commit = mean((stop_grad(q) - x)^2)   (x un-normalised)
         bins = counts per code; cluster_size <- lerp(cluster_size, bins, 0.2)
         target_k = l2(mean of l2(x) assigned to k)   (kept l2(embed_k) if k got nothing)
         embed <- lerp(embed, target, 0.2)

Departure (a switch, off by default and in every GenerateCT-shaped config): `dead_code_threshold`
> 0 expires dead codes as vector-quantize-pytorch's `threshold_ema_dead_code` does. After the EMA
update, every code whose `cluster_size` is below the threshold is replaced by an l2-normalised
encoder output of the current batch and its `cluster_size` is set to the threshold. The vectors
are drawn without replacement when the batch has at least as many as the codebook has codes (so
no two codes get the same one), with replacement otherwise. The key is derived from the batch's
ids, so the choice is deterministic and the same on every replica. Only the training-time codebook update changes: the weights keep
GenerateCT's layout.

The codebook statistics are global reductions (segment sums over every token of the global
batch), so under `jit` on a data-parallel mesh they are summed across replicas before the update
and every replica ends with the same codebook.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ctgen.models.layers import Buffer, l2_normalize
from ctgen.parallel.axes import param


@dataclasses.dataclass
class VQOutput:
    quantized: jax.Array  # (..., D) straight-through in training, raw codes otherwise
    ids: jax.Array  # (...,) int32
    commit_loss: jax.Array  # scalar (0 outside training)
    metrics: dict[str, jax.Array]


def _kaiming_uniform_l2(key: jax.Array, k: int, d: int) -> jax.Array:
    # Direction is what matters after the L2 normalisation; the bound is irrelevant.
    return l2_normalize(jax.random.uniform(key, (k, d), jnp.float32, -1.0, 1.0))


def codebook_metrics(bins_K: jax.Array) -> dict[str, jax.Array]:
    """Fraction of codes used and perplexity exp(H(p)) of the code histogram `bins_K`."""
    total = jnp.maximum(jnp.sum(bins_K), 1.0)
    p = bins_K / total
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"codebook_usage": jnp.mean((bins_K > 0).astype(jnp.float32)), "codebook_perplexity": jnp.exp(entropy)}


class VectorQuantizer(nnx.Module):
    """EMA cosine-similarity codebook; `embed`, `cluster_size` and `initted` are `Buffer`s."""

    def __init__(self, dim: int, codebook_size: int, *, decay: float = 0.8, commitment_weight: float = 1.0,
                 dead_code_threshold: float = 0.0, rngs: nnx.Rngs):
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        self.commitment_weight = commitment_weight
        self.codebook_size = codebook_size
        self.embed = param(_kaiming_uniform_l2(rngs.params(), codebook_size, dim), "codebook", "embed", cls=Buffer)
        self.cluster_size = param(jnp.zeros((codebook_size,), jnp.float32), "codebook", cls=Buffer)
        self.initted = param(jnp.ones((1,), jnp.float32), None, cls=Buffer)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Raw codebook rows for integer ids of any shape: (...,) -> (..., D)."""
        return jnp.take(self.embed[...], ids, axis=0)

    def assign(self, x: jax.Array) -> jax.Array:
        """Nearest code by cosine similarity: (..., D) -> (...,) int32."""
        xn = l2_normalize(x.astype(jnp.float32))
        en = l2_normalize(self.embed[...])
        sim = jnp.einsum("...d,kd->...k", xn, en, preferred_element_type=jnp.float32)
        return jnp.argmax(sim, axis=-1).astype(jnp.int32)

    def __call__(self, x: jax.Array, *, train: bool = False) -> VQOutput:
        """Quantise (..., D); in training also update the EMA codebook in place (global statistics)."""
        x = x.astype(jnp.float32)
        ids = self.assign(x)
        q = self.lookup(ids)
        k = self.codebook_size
        flat_ids = ids.reshape(-1)
        bins = jax.ops.segment_sum(jnp.ones_like(flat_ids, jnp.float32), flat_ids, num_segments=k)
        metrics = codebook_metrics(bins)
        if not train:
            return VQOutput(q, ids, jnp.zeros((), jnp.float32), metrics)
        commit = jnp.mean(jnp.square(jax.lax.stop_gradient(q) - x)) * self.commitment_weight
        q_st = x + jax.lax.stop_gradient(q - x)
        self._ema_update(jax.lax.stop_gradient(x).reshape(-1, x.shape[-1]), flat_ids, bins)
        return VQOutput(q_st, ids, commit, metrics)

    def _ema_update(self, x_NxD: jax.Array, ids_N: jax.Array, bins_K: jax.Array) -> None:
        w = 1.0 - self.decay
        embed = self.embed[...]
        cluster = self.cluster_size[...]
        self.cluster_size[...] = cluster + w * (bins_K - cluster)
        zero = bins_K == 0
        xn_NxD = l2_normalize(x_NxD)
        sums = jax.ops.segment_sum(xn_NxD, ids_N, num_segments=self.codebook_size)
        means = l2_normalize(sums / jnp.where(zero, 1.0, bins_K)[:, None])
        target = jnp.where(zero[:, None], l2_normalize(embed), means)
        self.embed[...] = embed + w * (target - embed)
        if self.dead_code_threshold > 0:
            self._expire_dead_codes(xn_NxD, ids_N)

    def _expire_dead_codes(self, xn_NxD: jax.Array, ids_N: jax.Array) -> None:
        """Replace codes below the threshold with rows of the l2-normalised batch `xn_NxD`."""
        n, k = xn_NxD.shape[0], self.codebook_size
        key = jax.random.fold_in(jax.random.key(0x5EED), jnp.sum(ids_N.astype(jnp.uint32)))
        if n >= k:
            pick = jax.random.permutation(key, n)[:k]
        else:
            pick = jax.random.randint(key, (k,), 0, n)
        dead = self.cluster_size[...] < self.dead_code_threshold
        self.embed[...] = jnp.where(dead[:, None], jnp.take(xn_NxD, pick, axis=0), self.embed[...])
        self.cluster_size[...] = jnp.where(dead, jnp.float32(self.dead_code_threshold), self.cluster_size[...])
