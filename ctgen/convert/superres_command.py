"""`ctgen export superres` and `ctgen import generatect-superres`, also callable from Python.

    ctgen export superres --workdir runs/superres --out superres.pt           # GenerateCT trainer checkpoint
    ctgen export superres --workdir runs/superres --out superres_unet.safetensors   # Unet weights only
    ctgen import generatect-superres superres_pretrained.pt --out models/superres_pretrained

`--workdir` of export accepts a training workdir (latest checkpoint: live weights and their EMA),
a weights directory written by import, or a GenerateCT/ctgen weights file. The `.pt` export is
what GenerateCT's `SuperResolutionTrainer.load` (and so `inference_superres.py`) reads: `model`
holds the live weights, `ema.1.ema_model` the EMA weights it samples with (the live ones again
when the run kept no EMA), `steps` and `time_elapsed`; no optimizer state. The `.safetensors`
export is the `Unet` state_dict of the weights meant for sampling.

Import reads `.pt` with `torch.load(weights_only=True)` (never unpickling objects) or
`.safetensors`, takes the EMA weights of a trainer checkpoint unless `--live` is given (and says
which it used), infers the architecture from the shapes, and writes a ctgen weights directory:
use it for sampling (`ctgen.convert.superres_store.load_superres`), as `--config.init_from`,
or as `ctgen eval --weights`.
"""
from __future__ import annotations

import argparse


def _run_export(args, overrides=None) -> int:
    from ctgen.convert.superres_store import export_superres

    print(export_superres(args.workdir, args.out))
    return 0


def _run_import(args, overrides=None) -> int:
    from ctgen.convert.superres_store import import_to_dir

    print(import_to_dir(args.file, args.out, prefer_ema=not args.live, resnet_groups=args.resnet_groups))
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add `superres` to the subparsers of `ctgen export`."""
    p = subparsers.add_parser("superres", help="SR U-Net -> GenerateCT trainer checkpoint (.pt) or Unet (.safetensors)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training workdir, SR weights directory, or weights file")
    p.add_argument("--out", required=True, help="output file: .pt (trainer checkpoint) or .safetensors (Unet)")
    p.set_defaults(func=_run_export)
    return p


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    """Add `generatect-superres` to the subparsers of `ctgen import`."""
    p = subparsers.add_parser("generatect-superres", help="GenerateCT superres_pretrained.pt (or Unet weights)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="GenerateCT .pt (read with weights_only=True) or .safetensors")
    p.add_argument("--out", required=True, help="output weights directory")
    p.add_argument("--live", action="store_true", help="take a trainer checkpoint's live weights, not its EMA")
    p.add_argument("--resnet-groups", type=int, default=8,
                   help="GroupNorm groups (not stored in the weights; GenerateCT uses 8)")
    p.set_defaults(func=_run_import)
    return p
