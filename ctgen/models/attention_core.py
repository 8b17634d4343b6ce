"""The attention arithmetic every ctgen model uses: one entry point, `attend`, three implementations.

`attend(q, k, v, scale=...)` is softmax(scale * q.k + bias, masked) v for queries (..., N, H, D) and
keys/values (..., P + M, H, D) whose first P keys are *prefix* keys (GenerateCT's learned null
key/values): they take no bias and are never masked. Implementations (`impl`):

  dense    all scores as one (..., H, N, P + M) array, exactly GenerateCT's order of operations;
  blocked  query blocks x key blocks with an online softmax (FlashAttention's recurrence): scores
           exist for one block pair at a time, and a relative position bias is read per block from
           its offsets table (`RelativeBias`). Each query block is rematerialised in the backward
           pass, so training holds one block row of residuals, not N^2 of them;
  fused    `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPUs when dtypes allow);
  auto     dense up to `DENSE_MAX_PAIRS` query-key pairs (the CT-ViT's 64-token slices, T5-length
           contexts), else fused on GPU/TPU and blocked on CPU.

Why blocked on CPU: at thousands of tokens attention is memory bound on XLA:CPU. Plain XLA attention
over 8 heads x 6144 tokens ran at ~27 GFLOP/s on the project's 2-core machine, a blocked form whose
score blocks stay in cache at ~78; materialising a bias the size of the scores would cost as much
memory traffic again.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "dense", "blocked", "fused")
DENSE_MAX_PAIRS = 256 * 1024  # auto: dense up to this many query-key pairs per head
NEG = float(-np.finfo(np.float32).max)  # GenerateCT's masking value (-finfo.max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RelativeBias:
    """The relative position bias of a token grid (G0, G1, ...), stored per distinct offset.

    Tokens are the grid's points in row-major order; the grid's first axis is its *frame* axis
    (MaskGIT: the T slice groups of a (T, h, w) grid) and F = G1*G2*... tokens make a frame.
    `by_frame_offset[h, d, p, q]` is head h's bias between a query at in-frame position p and a key
    at in-frame position q whose frames differ by d - (G0 - 1) (query frame minus key frame). That
    is all of it: heads x (2 G0 - 1) x F^2 numbers (MaskGIT at 201 slices: 26 MB) instead of
    heads x N^2 (1.3 GB). `dense()` expands it; the blocked attention gathers one block at a time.
    """

    by_frame_offset: jax.Array  # (H, 2*G0 - 1, F, F)
    num_frames: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_offset_table(cls, table: jax.Array) -> "RelativeBias":
        """From `table[h, d0, d1, ...]`, the bias for the offset (d0 - G0 + 1, d1 - G1 + 1, ...)."""
        heads, *sizes = table.shape
        grid = [(s + 1) // 2 for s in sizes]
        inner = grid[1:]
        if inner:
            coords = np.stack(np.meshgrid(*[np.arange(g) for g in inner], indexing="ij"), -1).reshape(-1, len(inner))
            idx = [coords[:, None, a] - coords[None, :, a] + g - 1 for a, g in enumerate(inner)]  # (F, F) each
            by_offset = table[(slice(None), slice(None), *idx)]
        else:
            by_offset = table[:, :, None, None]
        return cls(by_offset, grid[0])

    @property
    def frame_size(self) -> int:
        return self.by_frame_offset.shape[-1]

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.frame_size

    def dense(self) -> jax.Array:
        """The full bias (H, N, N)."""
        t = np.arange(self.num_frames)
        e = self.by_frame_offset[:, t[:, None] - t[None, :] + self.num_frames - 1]  # (H, T, T, F, F)
        h, n = e.shape[0], self.num_tokens
        return jnp.transpose(e, (0, 1, 3, 2, 4)).reshape(h, n, n)


def choose(impl: str, num_queries: int, num_keys: int) -> str:
    """The implementation `impl` resolves to for these sequence lengths on the default backend."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    if num_queries * num_keys <= DENSE_MAX_PAIRS:
        return "dense"
    return "blocked" if jax.default_backend() == "cpu" else "fused"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, bias=None, mask_BxM: jax.Array | None = None,
           num_prefix: int = 0, impl: str = "auto", block_size: int = 512) -> jax.Array:
    """softmax(scale * q.k + bias) v; see the module docstring.

    q: (..., N, H, D); k, v: (..., num_prefix + M, H, D) with the same leading axes.
    bias: None, an (H, N, M) array, or a `RelativeBias` of an N = M token grid; it applies to the M
      non-prefix keys.
    mask_BxM: True = attend, for the M non-prefix keys; B is the first leading axis of q.
    block_size: tokens per query block and per key block of the blocked form (rounded to whole
      frames of a `RelativeBias`).
    Returns (..., N, H, D) in v's dtype; scores and softmax are computed in float32.
    """
    n, m = q.shape[-3], k.shape[-3] - num_prefix
    if isinstance(bias, RelativeBias) and not bias.num_tokens == n == m:
        raise ValueError(f"a relative bias of {bias.num_tokens} tokens for {n} queries and {m} keys")
    which = choose(impl, n, m)
    if which == "dense":
        return _dense(q, k, v, scale, bias.dense() if isinstance(bias, RelativeBias) else bias, mask_BxM, num_prefix)
    lead = q.shape[:-3]
    if mask_BxM is not None and len(lead) > 1:  # the mask's batch axis is the first leading axis
        mask_BxM = jnp.broadcast_to(mask_BxM.reshape(lead[:1] + (1,) * (len(lead) - 1) + (m,)), (*lead, m))
    flat = [x.reshape((-1,) + x.shape[-3:]) for x in (q, k, v)]
    mask = None if mask_BxM is None else mask_BxM.reshape(-1, m)
    if which == "fused":
        out = _fused(*flat, scale, bias, mask, num_prefix)
    else:
        out = _blocked(*flat, scale, bias, mask, num_prefix, block_size)
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def _dense(q, k, v, scale, bias_HxNxM, mask_BxM, num_prefix):
    logits = jnp.einsum("...nhd,...mhd->...hnm", q, k, preferred_element_type=jnp.float32) * scale
    if bias_HxNxM is not None:
        if num_prefix:
            bias_HxNxM = jnp.pad(bias_HxNxM, ((0, 0), (0, 0), (num_prefix, 0)))
        logits = logits + bias_HxNxM.astype(jnp.float32).reshape((1,) * (logits.ndim - 3) + bias_HxNxM.shape)
    if mask_BxM is not None:
        if num_prefix:
            mask_BxM = jnp.pad(mask_BxM, ((0, 0), (num_prefix, 0)), constant_values=True)
        mask = mask_BxM.reshape(mask_BxM.shape[:1] + (1,) * (logits.ndim - 2) + mask_BxM.shape[1:])
        logits = jnp.where(mask, logits, NEG)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hnm,...mhd->...nhd", attn, v)


def _fused(q, k, v, scale, bias, mask_BxM, num_prefix):
    if isinstance(bias, RelativeBias):
        bias = bias.dense()
    if bias is not None:
        bias = jnp.pad(bias.astype(jnp.float32), ((0, 0), (0, 0), (num_prefix, 0)))[None].astype(q.dtype)
    mask = None
    if mask_BxM is not None:
        mask = jnp.pad(mask_BxM, ((0, 0), (num_prefix, 0)), constant_values=True)[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale).astype(v.dtype)


def _balanced(units: int, most: int) -> int:
    """Units per block for `units` in blocks of at most `most`, with as few blocks as that allows."""
    return math.ceil(units / math.ceil(units / most)) if units else most


def _blocked(q, k, v, scale, bias, mask_BxM, num_prefix, block_size):
    b, n, h, d = q.shape
    m = k.shape[1] - num_prefix
    relative = isinstance(bias, RelativeBias)
    f = bias.frame_size if relative else 1
    # Frames per block: at most block_size tokens, balanced so that padding is under one frame per
    # block (9 frames of 64 tokens: 2 blocks of 5 frames, not of 8 padded to 16).
    frames_q, frames_k = (_balanced(length // f, max(1, block_size // f)) for length in (n, m))
    nq, nk = math.ceil(n // f / frames_q), math.ceil(m // f / frames_k)
    bq, bk = frames_q * f, frames_k * f
    qb = jnp.pad(q, ((0, 0), (0, nq * bq - n), (0, 0), (0, 0))).reshape(b, nq, bq, h, d)
    kp, vp = k[:, :num_prefix], v[:, :num_prefix]
    kb = jnp.pad(k[:, num_prefix:], ((0, 0), (0, nk * bk - m), (0, 0), (0, 0))).reshape(b, nk, bk, h, d)
    vb = jnp.pad(v[:, num_prefix:], ((0, 0), (0, nk * bk - m), (0, 0), (0, 0))).reshape(b, nk, bk, h, v.shape[-1])
    key_mask = None
    if mask_BxM is not None or nk * bk != m:
        key_mask = mask_BxM if mask_BxM is not None else jnp.ones((1, m), bool)
        key_mask = jnp.pad(key_mask, ((0, 0), (0, nk * bk - m))).reshape(-1, nk, bk)
    if relative:
        t = bias.num_frames
        # by_frame_offset[h, d, p, q] with d = fq - fk + t - 1, re-laid out once as table[h, p, r, q] with
        # r = fk - fq + t - 1 + pad_left: for one query frame, the bias of a run of consecutive key
        # frames is then one contiguous slice (H, F, frames_k, F), no per-element gather. Padding
        # frames read zeros (queries past t are dropped, keys past t are masked by key_mask).
        pad_left, pad_right = nq * frames_q - t, nk * frames_k - t
        table = jnp.transpose(jnp.flip(bias.by_frame_offset.astype(jnp.float32), 1), (0, 2, 1, 3))
        table = jnp.pad(table, ((0, 0), (0, 0), (pad_left, pad_right), (0, 0)))
    elif bias is not None:
        dense = jnp.pad(bias.astype(jnp.float32), ((0, 0), (0, nq * bq - n), (0, nk * bk - m)))
        dense = dense.reshape(h, nq, bq, nk, bk)

    def bias_block(i, j):
        if relative:
            starts = j * frames_k - (i * frames_q + jnp.arange(frames_q)) + t - 1 + pad_left
            e = jax.vmap(lambda r: jax.lax.dynamic_slice_in_dim(table, r, frames_k, axis=2), out_axes=1)(starts)
            return e.reshape(h, bq, bk)[None]  # (H, frames_q, F, frames_k, F) -> (1, H, bq, bk)
        return dense[:, i, :, j][None]

    def scores(qi, kj):
        return jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale

    def row(i):
        qi = jax.lax.dynamic_index_in_dim(qb, i, axis=1, keepdims=False)
        if num_prefix:
            s = scores(qi, kp)
            mx = jnp.max(s, axis=-1)
            p = jnp.exp(s - mx[..., None])
            carry = (mx, jnp.sum(p, axis=-1),
                     jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vp, preferred_element_type=jnp.float32))
        else:
            carry = (jnp.full((b, h, bq), NEG, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                     jnp.zeros((b, h, bq, v.shape[-1]), jnp.float32))

        def step(carry, j):
            mx, total, acc = carry
            s = scores(qi, jax.lax.dynamic_index_in_dim(kb, j, axis=1, keepdims=False))
            if bias is not None:
                s = s + bias_block(i, j)
            if key_mask is not None:
                s = jnp.where(jax.lax.dynamic_index_in_dim(key_mask, j, axis=1, keepdims=False)[:, None, None, :],
                              s, NEG)
            new = jnp.maximum(mx, jnp.max(s, axis=-1))
            p = jnp.exp(s - new[..., None])
            c = jnp.exp(mx - new)
            vj = jax.lax.dynamic_index_in_dim(vb, j, axis=1, keepdims=False)
            acc = acc * c[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vj,
                                                  preferred_element_type=jnp.float32)
            return (new, total * c + jnp.sum(p, axis=-1), acc), None

        (_, total, acc), _ = jax.lax.scan(step, carry, jnp.arange(nk))
        return (acc / total[..., None]).astype(v.dtype)

    out = jax.lax.map(jax.checkpoint(row), jnp.arange(nq))  # (nq, B, H, bq, D)
    out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(b, nq * bq, h, v.shape[-1])
    return out[:, :n]
