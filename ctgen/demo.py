"""`ctgen demo`: the most complete real job the project has, end to end, on any machine.

Until text-to-CT generation exists (MaskGIT and super-resolution are not implemented yet), the
demo runs stage 1 of the cascade for real at toy scale:
  1. prepare a TFDS dataset of synthetic chest CT phantoms (reports, prompts, label maps);
  2. train a small CT-ViT tokenizer with GenerateCT's losses (reconstruction, commitment,
     adaptive-weight hinge GAN with a discriminator; the VGG perceptual loss is off because no
     ImageNet VGG16 weights can be downloaded) on all local devices;
  3. evaluate reconstruction PSNR/SSIM on the held-out phantoms and on real CT volumes, writing
     three-plane previews and the reconstructed volumes as NIfTI;
  4. export the weights in GenerateCT's `CTViT` state_dict layout (.safetensors).
Each step is resumable: running the demo again continues where it stopped.
The training runs the same config as `ctgen train`; `ctgen demo` prints the equivalent commands.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import time

from ctgen.configuration import load
from ctgen.errors import UserError

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CT = os.path.join(REPO, "tests", "data", "real_ct")


def demo_config_spec(args) -> str:
    """The `small` CT-ViT variant (a 64x64 grid with 8x8 patches: 8x8 tokens per slice, as in the
    paper's 128/16) at the demo's size and length."""
    return (f"configs/ctvit.py:small,res={args.resolution},slices={args.slices},batch={args.batch_size},"
            f"steps={args.steps}")


def demo_overrides(args, data_dir: str) -> list[tuple[str, str]]:
    """What the variant cannot know: the prepared dataset and a mesh over this machine's devices."""
    mesh = demo_mesh(args.batch_size)
    return [("data.dir", data_dir)] + [(f"mesh.{axis}", str(size)) for axis, size in mesh.items() if axis != "data"]


def demo_mesh(batch_size: int) -> dict[str, int]:
    """Use every local device: the batch over `fsdp` as far as it divides, the rest as `tensor`."""
    import math

    import jax

    n = jax.device_count()
    fsdp = math.gcd(batch_size, n)
    return {"data": 1, "fsdp": fsdp, "tensor": n // fsdp}


def run(args) -> int:
    from ctgen.data.features import DatasetConfig
    from ctgen.data.preprocess import GridConfig
    from ctgen.data.sources import PhantomSource
    from ctgen.data.writer import build
    from ctgen.stages import get_stage
    from ctgen.train.evaluate import evaluate
    from ctgen.train.loop import train

    if args.slices < 3 or (args.slices - 1) % 2:
        raise UserError(f"--slices must be 1 + 2k (CT-ViT's temporal patches), got {args.slices}")
    work = os.path.abspath(args.workdir)
    t0 = time.time()
    data_out = os.path.join(work, "data")
    grid = GridConfig(shape=(args.slices, args.resolution, args.resolution))
    name = f"phantom_{args.slices}x{args.resolution}x{args.resolution}"
    print(f"[1/4] preparing {args.phantoms} synthetic chest CT phantoms ({name}) in {data_out}")
    summary = build(PhantomSource(args.phantoms, args.seed, grid), DatasetConfig(name=name, grid=grid, phantom=True),
                    data_out, validation_fraction=0.1, num_workers=args.num_workers)
    data_dir = summary["path"]

    spec = demo_config_spec(args)
    overrides = demo_overrides(args, data_dir)
    config = load(os.path.join(REPO, spec), overrides)
    stage = get_stage(config)
    run_dir = os.path.join(work, "ctvit")
    cmd = f"ctgen train --config {spec} --workdir {run_dir} " + " ".join(f"--config.{k}={v}" for k, v in overrides)
    print(f"[2/4] training a CT-ViT for {args.steps} steps (equivalent: {cmd})")
    result = train(config, run_dir, stage)
    steps = result["final_step"]

    print("[3/4] evaluating reconstructions")
    metrics = {"validation_phantoms": evaluate(config, run_dir, stage,
                                               previews=os.path.join(work, "previews", "validation"))}
    real = sorted(glob.glob(os.path.join(REAL_CT, "*.nii.gz")))
    if real:
        from ctgen.convert.ctvit_store import load_ctvit
        from ctgen.eval.ctvit_eval import evaluate_files

        rows = evaluate_files(load_ctvit(run_dir), real, args.slices, os.path.join(work, "real_ct"))
        metrics["real_ct"] = rows
    else:
        log.warning("no real CT volumes at %s (they ship with the source checkout); skipped", REAL_CT)

    print("[4/4] exporting GenerateCT-layout weights")
    from ctgen.convert.ctvit_command import export_workdir

    export = os.path.join(work, "ctvit_generatect.safetensors")
    n_keys = export_workdir(run_dir, export)

    with open(os.path.join(work, "demo_summary.json"), "w", encoding="utf-8") as f:
        json.dump({"steps": steps, "metrics": metrics, "export": export, "keys": n_keys,
                   "minutes": (time.time() - t0) / 60}, f, indent=2)
    v = metrics["validation_phantoms"]
    print(f"\ndone in {(time.time() - t0) / 60:.1f} min. CT-ViT after {steps} steps:")
    print(f"  held-out phantoms: PSNR {v.get('psnr', float('nan')):.2f} dB, SSIM {v.get('ssim', float('nan')):.3f}")
    for row in metrics.get("real_ct", []):
        print(f"  {os.path.basename(row['file'])}: {row['slices']} slices, PSNR {row['psnr']:.2f} dB, "
              f"SSIM {row['ssim']:.3f}")
    print(f"  previews (input vs reconstruction, three planes): {run_dir}/previews, {work}/previews, {work}/real_ct")
    print(f"  metrics: {run_dir}/metrics.jsonl (tensorboard --logdir {run_dir})")
    print(f"  reconstructed real volumes (NIfTI, HU): {work}/real_ct")
    print(f"  GenerateCT CTViT state_dict ({n_keys} keys): {export}")
    print("  (a toy-scale run of the real pipeline: expect blurry reconstructions, not diagnostic quality)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="example: phantoms -> CT-ViT training -> eval -> export (stage 1)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where everything goes (default runs/demo)")
    p.add_argument("--phantoms", type=int, default=64, help="number of synthetic studies")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=4, help="global batch (volumes)")
    p.add_argument("--resolution", type=int, default=64, help="in-plane size")
    p.add_argument("--slices", type=int, default=17, help="slices per volume (1 + 2k)")
    p.add_argument("--num-workers", type=int, default=2, help="processes for phantom generation")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.set_defaults(func=lambda args, overrides: run(args))
    return p
