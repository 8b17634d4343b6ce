"""GenerateCT layer pieces shared by its converters (CT-ViT now; MaskGIT and super-resolution next).

Two kinds of builders, one per GenerateCT layer type:
- rules (`namemap.Rule` lists): a ctgen path prefix <-> a GenerateCT key prefix, with layout
  hooks. Dense kernels are transposed torch `Linear` weights; 2-D conv kernels are (k, k, in, out)
  vs torch's (out, in, k, k); PEG kernels (3, 3, 3, D) vs (D, 1, 3, 3, 3).
- manifest entries (`Entry`): every key GenerateCT's `state_dict()` has for a layer, in order,
  with shape and kind, and the value of keys that are constants there rather than ctgen state:
  the zero `beta` buffers of its gamma-only LayerNorms, self-attention's unused `context_norm`
  (gamma 1) and zero-size `null_kv`. Export writes the constants, import checks them.

Attention (`transformer_maskgit/attention.py`): self-attention keeps `null_kv (h, 0, dh)` and an
unused `context_norm` sized like the input; cross-attention (`cross=True`) has real
`null_kv (h, 2n, dh)` and `context_norm.gamma (dim_context)` parameters and `to_kv` reading the
context (MaskGIT: `null_kv (8, 4, 64)`, `context_norm.gamma (768)`, `to_kv (1024, 768)`).
Transformer layers are `layers.{i}.{0: PEG, 1: attention, 2: cross-attention, 3: feed-forward}`.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from ctgen.convert.namemap import Rule
from ctgen.errors import UserError


# --- layout hooks (views: writers make arrays contiguous) -------------------------------------------
def t(x):
    """Dense kernel (in, out) <-> torch Linear weight (out, in)."""
    return np.asarray(x).T


def conv_to_torch(x):  # (k, k, in, out) -> (out, in, k, k)
    return np.asarray(x).transpose(3, 2, 0, 1)


def conv_to_ours(x):
    return np.asarray(x).transpose(2, 3, 1, 0)


def peg_to_torch(x):  # (3, 3, 3, D) -> (D, 1, 3, 3, 3)
    return np.asarray(x).transpose(3, 0, 1, 2)[:, None]


def peg_to_ours(x):
    return np.asarray(x)[:, 0].transpose(1, 2, 3, 0)


# --- rules ------------------------------------------------------------------------------------------
def linear(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{ours}/kernel", f"{theirs}.weight", t, t)]
    if bias:
        rules.append(Rule(f"{ours}/bias", f"{theirs}.bias"))
    return rules


def conv2d(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/kernel", f"{theirs}.weight", conv_to_torch, conv_to_ours),
            Rule(f"{ours}/bias", f"{theirs}.bias")]


def layer_norm(ours: str, theirs: str) -> list[Rule]:
    """torch `nn.LayerNorm` (weight, bias) <-> ctgen `LayerNorm` (scale, bias)."""
    return [Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")]


def scale_norm(ours: str, theirs: str) -> list[Rule]:
    """GenerateCT's gamma-only LayerNorm <-> ctgen `ScaleNorm` (its zero beta is a constant)."""
    return [Rule(f"{ours}/scale", f"{theirs}.gamma")]


def peg(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/kernel", f"{theirs}.dsconv.weight", peg_to_torch, peg_to_ours),
            Rule(f"{ours}/bias", f"{theirs}.dsconv.bias")]


def attention(ours: str, theirs: str, *, cross: bool = False, null_kv: bool = False) -> list[Rule]:
    """An `Attention`; cross-attention also maps its context norm, `null_kv` its null key/values."""
    rules = [Rule(f"{ours}/q_scale", f"{theirs}.q_scale"), Rule(f"{ours}/k_scale", f"{theirs}.k_scale"),
             *scale_norm(f"{ours}/norm", f"{theirs}.norm")]
    if cross:
        rules += scale_norm(f"{ours}/context_norm", f"{theirs}.context_norm")
    if null_kv:
        rules.append(Rule(f"{ours}/null_kv", f"{theirs}.null_kv"))
    return rules + [*linear(f"{ours}/to_q", f"{theirs}.to_q", bias=False),
                    *linear(f"{ours}/to_kv", f"{theirs}.to_kv", bias=False),
                    *linear(f"{ours}/to_out", f"{theirs}.to_out", bias=False)]


def feed_forward(ours: str, theirs: str) -> list[Rule]:
    """GEGLU feed-forward: `.0` LayerNorm, `.1` input projection, `.4` output projection."""
    return [*layer_norm(f"{ours}/norm", f"{theirs}.0"), *linear(f"{ours}/w_in", f"{theirs}.1", bias=False),
            *linear(f"{ours}/w_out", f"{theirs}.4", bias=False)]


def transformer(ours: str, theirs: str, *, peg_layers: bool = True, cross: bool = False,
                cross_null_kv: bool = True) -> list[Rule]:
    """A `Transformer` (every layer, via an `{i}` placeholder) and its final norm."""
    layer, their_layer = f"{ours}/layers/{{i}}", f"{theirs}.layers.{{i}}"
    rules = peg(f"{layer}/peg", f"{their_layer}.0") if peg_layers else []
    rules += attention(f"{layer}/attn", f"{their_layer}.1")
    if cross:
        rules += attention(f"{layer}/cross_attn", f"{their_layer}.2", cross=True, null_kv=cross_null_kv)
    return rules + feed_forward(f"{layer}/ff", f"{their_layer}.3") + scale_norm(f"{ours}/norm_out",
                                                                                 f"{theirs}.norm_out")


def continuous_position_bias(ours: str, theirs: str, layers: int = 2) -> list[Rule]:
    """`ContinuousPositionBias`: hidden layers `net.{n}.0`, head `net.{layers}`."""
    return [*linear(f"{ours}/hidden/{{n}}", f"{theirs}.net.{{n}}.0"), *linear(f"{ours}/to_heads",
                                                                              f"{theirs}.net.{layers}")]


# --- manifest entries --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    kind: str  # "param" | "buffer"
    constant: float | None = None  # value of keys that are constants (not ctgen state)


def linear_entries(prefix: str, out: int, inp: int, bias: bool = True) -> list[Entry]:
    e = [Entry(f"{prefix}.weight", (out, inp), "param")]
    return e + ([Entry(f"{prefix}.bias", (out,), "param")] if bias else [])


def conv2d_entries(prefix: str, out: int, inp: int, k: int) -> list[Entry]:
    return [Entry(f"{prefix}.weight", (out, inp, k, k), "param"), Entry(f"{prefix}.bias", (out,), "param")]


def layer_norm_entries(prefix: str, dim: int) -> list[Entry]:
    return [Entry(f"{prefix}.weight", (dim,), "param"), Entry(f"{prefix}.bias", (dim,), "param")]


def scale_norm_entries(prefix: str, dim: int, gamma: float | None = None) -> list[Entry]:
    """gamma (a constant `gamma` where ctgen has no such parameter) and the zero beta buffer."""
    return [Entry(f"{prefix}.gamma", (dim,), "param", gamma), Entry(f"{prefix}.beta", (dim,), "buffer", 0.0)]


def attention_entries(prefix: str, dim: int, heads: int, dim_head: int, *, cross: bool = False,
                      dim_context: int | None = None, num_null_kv: int = 0) -> list[Entry]:
    inner, ctx = heads * dim_head, dim_context or dim
    return [
        Entry(f"{prefix}.null_kv", (heads, 2 * num_null_kv, dim_head), "param", None if num_null_kv else 0.0),
        Entry(f"{prefix}.q_scale", (dim_head,), "param"),
        Entry(f"{prefix}.k_scale", (dim_head,), "param"),
        *scale_norm_entries(f"{prefix}.norm", dim),
        *scale_norm_entries(f"{prefix}.context_norm", ctx, None if cross else 1.0),
        Entry(f"{prefix}.to_q.weight", (inner, dim), "param"),
        Entry(f"{prefix}.to_kv.weight", (2 * inner, ctx), "param"),
        Entry(f"{prefix}.to_out.weight", (dim, inner), "param"),
    ]


def transformer_entries(prefix: str, *, depth: int, dim: int, heads: int, dim_head: int, ff_mult: float,
                        peg_layers: bool = True, dim_context: int | None = None,
                        cross_num_null_kv: int = 2) -> list[Entry]:
    """A `Transformer`'s keys; cross-attention layers when `dim_context` is given."""
    inner_ff = int(ff_mult * (2 / 3) * dim)
    out = []
    for i in range(depth):
        pre = f"{prefix}.layers.{i}"
        if peg_layers:
            out += [Entry(f"{pre}.0.dsconv.weight", (dim, 1, 3, 3, 3), "param"),
                    Entry(f"{pre}.0.dsconv.bias", (dim,), "param")]
        out += attention_entries(f"{pre}.1", dim, heads, dim_head)
        if dim_context:
            out += attention_entries(f"{pre}.2", dim, heads, dim_head, cross=True, dim_context=dim_context,
                                     num_null_kv=cross_num_null_kv)
        out += [*layer_norm_entries(f"{pre}.3.0", dim), *linear_entries(f"{pre}.3.1", 2 * inner_ff, dim, bias=False),
                *linear_entries(f"{pre}.3.4", dim, inner_ff, bias=False)]
    return out + scale_norm_entries(f"{prefix}.norm_out", dim)


def continuous_position_bias_entries(prefix: str, dim: int, heads: int, num_dims: int,
                                     layers: int = 2) -> list[Entry]:
    out = []
    for n in range(layers):
        out += linear_entries(f"{prefix}.net.{n}.0", dim, num_dims if n == 0 else dim)
    return out + linear_entries(f"{prefix}.net.{layers}", heads, dim)


def check_constants(sd: Mapping[str, np.ndarray], manifest: list[Entry], source: str) -> list[str]:
    """Validate the keys that are constants in GenerateCT; return notes for harmless deviations
    (an unused self-attention `context_norm`), raise a UserError listing the others."""
    notes, bad = [], []
    for e in manifest:
        if e.constant is None or e.key not in sd:
            continue
        v = np.asarray(sd[e.key])
        if tuple(v.shape) != e.shape:
            bad.append(f"{e.key}: shape {tuple(v.shape)}, expected {e.shape}")
        elif not np.all(v == e.constant):
            # context_norm of self-attention is never used by GenerateCT's forward: only a note.
            (notes if ".context_norm." in e.key else bad).append(
                f"{e.key}: not the constant {e.constant} GenerateCT keeps there")
    if bad:
        raise UserError(f"{source}: these keys must hold GenerateCT's constants:\n  " + "\n  ".join(bad))
    return notes
