"""`ctgen prepare --source sr-pairs`: load the frozen CT-ViT, shard its reconstruction over all local
devices, and let `ctgen.data.sr_pairs` write the reconstructions of a prepared dataset."""
from __future__ import annotations

import argparse
from typing import Callable

import jax
import numpy as np
from flax import nnx

from ctgen.data.sr_pairs import build_sr_pairs
from ctgen.errors import UserError
from ctgen.parallel import axes as axes_lib
from ctgen.parallel.mesh import batch_shards, make_mesh


def ctvit_reconstructor(tokenizer: str, mesh=None, rules=None) -> tuple[int, int, Callable[[np.ndarray], np.ndarray]]:
    """(the CT-ViT's image size, volumes per call = the mesh's batch shards, a jitted reconstruction
    of (B, D, s, s) volumes in [-1, 1] split over the mesh's batch axes) for the CT-ViT at
    `tokenizer` (workdir, weights directory or GenerateCT file). Default mesh: every local device
    on the data axis."""
    from ctgen.convert.ctvit_store import load_ctvit

    if mesh is None and jax.local_device_count() > 1:
        mesh = make_mesh({"data": -1})
    rules = tuple(rules or axes_lib.DEFAULT_RULES)
    model = load_ctvit(tokenizer, mesh=mesh, rules=rules)

    @nnx.jit
    def run(model, x):
        with axes_lib.activation_sharding(mesh, rules):
            return model.reconstruct(x)

    def call(x_np: np.ndarray) -> np.ndarray:
        x = jax.device_put(x_np, axes_lib.logical_sharding(("batch", None, None, None), x_np.shape, rules, mesh)) \
            if mesh is not None else x_np
        return np.asarray(jax.device_get(run(model, x)))

    return model.cfg.image_size, batch_shards(mesh, rules), call


def run_prepare(args: argparse.Namespace) -> int:
    """`ctgen prepare --source sr-pairs --dataset DIR --tokenizer CTVIT --out DIR [--lowres-size N] [--split S]`."""
    if not getattr(args, "dataset", None) or not getattr(args, "tokenizer", None):
        raise UserError("--source sr-pairs needs --dataset DIR (a prepared dataset) and --tokenizer (a CT-ViT)")
    if jax.process_count() > 1:
        raise UserError("make SR pairs in a single process (it writes one dataset); it shards over that host's devices")
    size, per_call, reconstruct = ctvit_reconstructor(args.tokenizer)
    if args.lowres_size and args.lowres_size != size:
        raise UserError(f"--lowres-size {args.lowres_size}: the CT-ViT at {args.tokenizer} takes {size}x{size} slices")
    out = build_sr_pairs(args.dataset, args.out, reconstruct, size, per_call=per_call, split=args.split,
                         overwrite=args.overwrite, progress=not args.no_progress, model_name=args.tokenizer)
    print(f"wrote CT-ViT reconstructions for super-resolution to {out}")
    return 0
