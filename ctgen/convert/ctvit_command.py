"""`ctgen export ctvit` and `ctgen import generatect-ctvit`, also callable from Python.

    ctgen export ctvit --workdir runs/ctvit --out ctvit.pt          # GenerateCT CTViT.load-able
    ctgen export ctvit --workdir runs/ctvit --out ctvit.safetensors
    ctgen import generatect-ctvit ctvit_pretrained.pt --out models/ctvit_pretrained
    ctgen import generatect-ctvit transformer_pretrained.pt --out models/ctvit_from_transformer

`--workdir` of export accepts a training workdir (latest checkpoint), a weights directory written
by import, or a GenerateCT/ctgen weights file. The import writes a ctgen weights directory
(parameters + VQ codebook, architecture recorded in its marker file): use it as
`--config.init_from=DIR` (with a 379-key checkpoint this also brings the VGG16, which turns the
perceptual loss on, and the discriminator), as `ctgen eval --weights DIR`, or as the tokenizer
of later stages (which read only the autoencoder from it).
"""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def export_workdir(workdir: str, out: str) -> int:
    """Export the CT-ViT at `workdir` (see module docstring) to `out` (.pt or .safetensors)."""
    # Imported here, not at the top: `ctgen export --help` must not import JAX.
    from ctgen.convert.ctvit import export_ctvit
    from ctgen.convert.ctvit_store import load_ctvit_state

    cfg, nets, states = load_ctvit_state(workdir)
    n = export_ctvit(states, out, cfg, nets)
    log.info("wrote %s: %d GenerateCT CTViT keys (%s)", out, n,
             "with vgg.* and discr.*" if nets else "without vgg/discr: CTViT(use_vgg_and_gan=False)")
    return n


def import_to_dir(path: str, out: str, *, image_size: int | None = None, max_slices: int = 201) -> str:
    """Import a GenerateCT CT-ViT file into a ctgen CT-ViT directory; returns a summary line."""
    from ctgen.convert.ctvit import import_generatect_ctvit
    from ctgen.convert.ctvit_store import save_ctvit_dir

    overrides = {"max_slices": max_slices}
    if image_size:
        overrides["image_size"] = image_size
    result = import_generatect_ctvit(path, **overrides)
    loss_nets = {k: v for k, v in result.states.items() if k != "ctvit"}
    save_ctvit_dir(out, result.config, result.state, nets=result.nets, loss_nets=loss_nets, info={"source": path})
    c = result.config
    lines = [f"imported {path} -> {out}", result.report.describe(),
             f"architecture: dim {c.dim}, codebook {c.codebook_size}, {c.image_size}x{c.image_size}, "
             f"patch {c.patch_size}x{c.temporal_patch_size}, depth {c.spatial_depth}+{c.temporal_depth}, "
             f"{c.heads} heads x {c.dim_head}, vgg/discriminator: {'yes' if result.nets else 'no'}"]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _run_export(args, overrides=None) -> int:
    export_workdir(args.workdir, args.out)
    print(f"wrote {args.out}")
    return 0


def _run_import(args, overrides=None) -> int:
    print(import_to_dir(args.file, args.out, image_size=args.image_size, max_slices=args.max_slices))
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add `ctvit` to the subparsers of `ctgen export`."""
    p = subparsers.add_parser("ctvit", help="CT-ViT -> GenerateCT CTViT state_dict (.pt or .safetensors)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training workdir, CT-ViT directory, or weights file")
    p.add_argument("--out", required=True, help="output file: .pt (torch.save of a plain state_dict) or .safetensors")
    p.set_defaults(func=_run_export)
    return p


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    """Add `generatect-ctvit` to the subparsers of `ctgen import`."""
    p = subparsers.add_parser("generatect-ctvit", help="GenerateCT ctvit_pretrained.pt / transformer_pretrained.pt",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="GenerateCT .pt (read with weights_only=True) or .safetensors")
    p.add_argument("--out", required=True, help="output CT-ViT directory")
    p.add_argument("--image-size", type=int, default=None,
                   help="slice size when the file has no discriminator to infer it from (default 128)")
    p.add_argument("--max-slices", type=int, default=201, help="longest volume the model will accept")
    p.set_defaults(func=_run_import)
    return p
