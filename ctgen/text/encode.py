"""`encode_text`: prompts -> zero-padded T5 states and mask, jitted, batched, optionally mesh-sharded.

GenerateCT's convention (its `tm/t5.py`): tokenize with `padding="longest"`, truncate at 256
tokens, take the encoder's last hidden state and set padded positions to 0. `encode_text`
returns exactly that, as float32 `[B, L_longest, d_model]` plus the bool mask `[B, L_longest]`.

Internally the length is rounded up to a multiple of `LENGTH_BUCKET` and the batch to a multiple
of the mesh's batch shards (extra keys are masked, extra rows dropped), so a stream of batches
compiles a handful of shapes, not one per batch. Masked keys get exactly zero attention weight,
so the rounding does not change any real position's output.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ctgen.errors import UserError
from ctgen.parallel.axes import DEFAULT_RULES, activation_sharding, logical_sharding, state_shardings
from ctgen.parallel.mesh import batch_shards
from ctgen.text.t5 import T5Encoder
from ctgen.text.tokenizer import T5Tokenizer

log = logging.getLogger(__name__)
LENGTH_BUCKET = 16


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _hashable_rules(rules) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in (rules or DEFAULT_RULES))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"))
def _encode_padded(graphdef, state, ids_BxL, mask_BxL, *, mesh, rules):
    model = nnx.merge(graphdef, state)
    with activation_sharding(mesh, rules):
        x_BxLxD = model(ids_BxL, mask_BxL)
    return jnp.where(mask_BxL[:, :, None], x_BxLxD, 0.0)


def place_on_mesh(model: T5Encoder, mesh: Mesh, rules=None) -> T5Encoder:
    """Move the model's parameters onto `mesh`, sharded by their logical axes (no-op if already there)."""
    rules = _hashable_rules(rules)
    state = nnx.state(model)
    want = state_shardings(state, rules, mesh)
    have = jax.tree.map(lambda x: getattr(x, "sharding", None), state)
    if jax.tree.leaves(have) != jax.tree.leaves(want):
        nnx.update(model, jax.device_put(state, want))
    return model


def encode_ids(
    model: T5Encoder, ids_BxL: np.ndarray, mask_BxL: np.ndarray, *,
    mesh: Mesh | None = None, rules=None, batch_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Encode already-tokenized ids; see `encode_text`."""
    ids_BxL, mask_BxL = np.asarray(ids_BxL, np.int32), np.asarray(mask_BxL, bool)
    if ids_BxL.ndim != 2 or ids_BxL.shape != mask_BxL.shape or ids_BxL.size == 0:
        raise UserError(f"ids and mask must be equal non-empty [batch, length] arrays, got {ids_BxL.shape} "
                         f"and {mask_BxL.shape}")
    vocab = model.config.vocab_size
    if ids_BxL.min() < 0 or ids_BxL.max() >= vocab:
        raise UserError(f"token ids must lie in [0, {vocab}); got [{ids_BxL.min()}, {ids_BxL.max()}] "
                         "(does the tokenizer belong to this model?)")
    if not mask_BxL.any(axis=1).all():
        raise UserError("every row needs at least one real token (an all-padding row has nothing to attend to)")
    rules = _hashable_rules(rules)
    b, l = ids_BxL.shape
    chunk = _round_up(batch_size or b, batch_shards(mesh, rules or DEFAULT_RULES))
    padded_l = _round_up(l, LENGTH_BUCKET)
    padded_b = _round_up(b, chunk)
    ids = np.zeros((padded_b, padded_l), np.int32)
    mask = np.zeros((padded_b, padded_l), bool)
    ids[:b, :l], mask[:b, :l] = ids_BxL, mask_BxL
    mask[b:, 0] = True  # filler rows attend to one pad token; they are dropped below
    if mesh is not None:
        place_on_mesh(model, mesh, rules)
    graphdef, state = nnx.split(model)
    outs = []
    for start in range(0, padded_b, chunk):
        ids_c, mask_c = ids[start:start + chunk], mask[start:start + chunk]
        if mesh is not None:
            s = logical_sharding(("batch", "length"), ids_c.shape, rules, mesh)
            ids_c = jax.make_array_from_callback(ids_c.shape, s, lambda i, a=ids_c: a[i])
            mask_c = jax.make_array_from_callback(mask_c.shape, s, lambda i, a=mask_c: a[i])
        outs.append(_encode_padded(graphdef, state, ids_c, mask_c, mesh=mesh, rules=rules if mesh else None))
    emb = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return emb[:b, :l], jnp.asarray(mask_BxL)


def encode_text(
    model: T5Encoder, tokenizer: T5Tokenizer, texts: Sequence[str | bytes], *,
    max_length: int = 256, mesh: Mesh | None = None, rules=None, batch_size: int | None = None,
    allow_empty: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Prompts -> (`emb_BxLxD` float32 with padded positions zeroed, `mask_BxL` bool).

    L is the longest tokenized prompt (EOS included), at most `max_length`; longer prompts keep
    their first `max_length - 1` pieces plus EOS. `mesh`/`rules`: shard the batch (and the
    parameters, by their logical axes) over the mesh. `batch_size`: encode in chunks of this
    many prompts (bounded memory; one compiled shape). Empty or whitespace-only prompts raise
    `ValueError` unless `allow_empty` (then they encode as the lone EOS token, as transformers).
    """
    ids_BxL, mask_BxL = tokenizer.batch_encode(texts, max_length=max_length, allow_empty=allow_empty)
    return encode_ids(model, ids_BxL, mask_BxL, mesh=mesh, rules=rules, batch_size=batch_size)


def encode_text_to_length(
    model: T5Encoder, tokenizer: T5Tokenizer, texts: Sequence[str | bytes], length: int, *,
    mesh: Mesh | None = None, rules=None,
) -> tuple[np.ndarray, np.ndarray]:
    """`encode_text` zero-padded to exactly `length` tokens, on the host: (B, length, D) float32 and
    mask (B, length) bool. One shape whatever the prompts' lengths (one compile downstream), and a
    prompt's states never depend on the other prompts of the call."""
    emb, mask = encode_text(model, tokenizer, texts, max_length=length, mesh=mesh, rules=rules)
    emb, mask = np.asarray(jax.device_get(emb)), np.asarray(jax.device_get(mask))
    text = np.zeros((len(texts), length, emb.shape[-1]), np.float32)
    full = np.zeros((len(texts), length), bool)
    text[:, : emb.shape[1]], full[:, : mask.shape[1]] = emb, mask
    return text, full
