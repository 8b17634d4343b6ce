"""`ctgen generate` end to end: seconds per stage, compile time and peak memory, from the provenance
record each generated volume carries.

Sizes (random weights made once under --workdir; timing does not depend on the values):
  demo   the built-in demo cascade's architectures (configs/*.py:phantom, built-in T5) and generation
         settings (ctgen.generate.demo_cascade.DEFAULT_SETTINGS): 17 x 32 x 32 -> 17 x 128 x 128
  paper  GenerateCT's: T5 v1.1 base (random), CT-ViT and MaskGIT paper, SR U-Net paper: --slices x
         128 x 128 -> x 512 x 512 (default 201 slices)

Each run is `ctgen generate` in a fresh process with a fresh JAX compilation cache, run twice: cold
(everything compiled) and warm (the persistent cache from the cold run), as a user's first and
second call. Reported per stage: steady seconds (compilation excluded) and compile seconds, plus the
process's peak RSS. --sr-slices K splits a run: the cascade at --slices without the SR, then the
whole cascade at K slices; the SR time at --slices is projected from K slices (labelled). --steps / --sr-steps shorten sampling for the paper size on a CPU; the table
then also extrapolates the stage times linearly to GenerateCT's 18 / 25 steps (labelled as such).

    python benchmarks/bench_generate.py --size demo
    python benchmarks/bench_generate.py --size paper --slices 201 --steps 2 --sr-steps 1 --runs cold
    python benchmarks/bench_generate.py --size paper --slices 201 --sr-slices 3 --steps 2 --sr-steps 1 --runs cold
    ctgen bench generate --size demo --json results/generate.json

GenerateCT's own cascade is not run: its three scripts need an 80 GB GPU at 201 slices (its MaskGIT
forward alone does not fit this 24 GB machine, see bench_maskgit.py), and at the demo size it has no
models of these shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from ctgen.errors import UserError

PROMPT = "64 years old female: Cardiomegaly. Bilateral pleural effusion, more on the right."
PAPER_STEPS, PAPER_SR_STEPS = 18, 25


def _make_weights(size: str, root: str) -> None:
    """Random weights directories text/, ctvit/, maskgit/, superres/ of the chosen size."""
    import importlib.util

    from flax import nnx

    from ctgen.convert.ctvit_store import save_ctvit_dir
    from ctgen.convert.maskgit_store import save_maskgit_dir
    from ctgen.convert.superres_store import save_superres_dir
    from ctgen.models.ctvit import CTViT
    from ctgen.models.ctvit_losses import split_model_config
    from ctgen.models.maskgit import MaskGIT, MaskGITConfig
    from ctgen.models.unet import UNet, UNetConfig

    import jax

    # Random values only: the RBG generator compiles in a fraction of threefry's time on XLA:CPU.
    jax.config.update("jax_default_prng_impl", "rbg")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def config(name, variant):
        spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(repo, "configs", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.get_config(variant)

    variant = "phantom" if size == "demo" else "paper"
    if size == "demo":
        text_dim = 64
        shutil.copytree(__import__("ctgen.text.load", fromlist=["builtin_dir"]).builtin_dir(), os.path.join(root, "text"))
    else:
        from ctgen.text.config import T5Config
        from ctgen.text.load import builtin_dir, save_text_encoder
        from ctgen.text.t5 import T5Encoder
        from ctgen.text.tokenizer import T5Tokenizer

        t5cfg = T5Config.preset("base")
        text_dim = t5cfg.d_model
        save_text_encoder(T5Encoder(t5cfg, rngs=nnx.Rngs(3)), T5Tokenizer.from_dir(builtin_dir()),
                          os.path.join(root, "text"))
    ccfg, _ = split_model_config(config("ctvit", variant).model)
    save_ctvit_dir(os.path.join(root, "ctvit"), ccfg, nnx.state(CTViT(ccfg, rngs=nnx.Rngs(0))))
    mcfg = MaskGITConfig.from_dict({**config("maskgit", variant).model.to_dict(), "dim_context": text_dim})
    save_maskgit_dir(os.path.join(root, "maskgit"), mcfg, nnx.state(MaskGIT(mcfg, rngs=nnx.Rngs(1))))
    ucfg = UNetConfig.from_dict({**config("superres", variant).model.to_dict(), "text_embed_dim": text_dim})
    save_superres_dir(os.path.join(root, "superres"), ucfg, nnx.state(UNet(ucfg, rngs=nnx.Rngs(2)), nnx.Param))


def _run(args, ckpt: str, out: str, cache: str, *, slices: int = 0, sr: bool = True) -> dict:
    cmd = [sys.executable, "-m", "ctgen", "generate", PROMPT, "--name", "bench", "--out", out, "--checkpoints", ckpt,
           "--slices", str(slices or args.slices), "--steps", str(args.steps), "--sr-steps", str(args.sr_steps),
           "--seed", "0", f"--config.compile_cache.dir={cache}", "--config.progress_bar=false"]
    if args.size == "demo":  # the demo cascade's generation settings, except those the flags above set
        from ctgen.generate.demo_cascade import DEFAULT_SETTINGS, settings_overrides

        cmd += [f"--config.{k}={v}" for k, v in settings_overrides(DEFAULT_SETTINGS)
                if k not in ("slices", "maskgit.steps", "superres.steps")]
    if not sr:
        cmd.append("--no-sr")
    cmd += args.extra
    env = dict(os.environ)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"ctgen generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "provenance", "bench.json"), encoding="utf-8") as f:
        prov = json.load(f)
    return {"wall_seconds": wall, "seconds": prov["seconds"], "compile_seconds": prov["compile_seconds"],
            "peak_rss_gb": prov["peak_memory"].get("host_peak_rss_bytes", 0) / 2**30,
            "peak_memory": prov["peak_memory"], "shape": _shape(out)}


def _shape(out: str) -> list[int]:
    import nibabel as nib

    return list(nib.load(os.path.join(out, "bench.nii.gz")).shape)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("demo", "paper"), default="demo")
    p.add_argument("--slices", type=int, default=0, help="default: 17 (demo), 201 (paper)")
    p.add_argument("--steps", type=int, default=PAPER_STEPS, help="MaskGIT steps")
    p.add_argument("--sr-steps", type=int, default=0, help="SR steps (default: 20 demo DDIM, 25 paper ancestral)")
    p.add_argument("--runs", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    p.add_argument("--sr-slices", type=int, default=0,
                   help="split each run in two: --slices without SR, then the whole cascade at this many slices; "
                        "the SR time at --slices is projected per slice (the SR of 201 512x512 slices takes "
                        "hours on a CPU)")
    p.add_argument("--workdir", default="", help="keep the random weights here (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("extra", nargs="*", help="further `ctgen generate` arguments (after --)")
    args = p.parse_args(argv)
    args.slices = args.slices or (17 if args.size == "demo" else 201)
    args.sr_steps = args.sr_steps or (20 if args.size == "demo" else PAPER_SR_STEPS)
    if args.sr_slices and not (args.sr_slices < args.slices and args.sr_slices % 2 == 1):
        raise UserError(f"--sr-slices must be an odd slice count below --slices ({args.slices}), got {args.sr_slices}")

    tmp = tempfile.mkdtemp(prefix="bench_generate_")
    ckpt = os.path.join(args.workdir or tmp, f"weights_{args.size}")
    if not os.path.isdir(os.path.join(ckpt, "superres")):
        shutil.rmtree(ckpt, ignore_errors=True)
        _make_weights(args.size, ckpt)
    cache = os.path.join(tmp, "jax_cache")
    results = {}
    try:
        for run in args.runs:
            if args.sr_slices:
                results[f"{run}, {args.slices} slices, no SR"] = _run(args, ckpt, os.path.join(tmp, f"out_{run}_nosr"),
                                                                      cache, sr=False)
                results[f"{run}, {args.sr_slices} slices"] = _run(args, ckpt, os.path.join(tmp, f"out_{run}_sr"), cache,
                                                                  slices=args.sr_slices)
            else:
                results[run] = _run(args, ckpt, os.path.join(tmp, f"out_{run}"), cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import jax

    print(f"ctgen generate, {args.size} size, {args.slices} slices, MaskGIT {args.steps} steps, SR {args.sr_steps} "
          f"steps; {jax.devices()[0].device_kind} x {jax.device_count()}, {os.cpu_count()} cores")
    stages = sorted({k for r in results.values() for k in r["seconds"]})
    print("| run | output | " + " | ".join(f"{s} s (compile)" for s in stages) + " | wall s | peak RSS GB |")
    print("|---|---|" + "---|" * len(stages) + "---|---|")
    for run, r in results.items():
        cells = [f"{r['seconds'].get(s, 0):.1f} ({r['compile_seconds'].get(s, 0):.1f})" for s in stages]
        print(f"| {run} | {'x'.join(map(str, r['shape']))} | " + " | ".join(cells)
              + f" | {r['wall_seconds']:.1f} | {r['peak_rss_gb']:.2f} |")
    scale = {"maskgit": PAPER_STEPS / args.steps, "superres": PAPER_SR_STEPS / args.sr_steps}
    first = args.runs[0]
    if args.sr_slices:
        # Stages before the SR from the run at --slices; the SR's steady seconds per slice from the
        # short run, times --slices (the SR works slice by slice in fixed-size batches).
        r = dict(results[f"{first}, {args.slices} slices, no SR"]["seconds"])
        per_slice = results[f"{first}, {args.sr_slices} slices"]["seconds"].get("superres", 0) / args.sr_slices
        r["superres"] = per_slice * args.slices
        print(f"SR at {args.slices} slices (projection from {args.sr_slices} slices, not measured): "
              f"{per_slice:.1f} s per slice x {args.slices} = {r['superres']:.0f} s at {args.sr_steps} steps")
        results["superres_projection"] = {"slices": args.slices, "from_slices": args.sr_slices,
                                          "seconds_per_slice": per_slice, "seconds": r["superres"]}
    else:
        r = results[first]["seconds"]
    if args.size == "paper" and (args.steps != PAPER_STEPS or args.sr_steps != PAPER_SR_STEPS or args.sr_slices):
        proj = {s: r.get(s, 0) * scale.get(s, 1.0) for s in stages}
        print("projection (linear in the step count, not measured) to 18 MaskGIT / 25 SR steps: "
              + ", ".join(f"{s} {v:.0f} s" for s, v in proj.items()) + f"; total {sum(proj.values()) / 60:.1f} min")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "extra"}, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:  # bad arguments: one line, exit code 2
        print(f"bench_generate: error: {e}", file=sys.stderr)
        sys.exit(2)
