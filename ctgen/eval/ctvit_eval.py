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
import os

import jax
import numpy as np
from flax import nnx

from ctgen.data.pipelines import host_batch_size, select_slices
from ctgen.data.preprocess import resize_volume
from ctgen.errors import UserError
from ctgen.eval.image_metrics import psnr, ssim
from ctgen.io.nifti import read_nifti, write_nifti
from ctgen.models.ctvit import CTViTConfig
from ctgen.volume import HU_MIN, clip_hu, hu_to_model, model_to_hu, to_canonical


def load_for_ctvit(path: str, cfg: CTViTConfig, num_slices: int | None = None):
    """(volume (F, S, S) in [-1, 1], spacing (D, H, W) mm of the returned grid) for one NIfTI file,
    for a CT-ViT of architecture `cfg`. num_slices=None: as many as the file has (made 1 + a multiple
    of the temporal patch size), at most cfg.max_slices."""
    nii = read_nifti(path)
    hu, spacing, _ = to_canonical(nii.data_ijk, nii.affine, nii.spacing_ijk)
    d, h, w = hu.shape
    s = cfg.image_size
    vol = resize_volume(clip_hu(hu), (d, s, s))
    spacing = np.asarray([spacing[0], spacing[1] * h / s, spacing[2] * w / s], np.float32)
    if num_slices is None:
        num_slices = min(cfg.num_slices(cfg.num_groups(d)), cfg.max_slices)
    try:
        cfg.check_volume_shape((1, num_slices, s, s))
    except ValueError as err:
        raise UserError(f"cannot use {num_slices} slices of {path}: {err}") from None
    vol = select_slices(vol, num_slices, "center", None, fill=HU_MIN)
    return hu_to_model(vol).astype(np.float32), spacing


class NiftiEvalData:
    """Eval batches from NIfTI files for the CT-ViT stage (`data.eval_nifti`): every volume cut or
    padded to `num_slices`; batches of `global_batch` volumes (the last padded with repeats marked
    invalid), this host's rows only."""

    def __init__(self, paths: list[str], cfg: CTViTConfig, num_slices: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1):
        self.local = host_batch_size(global_batch, process_count)
        self.paths, self.cfg, self.num_slices = list(paths), cfg, num_slices
        self.batch, self.pi, self.pc = global_batch, process_index, process_count

    def __iter__(self):
        local = self.local
        for start in range(0, len(self.paths), self.batch):
            chunk = self.paths[start:start + self.batch]
            valid = [True] * len(chunk) + [False] * (self.batch - len(chunk))
            chunk = chunk + [chunk[-1]] * (self.batch - len(chunk))
            rows = slice(self.pi * local, (self.pi + 1) * local)
            loaded = {p: load_for_ctvit(p, self.cfg, self.num_slices)[0] for p in dict.fromkeys(chunk[rows])}
            vols = [loaded[p] for p in chunk[rows]]
            names = [os.path.basename(p) for p in chunk[rows]]
            yield {"volume": np.stack(vols), "valid": np.asarray(valid[rows]), "source_id": np.asarray(names)}


def evaluate_files(model, paths: list[str], num_slices: int | None = None, out_dir: str | None = None) -> list[dict]:
    """Reconstruct each file; returns [{file, slices, psnr, ssim}] (and writes previews if out_dir)."""
    cfg = model.cfg
    reconstruct = nnx.jit(lambda m, v: m.reconstruct(v))
    rows = []
    for path in paths:
        vol, spacing = load_for_ctvit(path, cfg, num_slices)
        rec = np.asarray(jax.device_get(reconstruct(model, vol[None])))[0]
        rec_c = np.clip(rec, -1.0, 1.0)
        row = {"file": path, "slices": vol.shape[0], "psnr": float(psnr(rec_c[None], vol[None])[0]),
               "ssim": float(ssim(rec_c[None], vol[None])[0])}
        rows.append(row)
        if out_dir:
            from ctgen.io.preview import write_three_planes

            stem = os.path.basename(path).replace(".nii.gz", "").replace(".nii", "")
            os.makedirs(out_dir, exist_ok=True)
            write_three_planes(os.path.join(out_dir, f"{stem}_ctvit.png"), vol, rec, title=stem)
            write_nifti(os.path.join(out_dir, f"{stem}_ctvit_recon.nii.gz"), model_to_hu(rec_c), spacing)
    return rows


def main(argv=None) -> int:
    """`python -m ctgen.eval.ctvit_eval --model M --input a.nii.gz ...`"""
    p = argparse.ArgumentParser(prog="python -m ctgen.eval.ctvit_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="workdir, CT-ViT weights directory or weights file")
    p.add_argument("--input", required=True, nargs="+", help="NIfTI volumes (.nii / .nii.gz)")
    p.add_argument("--slices", type=int, default=None, help="centred window of 1+2k slices")
    p.add_argument("--out", default=None, help="directory for preview PNGs and reconstructed NIfTIs")
    args = p.parse_args(argv)
    from ctgen.convert.ctvit_store import load_ctvit

    model = load_ctvit(args.model)
    rows = evaluate_files(model, args.input, args.slices, args.out)
    for r in rows:
        print(f"{r['file']}: {r['slices']} slices  PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}")
    if len(rows) > 1:
        print(f"mean: PSNR {np.mean([r['psnr'] for r in rows]):.2f} dB  SSIM {np.mean([r['ssim'] for r in rows]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
