"""MaskGIT: GenerateCT's text-conditioned masked-token transformer (stage 2), in Flax NNX.

Input: CT-ViT codebook ids of a (T, h, w) token grid, flattened row-major (B, N = T*h*w), where id
`num_tokens` is [MASK]. Token embedding + learned absolute position embedding, gradient shrink
(forward identity, gradients x alpha), then `depth` blocks of PEG (a non-causal depthwise 3x3x3
convolution over the grid) -> self-attention with a 3-D continuous position bias -> cross-attention
to the text states (context LayerNorm, 2 learned null key/values, key mask = text mask) -> GEGLU
feed-forward; final norm and a linear head to `num_tokens` logits. Parameter-for-parameter
GenerateCT's `MaskGit(num_tokens=8192, max_seq_len=10000, dim=512, dim_context=768, depth=6)`
(see `ctgen.convert.maskgit` for the name map).

The position bias depends only on relative offsets, so it is evaluated on the distinct offsets of
the grid (at most (2T-1)*15*15 of them) and kept in that form (`RelativeBias`): `position_bias(grid)`
computes it once per grid shape, every layer uses it, and a sampler passes the same one to all its
decoding steps (`__call__(..., bias=...)`). Long sequences attend block by block and read the bias
per block (`ctgen.models.attention_core`); nothing of size N^2 x hidden ever exists.

Conditioning beyond GenerateCT (off in the paper configuration): `spacing_tokens > 0` adds the
voxel spacing (dz, dy, dx in mm) as that many extra context tokens after the text, so a model can
be asked for a slice thickness. The null condition of classifier-free guidance masks the text only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ctgen.config_dataclass import build_dataclass
from ctgen.models.attention import ContinuousPositionBias, Transformer
from ctgen.models.attention_core import RelativeBias, choose
from ctgen.models.layers import Dense
from ctgen.parallel.axes import constrain, with_axes


@dataclasses.dataclass(frozen=True)
class MaskGITConfig:
    """Architecture of a MaskGIT transformer. `paper()` is GenerateCT's; `tiny()` trains in seconds.

    num_tokens: codebook size of the tokenizer (id num_tokens is [MASK]).
    max_seq_len: rows of the learned position table; the longest token grid (paper: 10000 tokens,
      i.e. up to 156 slice groups = 311 slices of 8x8 tokens).
    dim_context: width of the text encoder states (T5 v1.1 base: 768).
    cross_num_null_kv: learned null key/values of each cross-attention (what the null prompt sees).
    gradient_shrink_alpha: gradients into the embeddings are scaled by this (CogView/GLM trick).
    spacing_tokens: context tokens encoding the voxel spacing (0 = none, GenerateCT).
    attention: how attention is computed: "auto" (dense for short sequences, else fused on GPU/TPU
      and blocked on CPU), "dense", "blocked" or "fused"; attention_block: tokens per block.
    remat, remat_policy: recompute transformer activations in the backward pass (see `Transformer`).
    dtype: compute dtype of the matmuls ("float32" or "bfloat16"); parameters stay float32.
    """

    num_tokens: int = 8192
    max_seq_len: int = 10000
    dim: int = 512
    dim_context: int = 768
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    ff_mult: float = 4.0
    cross_num_null_kv: int = 2
    gradient_shrink_alpha: float = 0.1
    spacing_tokens: int = 0
    attention: str = "auto"
    attention_block: int = 512
    remat: bool = False
    remat_policy: str = "full"
    dtype: str = "float32"

    def __post_init__(self):
        choose(self.attention, 1, 1)  # a bad name fails here, not at the first forward

    @classmethod
    def paper(cls, **overrides: Any) -> "MaskGITConfig":
        """GenerateCT's MaskGit(num_tokens=8192, max_seq_len=10000, dim=512, dim_context=768, depth=6)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "MaskGITConfig":
        base = cls(num_tokens=64, max_seq_len=512, dim=32, dim_context=16, depth=2, heads=2, dim_head=8)
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "MaskGITConfig":
        """Inverse of `to_dict`; also accepts a ConfigDict or a JSON round trip."""
        return build_dataclass(cls, d)

    @property
    def mask_id(self) -> int:
        return self.num_tokens

    def check_grid(self, grid: Sequence[int]) -> tuple[int, int, int]:
        """`grid` as a (T, h, w) tuple; ValueError if it has more tokens than the position table."""
        grid = tuple(int(g) for g in grid)
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"MaskGIT token grid must be (groups, height, width), got {grid}")
        n = grid[0] * grid[1] * grid[2]
        if n > self.max_seq_len:
            raise ValueError(f"token grid {grid} has {n} tokens, more than this model's max_seq_len="
                             f"{self.max_seq_len} (its position table)")
        return grid


class SpacingEmbed(nnx.Module):
    """Voxel spacing (dz, dy, dx) in mm -> `num` context tokens: log-spacing -> Dense -> GELU -> Dense."""

    def __init__(self, num: int, dim_context: int, *, dtype, rngs: nnx.Rngs):
        self.num = num
        self.hidden = Dense(3, dim_context, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.out = Dense(dim_context, num * dim_context, axes=("embed", None), dtype=dtype, rngs=rngs)

    def __call__(self, spacing_Bx3: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.hidden(jnp.log(jnp.maximum(spacing_Bx3.astype(jnp.float32), 1e-3))))
        return self.out(h).reshape(spacing_Bx3.shape[0], self.num, -1)


class MaskGIT(nnx.Module):
    """Logits over the codebook for every token of a partially masked grid; see the module docstring."""

    def __init__(self, cfg: MaskGITConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        normal = jax.nn.initializers.normal(1.0)  # torch nn.Embedding's init
        self.token_emb = nnx.Param(with_axes(normal, "vocab", "embed")(rngs.params(), (cfg.num_tokens + 1, cfg.dim)))
        self.pos_emb = nnx.Param(with_axes(normal, None, "embed")(rngs.params(), (cfg.max_seq_len, cfg.dim)))
        self.pos_bias = ContinuousPositionBias(cfg.dim_head, cfg.heads, num_dims=3, rngs=rngs)
        self.transformer = Transformer(
            cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult, peg=True,
            peg_causal=False, dim_context=cfg.dim_context, cross_num_null_kv=cfg.cross_num_null_kv, remat=cfg.remat,
            remat_policy=cfg.remat_policy, attention=cfg.attention, attention_block=cfg.attention_block, dtype=dtype,
            rngs=rngs)
        self.to_logits = Dense(cfg.dim, cfg.num_tokens, axes=("embed", "vocab"), dtype=dtype, rngs=rngs)
        self.spacing = (SpacingEmbed(cfg.spacing_tokens, cfg.dim_context, dtype=dtype, rngs=rngs)
                        if cfg.spacing_tokens else None)

    def position_bias(self, grid_TxHxW: Sequence[int]) -> RelativeBias:
        """The self-attention bias of a (T, h, w) grid, per distinct offset: compute once per grid
        shape and pass it as `bias=` to every forward over that grid."""
        return self.pos_bias.relative_bias(self.cfg.check_grid(grid_TxHxW))

    def __call__(self, ids_BxN: jax.Array, grid_TxHxW: Sequence[int], context_BxLxE: jax.Array,
                 context_mask_BxL: jax.Array, *, bias: RelativeBias | None = None,
                 spacing_Bx3: jax.Array | None = None) -> jax.Array:
        """Logits (B, N, num_tokens), float32.

        ids_BxN: int ids (or (B, T, h, w)), `cfg.mask_id` where masked; grid_TxHxW: the token grid.
        context_BxLxE / context_mask_BxL: text states and their mask (True = real token); a row
          whose mask is all False is the null prompt (only the learned null key/values remain).
        bias: `position_bias(grid)` if already computed (else computed here).
        spacing_Bx3: voxel spacing in mm (needed iff the model has spacing tokens).
        """
        cfg = self.cfg
        grid = cfg.check_grid(grid_TxHxW)
        b = ids_BxN.shape[0]
        ids = ids_BxN.reshape(b, -1)
        n = ids.shape[1]
        if n != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"{n} token ids do not fill the grid {grid}")
        if (spacing_Bx3 is None) != (self.spacing is None):
            raise ValueError("this model takes voxel spacing (spacing_tokens > 0): pass spacing_Bx3"
                             if self.spacing is not None else "this model has no spacing tokens; spacing_Bx3 is unused")
        x = jnp.take(self.token_emb[...], ids, axis=0) + self.pos_emb[...][None, :n]
        alpha = cfg.gradient_shrink_alpha
        x = x * alpha + jax.lax.stop_gradient(x) * (1.0 - alpha)
        x = constrain(x.astype(jnp.dtype(cfg.dtype)), ("batch", "length", "embed"))
        context, mask = context_BxLxE, context_mask_BxL.astype(bool)
        if self.spacing is not None:
            extra = self.spacing(spacing_Bx3).astype(context.dtype)
            context = jnp.concatenate([context, extra], axis=1)
            mask = jnp.concatenate([mask, jnp.ones(extra.shape[:2], bool)], axis=1)
        bias = self.position_bias(grid) if bias is None else bias
        x = self.transformer(x, (b, *grid), bias_HxNxN=bias, context=context, context_mask=mask)
        return constrain(self.to_logits(x).astype(jnp.float32), ("batch", "length", "vocab"))
