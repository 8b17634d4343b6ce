"""`ctgen prepare --source tokens`: load the frozen CT-ViT, shard its encoder over all local devices,
and let `ctgen.data.tokens` write the codebook ids of a prepared dataset (the data layer never
imports models)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctgen.data.tokens import build_token_dataset
from ctgen.errors import UserError
from ctgen.parallel import axes as axes_lib
from ctgen.parallel.mesh import make_mesh


@dataclasses.dataclass
class CTViTEncoder:
    """`ctgen.data.tokens.TokenEncoder` of a loaded CT-ViT: `batch_size` volumes per call (a multiple
    of the local devices), split over a data mesh with the model replicated."""

    cfg: Any
    batch_size: int
    encode: Callable[[np.ndarray], np.ndarray]

    def __call__(self, volumes_BxFxHxW: np.ndarray) -> np.ndarray:
        return self.encode(volumes_BxFxHxW)


def ctvit_encoder(tokenizer: str, batch_size: int = 8) -> CTViTEncoder:
    """The encoder of the CT-ViT at `tokenizer` (weights directory, ctvit workdir or GenerateCT file)
    over every local device."""
    from ctgen.convert.ctvit_store import load_ctvit

    devices = jax.local_devices()
    mesh = make_mesh({"data": -1}, devices)
    model = load_ctvit(tokenizer, mesh=mesh)
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, vol_BxFxHxW):
        return nnx.merge(graphdef, state).encode(vol_BxFxHxW).astype(jnp.int16)

    def call(batch: np.ndarray) -> np.ndarray:
        sharding = axes_lib.logical_sharding(("batch", None, None, None), batch.shape, axes_lib.DEFAULT_RULES, mesh)
        return np.asarray(encode(state, jax.device_put(batch, sharding)))

    chunk = -(-max(batch_size, 1) // len(devices)) * len(devices)
    return CTViTEncoder(model.cfg, chunk, call)


def run_prepare(args: argparse.Namespace) -> int:
    """`ctgen prepare --source tokens --dataset DIR --tokenizer CTVIT --out DIR [--token-slices N] [--split S]`."""
    if not getattr(args, "dataset", None) or not getattr(args, "tokenizer", None):
        raise UserError("--source tokens needs --dataset DIR (a prepared dataset) and --tokenizer PATH (a CT-ViT)")
    if jax.process_count() > 1:
        raise UserError("build the token dataset in a single process (it writes one dataset); on a multi-host pod "
                        "run it on one host, which shards encoding over that host's devices")
    out = build_token_dataset(args.dataset, args.out, ctvit_encoder(args.tokenizer, args.token_batch_size),
                              split=args.split, num_slices=args.token_slices, overwrite=args.overwrite,
                              tokenizer_name=args.tokenizer, progress=not getattr(args, "no_progress", False))
    print(f"wrote CT-ViT token dataset to {out}")
    return 0
