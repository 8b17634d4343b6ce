"""`ctgen export maskgit` and `ctgen import generatect-transformer`: MaskGIT weights <-> GenerateCT.

    ctgen export maskgit --workdir runs/maskgit --out transformer.pt          # or .safetensors
    ctgen import generatect-transformer transformer_pretrained.pt --out models/maskgit

Export writes GenerateCT's `MaskGITTransformer` state_dict: the CT-ViT (`ctvit.*`, 289 keys) and
the transformer (`maskgit.*`, 168 keys) that its strict `load` expects. --workdir accepts a
training workdir (latest checkpoint; the CT-ViT is its config's tokenizer.weights) or a weights
directory written by import (the CT-ViT it records); --tokenizer names another CT-ViT.
Import reads `transformer_pretrained.pt` with torch.load(weights_only=True) (or a .safetensors
export), writes the transformer as a ctgen weights directory OUT and its `ctvit.*` block as the
CT-ViT weights directory OUT/tokenizer, which OUT's marker names: use OUT as `--config.init_from`
of `configs/maskgit.py` with `--config.tokenizer.weights=OUT/tokenizer`, or for generation.
"""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def export_workdir(workdir: str, out: str, tokenizer: str = "") -> int:
    """Export the MaskGIT at `workdir` and its tokenizer to `out` (.pt or .safetensors)."""
    # Imported here, not at the top: `ctgen export --help` must not import JAX.
    from ctgen.convert.ctvit_store import load_ctvit_state
    from ctgen.convert.maskgit import export_maskgit
    from ctgen.convert.maskgit_store import load_maskgit_state, tokenizer_path
    from ctgen.errors import UserError

    tokenizer = tokenizer or tokenizer_path(workdir)
    if not tokenizer:
        raise UserError(f"{workdir} records no CT-ViT tokenizer, and GenerateCT's MaskGITTransformer needs one "
                        "(ctvit.*): pass --tokenizer PATH")
    cfg, state = load_maskgit_state(workdir)
    ctvit_cfg, _, ctvit = load_ctvit_state(tokenizer)
    n = export_maskgit(state, cfg, ctvit["ctvit"], ctvit_cfg, out)
    log.info("wrote %s: %d GenerateCT MaskGITTransformer keys (CT-ViT from %s)", out, n, tokenizer)
    return n


def import_to_dir(path: str, out: str) -> str:
    """Import a GenerateCT transformer file into OUT (MaskGIT) and OUT/tokenizer (its CT-ViT);
    returns a summary."""
    from ctgen.convert.ctvit_store import save_ctvit_dir
    from ctgen.convert.maskgit import import_generatect_maskgit
    from ctgen.convert.maskgit_store import TOKENIZER_DIR, save_maskgit_dir

    result = import_generatect_maskgit(path)
    tok = result.tokenizer
    if tok is not None:
        save_ctvit_dir(os.path.join(out, TOKENIZER_DIR), tok.config, tok.state, info={"source": path})
    save_maskgit_dir(out, result.config, result.state, tokenizer=TOKENIZER_DIR if tok is not None else "",
                     info={"source": path, "layout": "generatect"})
    c = result.config
    lines = [f"imported {path} -> {out}", result.report.describe(),
             f"MaskGIT: {c.num_tokens} codes, dim {c.dim}, depth {c.depth}, {c.heads} heads x {c.dim_head}, "
             f"text width {c.dim_context}, positions {c.max_seq_len}"]
    if tok is not None:
        lines.append(f"CT-ViT tokenizer -> {os.path.join(out, TOKENIZER_DIR)} "
                     f"({tok.report.describe().splitlines()[0]})")
    else:
        lines.append("no ctvit.* block in the file: no tokenizer imported")
    lines += [f"note: {n}" for n in result.notes + (tok.notes if tok is not None else [])]
    return "\n".join(lines)


def _run_export(args, overrides=None) -> int:
    export_workdir(args.workdir, args.out, args.tokenizer)
    print(f"wrote {args.out}")
    return 0


def _run_import(args, overrides=None) -> int:
    print(import_to_dir(args.file, args.out))
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add `maskgit` to the subparsers of `ctgen export`."""
    p = subparsers.add_parser("maskgit", help="MaskGIT + its CT-ViT -> GenerateCT MaskGITTransformer state_dict",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training workdir or MaskGIT weights directory")
    p.add_argument("--out", required=True, help="output file: .pt (torch.save of a plain state_dict) or .safetensors")
    p.add_argument("--tokenizer", default="",
                   help="the CT-ViT to export with it (default: the one the workdir records)")
    p.set_defaults(func=_run_export)
    return p


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    """Add `generatect-transformer` to the subparsers of `ctgen import`."""
    p = subparsers.add_parser("generatect-transformer",
                              help="GenerateCT transformer_pretrained.pt (MaskGIT + CT-ViT)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="GenerateCT .pt (read with weights_only=True) or .safetensors")
    p.add_argument("--out", required=True, help="output MaskGIT directory (its CT-ViT goes to OUT/tokenizer)")
    p.set_defaults(func=_run_import)
    return p
