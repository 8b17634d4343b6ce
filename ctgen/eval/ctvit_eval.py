"""Reconstruct CT volumes (NIfTI) with a CT-ViT and report PSNR / SSIM, per file.

    python -m ctgen.eval.ctvit_eval --model runs/ctvit --input scan1.nii.gz scan2.nii.gz --slices 33 --out eval_out/

(The same volumes also feed the stage's eval: `ctgen eval --config configs/ctvit.py:paper
--weights DIR --config.data.eval_nifti=scan1.nii.gz,scan2.nii.gz`, which prints mean metrics.)

--model: a training workdir, a CT-ViT directory (`ctgen import`), or a GenerateCT/ctgen weights
file. Each volume is read with its geometry, put in canonical orientation, clipped to
[-1000, 1000] HU and scaled to [-1, 1], resized in-plane to the model's slice size (by array
size, as GenerateCT does), and cut to a centred window of --slices slices (default: as many as
the volume has, made odd, up to the model's max_slices). Metrics are computed in [-1, 1]
(data range 2). With --out, a preview PNG and the reconstruction as NIfTI (HU) are written per input.
"""
from __future__ import annotations

import argparse
import logging
import os

import jax
import numpy as np
from flax import nnx

from ctgen.data.pipelines import select_slices
from ctgen.data.preprocess import HU_MAX, HU_MIN, hu_to_model, model_to_hu, resize_volume, to_canonical
from ctgen.errors import UserError
from ctgen.eval.image_metrics import psnr, ssim
from ctgen.io.nifti import read_nifti, write_nifti

log = logging.getLogger(__name__)


def load_for_ctvit(path: str, image_size: int, num_slices: int | None, max_slices: int, pt: int = 2):
    """(volume (F, S, S) in [-1, 1], spacing (D, H, W) mm of the returned grid) for one NIfTI file."""
    nii = read_nifti(path)
    hu, spacing, _ = to_canonical(nii.data_ijk, nii.affine, nii.spacing_ijk)
    d, h, w = hu.shape
    vol = resize_volume(np.clip(hu, HU_MIN, HU_MAX), (d, image_size, image_size))
    spacing = np.asarray([spacing[0], spacing[1] * h / image_size, spacing[2] * w / image_size], np.float32)
    if num_slices is None:
        num_slices = min(d if (d - 1) % pt == 0 else d - (d - 1) % pt, max_slices)
    if num_slices < 1 or (num_slices - 1) % pt:
        raise UserError(f"--slices must be 1 + a multiple of {pt}, got {num_slices}")
    if num_slices > max_slices:
        raise UserError(f"--slices {num_slices} exceeds the model's max_slices={max_slices}")
    vol = select_slices(vol, num_slices, "center", None, fill=HU_MIN)
    return hu_to_model(vol).astype(np.float32), spacing


class NiftiEvalData:
    """Eval batches from NIfTI files for the CT-ViT stage (`data.eval_nifti`): every volume cut or
    padded to `num_slices`; batches of `global_batch` volumes (the last padded with repeats marked
    invalid), this host's rows only."""

    def __init__(self, paths: list[str], cfg, num_slices: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch % process_count:
            raise UserError(f"eval batch size {global_batch} is not divisible by {process_count} processes")
        self.paths, self.cfg, self.num_slices = list(paths), cfg, num_slices
        self.batch, self.pi, self.pc = global_batch, process_index, process_count

    def __iter__(self):
        cfg = self.cfg
        local = self.batch // self.pc
        for start in range(0, len(self.paths), self.batch):
            chunk = self.paths[start:start + self.batch]
            valid = [True] * len(chunk) + [False] * (self.batch - len(chunk))
            chunk = chunk + [chunk[-1]] * (self.batch - len(chunk))
            rows = slice(self.pi * local, (self.pi + 1) * local)
            loaded = {p: load_for_ctvit(p, cfg.image_size, self.num_slices, cfg.max_slices,
                                        cfg.temporal_patch_size)[0] for p in dict.fromkeys(chunk[rows])}
            vols = [loaded[p] for p in chunk[rows]]
            names = [os.path.basename(p) for p in chunk[rows]]
            yield {"volume": np.stack(vols), "valid": np.asarray(valid[rows]), "source_id": np.asarray(names)}


def evaluate_files(model, paths: list[str], num_slices: int | None = None, out_dir: str | None = None) -> list[dict]:
    """Reconstruct each file; returns [{file, slices, psnr, ssim}] (and writes previews if out_dir)."""
    cfg = model.cfg
    reconstruct = nnx.jit(lambda m, v: m.reconstruct(v))
    rows = []
    for path in paths:
        vol, spacing = load_for_ctvit(path, cfg.image_size, num_slices, cfg.max_slices, cfg.temporal_patch_size)
        rec = np.asarray(jax.device_get(reconstruct(model, vol[None])))[0]
        rec_c = np.clip(rec, -1.0, 1.0)
        row = {"file": path, "slices": vol.shape[0], "psnr": float(psnr(rec_c[None], vol[None])[0]),
               "ssim": float(ssim(rec_c[None], vol[None])[0])}
        rows.append(row)
        if out_dir:
            from ctgen.stages.ctvit_preview import write_three_planes

            stem = os.path.basename(path).replace(".nii.gz", "").replace(".nii", "")
            os.makedirs(out_dir, exist_ok=True)
            write_three_planes(os.path.join(out_dir, f"{stem}_ctvit.png"), vol, rec, title=stem)
            write_nifti(os.path.join(out_dir, f"{stem}_ctvit_recon.nii.gz"), model_to_hu(rec_c), spacing)
    return rows


def _run(args, overrides=None) -> int:
    from ctgen.convert.ctvit_store import load_ctvit

    model = load_ctvit(args.model)
    rows = evaluate_files(model, args.input, args.slices, args.out)
    for r in rows:
        print(f"{r['file']}: {r['slices']} slices  PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}")
    if len(rows) > 1:
        print(f"mean: PSNR {np.mean([r['psnr'] for r in rows]):.2f} dB  SSIM {np.mean([r['ssim'] for r in rows]):.4f}")
    return 0


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="workdir, CT-ViT weights directory or weights file")
    p.add_argument("--input", required=True, nargs="+", help="NIfTI volumes (.nii / .nii.gz)")
    p.add_argument("--slices", type=int, default=None, help="centred window of 1+2k slices")
    p.add_argument("--out", default=None, help="directory for preview PNGs and reconstructed NIfTIs")
    p.set_defaults(func=_run)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `ctvit-nifti` to a subparsers object (e.g. of `ctgen eval`)."""
    return configure(subparsers.add_parser("ctvit-nifti", help="CT-ViT reconstruction PSNR/SSIM of NIfTI volumes",
                                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv=None) -> int:
    """`python -m ctgen.eval.ctvit_eval --model M --input a.nii.gz ...`"""
    parser = configure(argparse.ArgumentParser(prog="python -m ctgen.eval.ctvit_eval", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
