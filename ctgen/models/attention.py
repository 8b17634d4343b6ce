"""GenerateCT's attention, continuous position bias and PEG transformer, in NNX.

Matches `transformer_maskgit/attention.py` numerically:
- pre-norm attention whose norm has a learnable gamma and a constant zero beta;
- in self-attention, keys/values come from the *un-normalised* input, queries from the normalised one;
- q and k are L2-normalised per head, times learnable per-channel scales, logits times 8;
- optional learned null key/value pairs (cross-attention) prepended to the keys;
- continuous (SwinV2-style) relative position bias from a small MLP over sign*log(1+|d|),
  evaluated once per distinct offset of the token grid (`ContinuousPositionBias.relative_bias`);
- transformer layer: x += PEG(x); x += attn(x, bias); [x += cross_attn(x, ctx)]; x += GEGLU-FF(x);
  final gamma-only norm.
The softmax(q.k + bias) v arithmetic itself is `ctgen.models.attention_core.attend` (dense for short
sequences, blocked or fused for long ones).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ctgen.models.attention_core import RelativeBias, attend, choose
from ctgen.models.layers import PEG, Dense, GEGLUFeedForward, ScaleNorm, l2_normalize, leaky_relu, token_axes
from ctgen.parallel.axes import constrain, param, with_axes


class Attention(nnx.Module):
    """Multi-head attention with L2-normalised, learnably scaled queries and keys.

    x_BxNxD may have any number of leading batch axes (..., N, D). `bias_HxNxM` (an array or a
    `RelativeBias`) is added to the logits of the non-null keys. `mask_BxM` (True = attend) masks
    context keys.
    cross: attend to a `context` (width `dim_context`, default `dim`) normalised by its own
      `context_norm`; otherwise self-attention, which takes no context.
    impl, block_size: how `attend` computes the attention ("auto": dense for short sequences).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, cross: bool = False,
                 dim_context: int | None = None, num_null_kv: int = 0, scale: float = 8.0, impl: str = "auto",
                 block_size: int = 512, dtype=jnp.float32, rngs: nnx.Rngs):
        if dim_context is not None and not cross:
            raise ValueError(f"dim_context={dim_context} is for cross-attention: pass cross=True")
        inner = heads * dim_head
        dim_context = dim_context or dim
        self.heads, self.dim_head, self.scale = heads, dim_head, scale
        self.num_null_kv = num_null_kv
        self.cross = cross
        choose(impl, 1, 1)  # validates the name
        self.impl, self.block_size = impl, block_size
        self.norm = ScaleNorm(dim)
        # Self-attention's context_norm is unused in GenerateCT, so it is not a ctgen parameter
        # (conversion writes its constant value).
        self.context_norm = ScaleNorm(dim_context) if cross else None
        self.null_kv = (nnx.Param(with_axes(jax.nn.initializers.normal(1.0), "heads", None, "kv")(
            rngs.params(), (heads, 2 * num_null_kv, dim_head))) if num_null_kv else None)
        self.to_q = Dense(dim, inner, axes=("embed", "joined_kv"), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_kv = Dense(dim_context, 2 * inner, axes=("embed", "joined_kv"), use_bias=False, dtype=dtype,
                           rngs=rngs)
        self.q_scale = param(jnp.ones((dim_head,), jnp.float32), "kv")
        self.k_scale = param(jnp.ones((dim_head,), jnp.float32), "kv")
        self.to_out = Dense(inner, dim, axes=("joined_kv", "embed"), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, context: jax.Array | None = None,
                 bias_HxNxM: jax.Array | RelativeBias | None = None, mask_BxM: jax.Array | None = None) -> jax.Array:
        h, dh = self.heads, self.dim_head
        if (context is not None) != self.cross:
            raise ValueError("cross-attention needs a context" if self.cross else
                             "self-attention takes no context (build the layer with cross=True)")
        if context is not None:
            context = self.context_norm(context)
        kv_input = x if context is None else context  # self-attention: k/v from the raw input
        q = checkpoint_name(self.to_q(self.norm(x)), "attn_q")
        kv = checkpoint_name(self.to_kv(kv_input), "attn_kv")
        inner = h * dh
        k, v = kv[..., :inner], kv[..., inner:]
        lead_q, lead_k = q.shape[:-1], k.shape[:-1]
        q = constrain(q.reshape(*lead_q, h, dh), token_axes(q.ndim + 1, "heads", "kv"))
        k = constrain(k.reshape(*lead_k, h, dh), token_axes(k.ndim + 1, "heads", "kv"))
        v = constrain(v.reshape(*lead_k, h, dh), token_axes(k.ndim, "heads", "kv"))
        if self.null_kv is not None:
            # (h, 2n, dh): even rows are keys, odd rows values; prepend to every sequence.
            null = self.null_kv[...].astype(k.dtype)
            nk = jnp.swapaxes(null[:, 0::2], 0, 1)  # (n, h, dh)
            nv = jnp.swapaxes(null[:, 1::2], 0, 1)
            batch = k.shape[:-3]
            k = jnp.concatenate([jnp.broadcast_to(nk, (*batch, *nk.shape)), k], axis=-3)
            v = jnp.concatenate([jnp.broadcast_to(nv, (*batch, *nv.shape)), v], axis=-3)
        q = l2_normalize(q) * self.q_scale[...].astype(q.dtype).reshape((1,) * (q.ndim - 1) + (dh,))
        k = l2_normalize(k) * self.k_scale[...].astype(k.dtype).reshape((1,) * (k.ndim - 1) + (dh,))
        out = attend(q, k, v, scale=self.scale, bias=bias_HxNxM, mask_BxM=mask_BxM, num_prefix=self.num_null_kv,
                     impl=self.impl, block_size=self.block_size)
        out = constrain(out, token_axes(q.ndim, "heads", "kv"))
        return self.to_out(out.reshape(*lead_q, h * dh))


def log_offsets(d: np.ndarray) -> np.ndarray:
    """sign(d)*log(1+|d|), the MLP's input for integer offsets d (float32)."""
    d = np.asarray(d, np.float32)
    return (np.sign(d) * np.log1p(np.abs(d))).astype(np.float32)


def relative_positions(grid: Sequence[int]) -> np.ndarray:
    """The log-spaced offset of every (query, key) pair of a grid, shape (N, N, len(grid)): the naive
    N^2 form of the position bias's input (GenerateCT's `rel_pos`)."""
    coords = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), axis=-1).reshape(-1, len(grid))
    return log_offsets(coords[:, None, :] - coords[None, :, :])


class ContinuousPositionBias(nnx.Module):
    """SwinV2 continuous position bias: MLP(num_dims -> dim -> ... -> heads) over log-spaced offsets.

    The bias between two tokens depends only on their offset, so the MLP runs once per distinct
    offset of the grid (at most prod(2g - 1)), not per token pair (GenerateCT evaluates it on all
    N^2 pairs: 10.7 GB per hidden activation for MaskGIT at 201 slices). Models compute it once per
    grid and share it across layers (and MaskGIT across decoding steps).
    """

    def __init__(self, dim: int, heads: int, *, num_dims: int = 2, layers: int = 2, rngs: nnx.Rngs):
        self.hidden = nnx.List([
            Dense(num_dims if i == 0 else dim, dim, axes=("pos", "mlp") if i == 0 else (None, "mlp"), rngs=rngs)
            for i in range(layers)])
        self.to_heads = Dense(dim, heads, axes=(None, "heads"), rngs=rngs)

    def mlp(self, offsets: jax.Array) -> jax.Array:
        """(..., num_dims) log-spaced offsets -> (..., heads) biases."""
        h = offsets
        for layer in self.hidden:
            h = leaky_relu(layer(h), 0.1)
        return self.to_heads(h)

    def offset_table(self, grid: Sequence[int]) -> jax.Array:
        """(heads, 2*g0 - 1, 2*g1 - 1, ...): the bias of every offset of `grid` (offset d along an
        axis of size g at index d + g - 1)."""
        axes = [np.arange(-(g - 1), g) for g in grid]
        offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        return jnp.moveaxis(self.mlp(jnp.asarray(log_offsets(offsets))), -1, 0)

    def relative_bias(self, grid: Sequence[int]) -> RelativeBias:
        """The bias of `grid` in its compact per-offset form (what long-sequence attention reads)."""
        return RelativeBias.from_offset_table(self.offset_table(grid))

    def __call__(self, grid: Sequence[int]) -> jax.Array:
        """Bias of shape (heads, N, N) with N = prod(grid)."""
        return self.relative_bias(grid).dense()


class TransformerBlock(nnx.Module):
    def __init__(self, dim: int, *, heads: int, dim_head: int, ff_mult: float, peg: bool, peg_causal: bool,
                 dim_context: int | None, cross_num_null_kv: int, attention: str, attention_block: int, dtype,
                 rngs: nnx.Rngs):
        self.peg = PEG(dim, causal=peg_causal, rngs=rngs) if peg else None
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, impl=attention, block_size=attention_block,
                              dtype=dtype, rngs=rngs)
        self.cross_attn = (Attention(dim, heads=heads, dim_head=dim_head, cross=True, dim_context=dim_context,
                                     num_null_kv=cross_num_null_kv, impl=attention, block_size=attention_block,
                                     dtype=dtype, rngs=rngs)
                           if dim_context else None)
        self.ff = GEGLUFeedForward(dim, ff_mult, dtype=dtype, rngs=rngs)

    def __call__(self, x, grid_BxTxHxW, bias, context, context_mask):
        if self.peg is not None:
            x = x + self.peg(x, grid_BxTxHxW)
        x = x + self.attn(x, bias_HxNxM=bias)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(x, context=context, mask_BxM=context_mask)
        return x + self.ff(x)


REMAT_POLICIES = {
    "full": None,
    "projections": jax.checkpoint_policies.save_only_these_names("attn_q", "attn_kv", "ff_hidden"),
}


class Transformer(nnx.Module):
    """Stack of PEG/attention/(cross-attention)/FF blocks with a final gamma-only norm.

    remat: recompute activations in the backward pass instead of keeping them. Implemented as
      `lax.scan` over the blocks' stacked parameters with a checkpointed body: on XLA:CPU a plain
      `jax.checkpoint` per unrolled block is undone by common-subexpression elimination, a
      checkpointed scan body is not. Parameters stay stored per block (names do not change).
    remat_policy: "projections" keeps the outputs of the q, kv and feed-forward input projections
      (the matmuls are ~95% of a block's FLOPs), so the backward pass recomputes only norms,
      attention and elementwise work; "full" keeps only each block's input (least memory).
    attention, attention_block: the `attend` implementation ("auto": dense for short sequences) and
      the blocked form's block size in tokens.
    """

    def __init__(self, dim: int, *, depth: int, heads: int = 8, dim_head: int = 64, ff_mult: float = 4.0,
                 peg: bool = True, peg_causal: bool = False, dim_context: int | None = None,
                 cross_num_null_kv: int = 2, remat: bool = False, remat_policy: str = "full",
                 attention: str = "auto", attention_block: int = 512, dtype=jnp.float32, rngs: nnx.Rngs):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {remat_policy!r}")
        self.layers = nnx.List([
            TransformerBlock(dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, peg=peg, peg_causal=peg_causal,
                             dim_context=dim_context, cross_num_null_kv=cross_num_null_kv, attention=attention,
                             attention_block=attention_block, dtype=dtype, rngs=rngs)
            for _ in range(depth)])
        self.norm_out = ScaleNorm(dim)
        self.remat = remat
        self.remat_policy = remat_policy

    def __call__(self, x: jax.Array, grid_BxTxHxW: Sequence[int], *, bias_HxNxN: jax.Array | RelativeBias | None = None,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None) -> jax.Array:
        """x: (..., N, D) whose row-major memory is reinterpreted as the grid by each PEG;
        bias_HxNxN: the self-attention bias, shared by all blocks (an array or a `RelativeBias`)."""
        grid = tuple(int(g) for g in grid_BxTxHxW)
        if not self.remat or not self.layers:
            for block in self.layers:
                x = constrain(block(x, grid, bias_HxNxN, context, context_mask), token_axes(x.ndim, "embed"))
            return self.norm_out(x)
        graphdef = nnx.graphdef(self.layers[0])
        states = [nnx.state(block) for block in self.layers]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

        @partial(jax.checkpoint, policy=REMAT_POLICIES[self.remat_policy])
        def body(h, state):
            out = nnx.merge(graphdef, state)(h, grid, bias_HxNxN, context, context_mask)
            return constrain(out, token_axes(out.ndim, "embed")), None

        x, _ = jax.lax.scan(body, x, stacked)
        return self.norm_out(x)
