"""`ctgen generate` end to end: seconds per stage, compile time and peak memory from the provenance
record each generated volume carries; beside GenerateCT's own cascade where it can run; and the
paper-size generation programs planned against a 16 GiB accelerator without running them.

Sizes (random weights made once under --workdir; timing does not depend on the values):
  tiny   configs/*.py:tiny architectures, built-in T5: 5 x 32 x 32 -> 5 x 128 x 128 (smoke tests)
  demo   the built-in demo cascade's architectures (configs/*.py:phantom, built-in T5) and generation
         settings (ctgen.generate.demo_cascade.DEFAULT_SETTINGS): 17 x 32 x 32 -> 17 x 128 x 128
  paper  GenerateCT's: T5 v1.1 base (random), CT-ViT and MaskGIT paper, SR U-Net paper: --slices x
         128 x 128 -> x 512 x 512 (default 201 slices)

Each run is `ctgen generate` in a fresh process with a fresh JAX compilation cache: cold (everything
compiled) then warm (the persistent cache from the cold run), as a user's first and second call;
--repeats N repeats the warm run (and GenerateCT's run) N times and reports min / median / max per
stage. Reported per stage: steady seconds (compilation excluded) and compile seconds, plus the
process's peak RSS, the load average before and after it and the ctgen commit it ran. --sr-slices
K splits a run: the cascade at --slices without the SR, then the whole cascade at K slices; the SR
time at --slices is projected from K slices (labelled). --steps / --sr-steps shorten sampling for
the paper size on a CPU; the table then also extrapolates the stage times linearly to GenerateCT's
18 / 25 steps (labelled as such).

Side by side with GenerateCT (when CTGEN_GENERATECT_DIR names a checkout with its dependencies, unless
--no-reference): the same architectures, random weights, prompt, slice count and step counts run
through GenerateCT's own code in fresh processes interleaved with ctgen's warm runs (threads and
cores the same): its `MaskGITTransformer.sample(texts=..., num_frames=S, cond_scale=5)` (T5 encoding
by its t5.py with a transformers T5EncoderModel of ctgen's encoder's shape, its guided decode of
--steps steps, `CTViT.decode_from_codebook_indices`), then its `Superres.sample(texts=...,
start_image_or_video=slice, start_at_unet_number=2)` slice by slice, as inference_superres.py does
(which encodes the prompt again for every slice). Stages are timed by wrapping its text encoder and
decoder (tests/reference/generatect_cascade.py). ctgen then runs GenerateCT's settings: guidance 5,
SR ancestral sampler without guidance. ctgen compiles its MaskGIT decode and the CT-ViT decoder into
one program, so its CT-ViT decode is also timed alone in a fresh process and the MaskGIT sampling
is that program's time minus it (labelled "derived"). Ratios as `_common.side_by_side` defines
them: GenerateCT's median seconds / ctgen's, ctgen's peak RSS / GenerateCT's (the largest of each
side's processes). PyTorch's threads suffer more than XLA's from other processes on the same cores:
a loaded machine overstates ctgen's lead (docs/benchmarks.md). Not the same: ctgen pads the text states to
`text_max_length` tokens (one compiled shape), GenerateCT to the prompt's length; GenerateCT's
SuperResolutionTrainer (needs `accelerate`) is bypassed, its `sample` only adds the EMA copies;
the phantom SR generates a residual over bicubic upsampling (one bicubic per slice more than
GenerateCT).
Where GenerateCT's cascade cannot run it is skipped with the reason: its MaskGIT evaluates a
position-bias MLP on all N^2 token pairs, two N^2 x dim_head float32 activations at once (at 201
slices, N = 6464: 21 GB, more than this 24 GB machine has free; the script checks this before
starting it), and its SR at 512^2 takes about 3 minutes per slice for its 25 steps here (10 hours
per 201-slice volume, bench_superres.py). At the paper size run it at a few slices with few steps.

--plan compiles (never runs) the generation programs at the chosen size on one device, with
abstract arguments (no weights are made): the T5 encoder at text_max_length tokens, the MaskGIT
guided decode loop, the CT-ViT decode, the two as `ctgen generate` compiles them into one program,
and the SR sampling loop per slice batch; it prints XLA's per-device bytes (arguments = parameters +
inputs, temporaries, outputs) and the largest SR batch for which the cascade (all four models stay
resident, as in `ctgen generate`) fits --hbm-gib (16). XLA:CPU's buffer assignment: read it as an
estimate for an accelerator.

    python benchmarks/bench_generate.py --size demo --repeats 3
    CTGEN_GENERATECT_DIR=/path/to/GenerateCT python benchmarks/bench_generate.py --size demo --repeats 3
    python benchmarks/bench_generate.py --size paper --slices 201 --sr-slices 3 --steps 2 --sr-steps 1 --runs cold
    python benchmarks/bench_generate.py --size paper --plan
    ctgen bench generate --size demo --json results/generate.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REF_HELPER = os.path.join(REPO, "tests", "reference")
sys.path.insert(0, HERE)
from _common import (markdown_table, save_results, side_by_side as ratios, side_by_side_line, spread,  # noqa: E402
                     tree_bytes)

from ctgen.errors import UserError  # noqa: E402

PROMPT = "64 years old female: Cardiomegaly. Bilateral pleural effusion, more on the right."
PAPER_STEPS, PAPER_SR_STEPS = 18, 25
GENERATECT_COND_SCALE = 5.0  # inference_transformer.py
SIZES = {  # config variant, text encoder, default slices, MaskGIT steps, SR steps (SR sampler: the size's)
    "tiny": ("tiny", "builtin", 5, 2, 2),
    "demo": ("phantom", "builtin", 17, PAPER_STEPS, 20),
    "paper": ("paper", "base", 201, PAPER_STEPS, PAPER_SR_STEPS),
}
GIB = 2**30


# --- architectures and weights --------------------------------------------------------------------
def _config(name: str, variant: str, overrides=()):
    """configs/<name>.py:<variant> as `ctgen` loads it, with `--config.*` override pairs."""
    from ctgen.configuration import load

    return load(os.path.join(REPO, "configs", f"{name}.py") + f":{variant}", overrides)


def model_configs(size: str) -> dict:
    """The text encoder config and the CT-ViT, MaskGIT and SR U-Net configs of a size."""
    from ctgen.models.ctvit_losses import split_model_config
    from ctgen.models.maskgit import MaskGITConfig
    from ctgen.models.unet import UNetConfig
    from ctgen.text.config import T5Config

    variant, text = SIZES[size][:2]
    t5 = T5Config.preset("tiny" if text == "builtin" else "base")
    ctvit, _ = split_model_config(_config("ctvit", variant).model)
    maskgit = MaskGITConfig.from_dict({**_config("maskgit", variant).model.to_dict(), "dim_context": t5.d_model})
    unet = UNetConfig.from_dict({**_config("superres", variant).model.to_dict(), "text_embed_dim": t5.d_model})
    return {"text_kind": text, "t5": t5, "ctvit": ctvit, "maskgit": maskgit, "superres": unet}


def _make_weights(size: str, root: str) -> None:
    """Random weights directories text/, ctvit/, maskgit/, superres/ of the chosen size."""
    import jax
    from flax import nnx

    from ctgen.convert.ctvit_store import save_ctvit_dir
    from ctgen.convert.maskgit_store import save_maskgit_dir
    from ctgen.convert.superres_store import save_superres_dir
    from ctgen.models.ctvit import CTViT
    from ctgen.models.maskgit import MaskGIT
    from ctgen.models.unet import UNet
    from ctgen.text.load import builtin_dir, save_text_encoder

    # Random values only: the RBG generator compiles in a fraction of threefry's time on XLA:CPU.
    jax.config.update("jax_default_prng_impl", "rbg")
    cfgs = model_configs(size)
    if cfgs["text_kind"] == "builtin":
        shutil.copytree(builtin_dir(), os.path.join(root, "text"))
    else:
        from ctgen.text.t5 import T5Encoder
        from ctgen.text.tokenizer import T5Tokenizer

        save_text_encoder(T5Encoder(cfgs["t5"], rngs=nnx.Rngs(3)), T5Tokenizer.from_dir(builtin_dir()),
                          os.path.join(root, "text"))
    ccfg, mcfg, ucfg = cfgs["ctvit"], cfgs["maskgit"], cfgs["superres"]
    save_ctvit_dir(os.path.join(root, "ctvit"), ccfg, nnx.state(CTViT(ccfg, rngs=nnx.Rngs(0))))
    save_maskgit_dir(os.path.join(root, "maskgit"), mcfg, nnx.state(MaskGIT(mcfg, rngs=nnx.Rngs(1))))
    save_superres_dir(os.path.join(root, "superres"), ucfg, nnx.state(UNet(ucfg, rngs=nnx.Rngs(2)), nnx.Param))


# --- ctgen runs -----------------------------------------------------------------------------------
def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _source_state() -> dict:
    """The ctgen commit measured and whether its package differs from it (another session's edits)."""
    def git(*a):
        proc = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain", "ctgen").splitlines()}


def _overrides(args) -> list[str]:
    """`--config.*` settings of a ctgen run: the demo cascade's (demo size), then GenerateCT's
    sampling when the reference runs beside it (the flags of `_run` set steps and slices)."""
    settings = {}
    if args.size == "demo":
        from ctgen.generate.demo_cascade import DEFAULT_SETTINGS

        settings.update(DEFAULT_SETTINGS)
    if args.reference_on:
        settings.update({"maskgit.cond_scale": GENERATECT_COND_SCALE, "superres.sampler": "ancestral",
                         "superres.cond_scale": 1.0})
    from ctgen.generate.demo_cascade import settings_overrides

    return [f"--config.{k}={v}" for k, v in settings_overrides(settings)
            if k not in ("slices", "maskgit.steps", "superres.steps")]


def _run(args, ckpt: str, out: str, cache: str, *, slices: int = 0, sr: bool = True) -> dict:
    cmd = [sys.executable, "-m", "ctgen", "generate", PROMPT, "--name", "bench", "--out", out, "--checkpoints", ckpt,
           "--slices", str(slices or args.slices), "--steps", str(args.steps), "--sr-steps", str(args.sr_steps),
           "--seed", "0", f"--config.compile_cache.dir={cache}", "--config.progress_bar=false", *_overrides(args)]
    if not sr:
        cmd.append("--no-sr")
    cmd += args.extra
    load = _load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"ctgen generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "provenance", "bench.json"), encoding="utf-8") as f:
        prov = json.load(f)
    return {"wall_seconds": wall, "seconds": prov["seconds"], "compile_seconds": prov["compile_seconds"],
            "peak_rss_gb": prov["peak_memory"].get("host_peak_rss_bytes", 0) / 2**30,
            "peak_memory": prov["peak_memory"], "shape": _shape(out), "load_avg_1m": [load, _load()],
            "source": _source_state()}


def _shape(out: str) -> list[int]:
    import nibabel as nib

    return list(nib.load(os.path.join(out, "bench.nii.gz")).shape)


def _spreads(records: list[dict]) -> dict:
    stages = sorted({k for r in records for k in r["seconds"]})
    return {"seconds": {s: spread([r["seconds"].get(s, 0.0) for r in records]) for s in stages},
            "wall_seconds": spread([r["wall_seconds"] for r in records]),
            "peak_rss_gb": spread([r["peak_rss_gb"] for r in records])}


def _cell(s: dict, fmt: str = "{:.1f}") -> str:
    if s["n"] == 1:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


# --- children: GenerateCT's cascade, ctgen's CT-ViT decode alone, the plan --------------------------
def child_reference(spec: dict) -> dict:
    """One run of GenerateCT's cascade (no JAX in this process: its memory is GenerateCT's alone)."""
    import resource
    import types

    sys.path.insert(0, REF_HELPER)
    import generatect_cascade as gc

    t0 = time.perf_counter()
    torch = __import__("torch")
    torch.set_num_threads(spec["threads"])
    name, model, tokenizer = gc.text_model(spec["text_kind"], spec["builtin_dir"])
    gc.install_text_model(name, model, tokenizer)
    cfg = {k: types.SimpleNamespace(**spec[k]) for k in ("ctvit", "maskgit", "superres")}
    casc = gc.build_cascade(cfg["ctvit"], cfg["maskgit"], cfg["superres"], text_name=name, lowres=spec["lowres"],
                            size=spec["size"], steps=spec["steps"], sr_steps=spec["sr_steps"])
    build = time.perf_counter() - t0
    out = gc.timed_run(casc, PROMPT, slices=spec["slices"], cond_scale=GENERATECT_COND_SCALE, sr=spec["sr"])
    return {**out, "build_seconds": build, "unet_notes": casc.unet_notes,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def child_decode(args) -> dict:
    """ctgen's CT-ViT decode of one volume's ids alone: compile, then --repeats timed calls."""
    import jax
    import numpy as np
    from flax import nnx

    from ctgen.convert.ctvit_store import load_ctvit
    from ctgen.generate.cascade import token_grid

    ctvit = load_ctvit(os.path.join(args.ckpt, "ctvit"))
    grid = token_grid(ctvit.cfg, args.slices)
    ids = jax.numpy.asarray(np.random.default_rng(0).integers(0, ctvit.cfg.codebook_size, (1, *grid)), jax.numpy.int32)
    graphdef, state = nnx.split(ctvit)
    t0 = time.perf_counter()
    fn = jax.jit(lambda s, i: nnx.merge(graphdef, s).decode(i)).lower(state, ids).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state, ids))
        times.append(time.perf_counter() - t0)
    return {"compile_seconds": compile_s, "first_call": times[0], "steady": times[1:], "grid": list(grid)}


def _spawn(kind: str, args, spec: dict | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--size", args.size,
           "--slices", str(args.slices),
           "--repeats", str(args.repeats), "--ckpt", args.ckpt or "", "--hbm-gib", str(args.hbm_gib),
           "--steps", str(args.steps), "--sr-steps", str(args.sr_steps)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if kind == "reference":
        cmd += ["--spec", json.dumps(spec)]
    if kind == "plan":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
        flags.append("--xla_force_host_platform_device_count=1")  # one accelerator's program
        if args.fast_compile:
            flags += [f"--{k}={v}" for k, v in (("xla_backend_optimization_level", "0"),
                                                 ("xla_cpu_use_fusion_emitters", "false")) if k not in " ".join(flags)]
        env["XLA_FLAGS"] = " ".join(flags)
    load = _load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "wall_seconds": wall, "load_avg_1m": [load, _load()]}
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    return {"error": f"exit {proc.returncode}: {tail}", "wall_seconds": wall}


def reference_skip_reason(args, cfgs: dict) -> str | None:
    """Why GenerateCT's cascade is not run beside this run (None: it runs)."""
    if args.no_reference:
        return "--no-reference"
    if args.sr_slices:
        return "--sr-slices (the reference runs the whole cascade at --slices)"
    sys.path.insert(0, REF_HELPER)
    import generatect_cascade as gc

    reason = gc.skip_reason()
    if reason:
        return reason
    c, m = cfgs["ctvit"], cfgs["maskgit"]
    n = (1 + (args.slices - 1) // c.temporal_patch_size) * (c.image_size // c.patch_size) ** 2
    need = 2 * n * n * m.dim_head * 4  # its position-bias MLP: two N^2 x dim_head float32 activations at once
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * free:
        return (f"GenerateCT's MaskGIT evaluates its position-bias MLP on all {n}^2 token pairs at {args.slices} "
                f"slices: {need / 1e9:.1f} GB of activations at once, {free / 1e9:.1f} GB free here")
    return None


def _reference_spec(args, cfgs: dict) -> dict:
    import dataclasses

    from ctgen.text.load import builtin_dir

    c = cfgs["ctvit"]
    return {"text_kind": cfgs["text_kind"], "builtin_dir": builtin_dir(), "threads": args.threads,
            "slices": args.slices, "steps": args.steps, "sr_steps": args.sr_steps, "sr": True,
            "lowres": c.image_size, "size": 4 * c.image_size,
            **{k: dataclasses.asdict(cfgs[k]) for k in ("ctvit", "maskgit", "superres")}}


# --- plan: the generation programs compiled for one device, never run ------------------------------
def _generate_config(args):
    """configs/generate.py:paper with the size's settings (the demo cascade's for demo) and the flags."""
    from ctgen.generate.demo_cascade import DEFAULT_SETTINGS, settings_overrides

    settings = dict(DEFAULT_SETTINGS) if args.size == "demo" else {}
    settings.update({"slices": args.slices, "maskgit.steps": args.steps})
    if args.sr_steps:
        settings["superres.steps"] = args.sr_steps
    return _config("generate", "paper", settings_overrides(settings))


def _working_bytes(row: dict) -> int:
    """What a program needs on the device beyond the (resident) weights: inputs, temporaries, outputs."""
    b = row["bytes"]
    return b["total"] - b["parameters"]


def child_plan(args) -> dict:
    """Lower and compile each generation program on abstract arguments; XLA's memory analysis."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ctgen.generate.cascade import Models, decode_program, superres_options, token_grid
    from ctgen.models.ctvit import CTViT
    from ctgen.models.maskgit import MaskGIT, MaskGITConfig
    from ctgen.models.unet import UNet
    from ctgen.sampling.superres import SliceSampler
    from ctgen.text.t5 import abstract_encoder

    cfgs, gen = model_configs(args.size), _generate_config(args)
    mcfg = cfgs["maskgit"]
    if int(gen.maskgit.attention_block):  # as `ctgen generate` loads the MaskGIT
        mcfg = MaskGITConfig.from_dict({**mcfg.to_dict(), "attention_block": int(gen.maskgit.attention_block)})
    ccfg, ucfg = cfgs["ctvit"], cfgs["superres"]
    grid = token_grid(ccfg, args.slices)
    length, width = int(gen.text_max_length), cfgs["t5"].d_model
    lo = ccfg.image_size
    size = lo * int(gen.superres.scale)
    S = jax.ShapeDtypeStruct
    t5 = abstract_encoder(cfgs["t5"])
    maskgit = nnx.eval_shape(lambda: MaskGIT(mcfg, rngs=nnx.Rngs(0)))
    ctvit = nnx.eval_shape(lambda: CTViT(ccfg, rngs=nnx.Rngs(0)))
    unet = nnx.eval_shape(lambda: UNet(ucfg, rngs=nnx.Rngs(0)))
    (t_def, t_state), (_, m_state), (c_def, c_state) = nnx.split(t5), nnx.split(maskgit), nnx.split(ctvit)
    params = {"text": tree_bytes(t_state), "maskgit": tree_bytes(m_state), "ctvit": tree_bytes(c_state),
              "superres": tree_bytes(nnx.state(unet))}
    text, mask, keys = S((1, length, width), jnp.float32), S((1, length), jnp.bool_), S((1, 2), jnp.uint32)
    ids = S((1, *grid), jnp.int32)
    # the programs `ctgen generate` runs, lowered on the abstract modules
    models = Models(text=t5, tokenizer=None, ctvit=ctvit, maskgit=maskgit, superres=None, grid=grid)

    rows = []

    def measure(program, shape, compile_fn, stages, inputs):
        t0 = time.perf_counter()
        compiled = compile_fn()
        seconds = time.perf_counter() - t0
        m = compiled.memory_analysis()
        out_free = m.output_size_in_bytes - m.alias_size_in_bytes
        # jit drops unused arguments (e.g. the CT-ViT encoder's weights from the decode): the program's
        # parameters are its arguments less its inputs; all of a stage's weights stay resident.
        rows.append({"program": program, "shape": shape, "stages": stages, "compile_seconds": seconds,
                     "bytes": {"arguments": m.argument_size_in_bytes, "inputs": tree_bytes(inputs),
                               "parameters": m.argument_size_in_bytes - tree_bytes(inputs),
                               "temporaries": m.temp_size_in_bytes, "outputs": m.output_size_in_bytes,
                               "aliased": m.alias_size_in_bytes,
                               "total": m.argument_size_in_bytes + m.temp_size_in_bytes + out_free}})
        return rows[-1]

    tok = [S((1, length), jnp.int32), S((1, length), jnp.bool_)]
    tokens = f"{math.prod(grid)} tokens {'x'.join(map(str, grid))}"
    measure("T5 encoder", f"1 x {length} tokens", lambda: jax.jit(lambda s, i, k: nnx.merge(t_def, s)(i, k)).lower(
        t_state, *tok).compile(), ["text"], tok)
    measure(f"MaskGIT decode, {int(gen.maskgit.steps)} guided steps", f"{args.slices} slices, {tokens}",
            lambda: decode_program(models, gen, ctvit=False).lower(m_state, c_state, text, mask, keys).compile(),
            ["maskgit"], [text, mask, keys])
    measure("CT-ViT decode", f"{tokens} -> {args.slices} x {lo} x {lo}",
            lambda: jax.jit(lambda s, i: nnx.merge(c_def, s).decode(i)).lower(c_state, ids).compile(), ["ctvit"], [ids])
    measure("MaskGIT + CT-ViT decode in one program (as ctgen generate)", f"{args.slices} slices",
            lambda: decode_program(models, gen).lower(m_state, c_state, text, mask, keys).compile(),
            ["maskgit", "ctvit"], [text, mask, keys])
    sampler = SliceSampler(unet, superres_options(gen), (size, size), None, tuple(tuple(r) for r in gen.sharding_rules))

    def sr(batch):
        specs = [S((batch, lo, lo), jnp.float32), S((batch, length, width), jnp.float32),
                 S((batch, length), jnp.bool_), S((batch, 2), jnp.uint32)]
        return measure(f"SR sampling loop, {gen.superres.sampler} {gen.superres.steps} steps",
                       f"{batch} x {lo}^2 -> {size}^2", lambda: sampler.compiled(specs), ["superres"], specs)

    # The SR batch: its bytes beyond the weights grow about linearly with the batch; every stage's
    # weights stay resident. A secant search over compiled batches (XLA's bytes per slice shrink a
    # little as the batch grows), at most 8 compiles: the largest batch seen to fit, and the smallest not.
    budget = args.hbm_gib * GIB - sum(params.values())
    seen = {b: _working_bytes(sr(b)) for b in (1, 2)}
    per_slice = max(seen[2] - seen[1], 1)
    while len(seen) < 8:
        good = max((n for n, v in seen.items() if v <= budget), default=0)
        bad = min((n for n, v in seen.items() if v > budget), default=None)
        if good == 0 or (bad is not None and bad <= good + 1):  # not even one slice, or found
            break
        # the secant through the two largest batches (all fitting), or through the bracket
        n0, n1 = sorted(seen)[-2:] if bad is None else (good, bad)
        slope = max((seen[n1] - seen[n0]) / (n1 - n0), 1.0)
        guess = good + int((budget - seen[good]) // slope)
        guess = max(good + 1, guess if bad is None else min(guess, bad - 1))
        if guess in seen:
            break
        seen[guess] = _working_bytes(sr(guess))
    fit = max((n for n, v in seen.items() if v <= budget), default=0)
    over = min((n for n, v in seen.items() if v > budget), default=None)
    one = seen[1]
    return {"rows": rows, "params": params, "grid": list(grid), "text_length": length, "sr_size": size,
            "sr_per_slice_bytes": per_slice, "sr_fixed_bytes": one - per_slice, "sr_batch_fit": fit,
            "sr_batch_over": over,
            "hbm_gib": args.hbm_gib, "slices": args.slices, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "sampler": str(gen.superres.sampler)}


def run_plan_main(args) -> int:
    print(f"Plan: {args.size} size, {args.slices} slices, one device, compiled ahead of time on abstract arguments "
          f"(nothing runs); fast-compile flags {'on' if args.fast_compile else 'off'}; load avg {_load():.2f}",
          flush=True)
    t0 = time.perf_counter()
    res = _spawn("plan", args)
    if "error" in res:
        raise SystemExit(f"the plan failed: {res['error']}")
    unit, div = ("GiB", GIB) if max(r["bytes"]["total"] for r in res["rows"]) >= GIB else ("MiB", 2**20)
    gib = lambda b: f"{b / div:.2f}"  # noqa: E731
    rows = [[r["program"], r["shape"], gib(r["bytes"]["parameters"]), gib(r["bytes"]["inputs"]),
             gib(r["bytes"]["temporaries"]), gib(r["bytes"]["outputs"]), gib(r["bytes"]["total"]),
             f"{r['compile_seconds']:.1f}"] for r in res["rows"]]
    print(markdown_table(["program", "shape"] + [f"{c} {unit}" for c in ("parameters", "inputs", "temporaries",
                                                                          "outputs", "total")] + ["compile s"], rows))
    params = res["params"]
    resident = sum(params.values())
    fit = res["sr_batch_fit"]
    print(f"Weights resident through the cascade (as `ctgen generate` keeps them; parameters and buffers): "
          f"{gib(resident)} {unit} ({', '.join(f'{k} {gib(v)}' for k, v in params.items())})")
    found = ""
    if fit:
        found = f" (compiled; {res['sr_batch_over']} did not fit)" if res["sr_batch_over"] else " (compiled)"
        found += f"; a {args.slices}-slice volume in {math.ceil(args.slices / fit)} batches"
    print(f"SR sampling beyond its weights: {res['sr_per_slice_bytes'] / 2**20:.1f} MiB per slice of a batch "
          f"{res['sr_fixed_bytes'] / 2**20:+.1f} MiB (a line through batches 1 and 2); largest batch within "
          f"{args.hbm_gib:g} GiB with every stage's weights resident: {fit or 'none'}{found}")
    peaks = [(resident + _working_bytes(r), r["program"], r["shape"]) for r in res["rows"]
             if not r["program"].startswith("SR") or r["shape"].startswith(f"{max(fit, 1)} x")]
    peak, where, shape = max(peaks)
    print(f"Peak on one device (every weight resident + the largest program's inputs, temporaries and outputs): "
          f"{peak / GIB:.2f} GiB, in the {where} ({shape}); {'fits' if peak <= args.hbm_gib * GIB else 'does NOT fit'}"
          f" {args.hbm_gib:g} GiB. Planned in {time.perf_counter() - t0:.0f} s, load avg {_load():.2f}.")
    res["cascade_peak_bytes"], res["cascade_peak_program"] = peak, where
    if args.json:
        save_results(args.json, "generate", args, {}, plan=res, source=_source_state())
    return 0


# --- runs, side by side ------------------------------------------------------------------------------
def run_main(args, cfgs: dict, reason: str | None) -> int:
    tmp = tempfile.mkdtemp(prefix="bench_generate_")
    ckpt = os.path.join(args.workdir or tmp, f"weights_{args.size}")
    if not os.path.isdir(os.path.join(ckpt, "superres")):
        shutil.rmtree(ckpt, ignore_errors=True)
        _make_weights(args.size, ckpt)
    args.ckpt = ckpt
    cache = os.path.join(tmp, "jax_cache")
    spec = _reference_spec(args, cfgs) if args.reference_on else None
    print(f"ctgen generate, {args.size} size, {args.slices} slices, MaskGIT {args.steps} steps, SR {args.sr_steps} "
          f"steps, {args.threads} threads, load avg {_load():.2f}; reference: "
          + ("GenerateCT at " + os.environ.get("CTGEN_GENERATECT_DIR", "") if args.reference_on else f"off ({reason})"),
          flush=True)
    results, reference, decode = {}, [], None

    def ref_run():
        reference.append(_spawn("reference", args, spec))
        r = reference[-1]
        print(f"  GenerateCT run {len(reference)}: " + (r["error"] if "error" in r else
              ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items()) + f", peak RSS {r['peak_rss_gb']:.2f} GB, "
              f"load {r['load_avg_1m']}"), flush=True)

    try:
        for run in args.runs:
            n = args.repeats if run == "warm" else 1
            for i in range(n):
                label = run if n == 1 else f"{run} {i + 1}"
                if args.sr_slices:
                    results[f"{label}, {args.slices} slices, no SR"] = _run(
                        args, ckpt, os.path.join(tmp, f"out_{label}_nosr"), cache, sr=False)
                    label = f"{label}, {args.sr_slices} slices"
                    results[label] = _run(args, ckpt, os.path.join(tmp, f"out_{label}_sr"), cache,
                                          slices=args.sr_slices)
                else:
                    results[label] = _run(args, ckpt, os.path.join(tmp, f"out_{label}"), cache)
                r = results[label]
                print(f"  ctgen {label}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
                      + f", wall {r['wall_seconds']:.1f} s, load {r['load_avg_1m']}", flush=True)
                if args.reference_on and (run == "warm" or "warm" not in args.runs):
                    ref_run()
        if args.reference_on:
            decode = _spawn("decode", args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, results, reference, decode, reason)
    return 0


def report(args, results: dict, reference: list, decode: dict | None, reason: str | None) -> None:
    stages = sorted({k for r in results.values() for k in r["seconds"]})
    print(f"\nctgen generate, {args.size} size, {args.slices} slices, MaskGIT {args.steps} steps, SR {args.sr_steps} "
          f"steps; {args.threads} cores; steady s (compile s)")
    rows = [[run, "x".join(map(str, r["shape"]))]
            + [f"{r['seconds'].get(s, 0):.1f} ({r['compile_seconds'].get(s, 0):.1f})" for s in stages]
            + [f"{r['wall_seconds']:.1f}", f"{r['peak_rss_gb']:.2f}", "–".join(map(str, r["load_avg_1m"]))]
            for run, r in results.items()]
    warm = [r for k, r in results.items() if k.startswith("warm") and not k.endswith("no SR")]
    spreads = {}
    if len(warm) > 1:
        spreads["warm"] = sp = _spreads(warm)
        rows.append([f"warm median (min–max), n={len(warm)}", "x".join(map(str, warm[0]["shape"]))]
                    + [_cell(sp["seconds"][s]) for s in stages] + [_cell(sp["wall_seconds"]),
                                                                  _cell(sp["peak_rss_gb"], "{:.2f}"), ""])
    print(markdown_table(["run", "output"] + [f"{s} s" for s in stages] + ["wall s", "peak RSS GB", "load"], rows))
    first = next(iter(results))
    if args.sr_slices:
        # Stages before the SR from the run at --slices; the SR's steady seconds per slice from the
        # short run, times --slices (the SR works slice by slice in fixed-size batches).
        base = first.split(",")[0]
        r = dict(results[f"{base}, {args.slices} slices, no SR"]["seconds"])
        per_slice = results[f"{base}, {args.sr_slices} slices"]["seconds"].get("superres", 0) / args.sr_slices
        r["superres"] = per_slice * args.slices
        print(f"SR at {args.slices} slices (projection from {args.sr_slices} slices, not measured): "
              f"{per_slice:.1f} s per slice x {args.slices} = {r['superres']:.0f} s at {args.sr_steps} steps")
        projection = {"slices": args.slices, "from_slices": args.sr_slices, "seconds_per_slice": per_slice,
                      "seconds": r["superres"]}
    else:
        r, projection = results[first]["seconds"], None
    if args.size == "paper" and (args.steps != PAPER_STEPS or args.sr_steps != PAPER_SR_STEPS or args.sr_slices):
        scale = {"maskgit": PAPER_STEPS / args.steps, "superres": PAPER_SR_STEPS / args.sr_steps}
        proj = {s: r.get(s, 0) * scale.get(s, 1.0) for s in stages}
        print("projection (linear in the step count, not measured) to 18 MaskGIT / 25 SR steps: "
              + ", ".join(f"{s} {v:.0f} s" for s, v in proj.items()) + f"; total {sum(proj.values()) / 60:.1f} min")
    side = side_by_side(args, results, reference, decode) if reference else None
    if not args.reference_on:
        print(f"GenerateCT's cascade: not run ({reason})")
    if args.json:
        save_results(args.json, "generate", args, results, spread=spreads, superres_projection=projection,
                     source=_source_state(),
                     reference={"status": "ran" if args.reference_on else f"skipped ({reason})", "runs": reference,
                                "ctgen_ctvit_decode_alone": decode, "side_by_side": side})


def side_by_side(args, results: dict, reference: list, decode: dict | None) -> dict:
    """Per stage: ctgen's warm runs (or its only runs) against GenerateCT's, medians and ratios."""
    ok = [r for r in reference if "error" not in r]
    ours = [r for k, r in results.items() if k.startswith("warm")] or list(results.values())
    dec = decode["steady"] if decode and "steady" in decode else []
    dec_med = statistics.median(dec) if dec else 0.0
    mine = {"text": [r["seconds"]["text"] for r in ours],
            "maskgit": [r["seconds"]["maskgit"] - dec_med for r in ours],
            "ctvit_decode": dec or [0.0],
            "maskgit+decode": [r["seconds"]["maskgit"] for r in ours],
            "superres": [r["seconds"].get("superres", 0.0) for r in ours]}
    mine["stages"] = [a + b + c for a, b, c in zip(mine["text"], mine["maskgit+decode"], mine["superres"])]
    mine["wall"] = [r["wall_seconds"] for r in ours]
    theirs = {k: [r["seconds"].get(k, 0.0) for r in ok] for k in ("text", "maskgit", "ctvit_decode", "superres")}
    theirs["maskgit+decode"] = [r["seconds"]["maskgit"] + r["seconds"]["ctvit_decode"] for r in ok]
    theirs["stages"] = [sum(r["seconds"].values()) for r in ok]
    theirs["wall"] = [r["wall_seconds"] for r in ok]
    names = {"text": "text encoding", "maskgit": "MaskGIT sampling, guided (ctgen: derived)",
             "ctvit_decode": "CT-ViT decode (ctgen: measured alone)",
             "maskgit+decode": "MaskGIT sampling + CT-ViT decode",
             "superres": f"SR, all {args.slices} slices", "stages": "sum of the stages",
             "wall": "process wall (start-up, weights, warm compile cache)"}
    out, rows = {"stages": {}}, []
    rss = {"ctgen": [r["peak_rss_gb"] for r in ours], "reference": [r["peak_rss_gb"] for r in ok]}
    for key, label in names.items():
        # _common.side_by_side: speed = GenerateCT's median / ctgen's; memory = ctgen's peak / GenerateCT's
        runs = {"ctgen": {"steady": mine[key], "peak_gb": max(rss["ctgen"])},
                "reference": {"steady": theirs[key], "peak_gb": max(rss["reference"], default=0.0)}}
        a, b = spread(mine[key]), spread(theirs[key]) if ok else None
        r = ratios(runs) if ok and a["median"] > 0 else None
        out["stages"][key] = {"ctgen": a, "generatect": b, **(r or {})}
        rows.append([label, _cell(a, "{:.2f}"), _cell(b, "{:.2f}") if b else "failed",
                     f"{r['speed_ratio']:.2f}x" if r else "–"])
    mem_a, mem_b = spread(rss["ctgen"]), spread(rss["reference"]) if ok else None
    out["peak_rss_gb"] = {"ctgen": mem_a, "generatect": mem_b}
    whole = out["stages"]["stages"]
    rows.append(["peak RSS GB (ratio: ctgen / GenerateCT, the largest of each side)", _cell(mem_a, "{:.2f}"),
                 _cell(mem_b, "{:.2f}") if mem_b else "failed", f"{whole['memory_ratio']:.2f}x" if ok else "–"])
    print(f"\nSide by side, same architectures ({args.size}: configs/*.py:{SIZES[args.size][0]}), random weights, "
          f"{args.slices} slices, MaskGIT {args.steps} steps guidance {GENERATECT_COND_SCALE:g}, SR ancestral "
          f"{args.sr_steps} steps; median (min–max) s over {len(ours)} ctgen and {len(ok)} GenerateCT fresh "
          "processes")
    print(markdown_table(["stage", "ctgen", "GenerateCT", "GenerateCT / ctgen"], rows))
    if ok:
        print("sum of the stages " + side_by_side_line(whole))
        re_enc = statistics.median([r["superres_text_seconds"] for r in ok])
        print(f"GenerateCT re-encodes the prompt for every slice: {re_enc:.2f} s of its SR. It builds its random "
              f"models in {statistics.median([r['build_seconds'] for r in ok]):.1f} s (in its wall time). "
              + (f"U-Net differences it cannot express: {'; '.join(ok[0]['unet_notes'])}."
                 if ok[0]["unet_notes"] else ""))
        cold = [r for k, r in results.items() if k.startswith("cold")]
        if cold:
            c = cold[0]
            print(f"ctgen's first call (cold cache): wall {c['wall_seconds']:.1f} s, of which compile "
                  f"{sum(c['compile_seconds'].values()):.1f} s; GenerateCT compiles nothing.")
    for r in reference:
        if "error" in r:
            print(f"GenerateCT run failed: {r['error']}")
    if decode and "error" in decode:
        print(f"ctgen's CT-ViT decode alone failed: {decode['error']}")
    elif decode:
        out["ctgen_ctvit_decode_compile_seconds"] = decode["compile_seconds"]
    return out


# --- main -------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="demo")
    p.add_argument("--slices", type=int, default=0, help="default: 5 (tiny), 17 (demo), 201 (paper)")
    p.add_argument("--steps", type=int, default=0, help="MaskGIT steps (default 18; tiny 2)")
    p.add_argument("--sr-steps", type=int, default=0,
                   help="SR steps (default: demo 20 DDIM, or 25 ancestral beside GenerateCT; paper 25; tiny 2)")
    p.add_argument("--runs", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    p.add_argument("--repeats", type=int, default=1, help="warm runs (and GenerateCT runs): min / median / max")
    p.add_argument("--sr-slices", type=int, default=0,
                   help="split each run in two: --slices without SR, then the whole cascade at this many slices; "
                        "the SR time at --slices is projected per slice (the SR of 201 512x512 slices takes "
                        "hours on a CPU)")
    p.add_argument("--no-reference", action="store_true", help="ctgen only, even with CTGEN_GENERATECT_DIR set")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="cores for every process")
    p.add_argument("--plan", action="store_true", help="compile the generation programs without running them")
    p.add_argument("--hbm-gib", type=float, default=16.0, help="--plan: accelerator memory to fit")
    p.add_argument("--no-fast-compile", dest="fast_compile", action="store_false",
                   help="--plan: XLA's default CPU flags (default: the test suite's fast-compile flags)")
    p.add_argument("--workdir", default="", help="keep the random weights here (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", choices=("reference", "decode", "plan"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="further `ctgen generate` arguments (after --)")
    args = p.parse_args(argv)
    if not args.child:  # every process started from here inherits these cores
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    _, _, slices, steps, sr_steps = SIZES[args.size]
    args.slices, args.steps = args.slices or slices, args.steps or steps
    if args.child:
        if args.child == "reference":
            out = child_reference(json.loads(args.spec))
        elif args.child == "decode":
            out = child_decode(args)
        else:
            out = child_plan(args)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.sr_slices and not (args.sr_slices < args.slices and args.sr_slices % 2 == 1):
        raise UserError(f"--sr-slices must be an odd slice count below --slices ({args.slices}), got {args.sr_slices}")
    if args.plan:
        args.sr_steps = args.sr_steps or sr_steps
        return run_plan_main(args)
    cfgs = model_configs(args.size)
    reason = reference_skip_reason(args, cfgs)
    args.reference_on = reason is None
    if not args.sr_steps:
        args.sr_steps = PAPER_SR_STEPS if (args.reference_on and args.size == "demo") else sr_steps
    return run_main(args, cfgs, reason)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:  # bad arguments: one line, exit code 2
        print(f"bench_generate: error: {e}", file=sys.stderr)
        sys.exit(2)
