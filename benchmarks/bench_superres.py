"""Super-resolution U-Net speed and peak memory: ctgen (JAX) vs GenerateCT's PyTorch Unet, same shapes and threads.

Workloads (paper U-Net unless --dim, random weights, --size x --size slices, batch --batch, T5-base
width text of 20 tokens):
  conv    one 3x3 convolution at each U-Net level's shape (size, 64 ch), (size/2, 128), (size/4, 256):
          XLA (NHWC) against torch.nn.functional.conv2d (NCHW), forward only
  conv-grad  the backward pass of the same convolutions: input gradient (dx) and weight gradient
          (dw) of autodiff through XLA's convolution ("xla") and of ctgen's conv2d (custom
          backward, "ctgen") against torch's convolution_backward (NCHW)
  fwd     U-Net forward (no gradients)
  train   forward + backward of the v-prediction MSE (GenerateCT: `loss.backward()`)
  sample  full sampling of --batch slices: ctgen's 25-step ancestral sampler (`--sampler ancestral
          --sample-steps 25`) or DDIM (`--sampler ddim --sample-steps 10`); GenerateCT: its
          p_sample_loop on one slice at a time with its 25 steps (its inference loop), timed per slice
Every measurement runs in a fresh process (peak RSS = ru_maxrss of that process) pinned to
--threads cores (torch.set_num_threads too); ctgen and reference runs alternate (--rounds pairs); the
first call (compilation for ctgen) is reported apart from the steady time. Seconds per 201-slice
volume = seconds per slice x 201. With the reference, each workload ends with ctgen's speed and
memory ratio to it (_common.side_by_side; `sample` per slice), also in the JSON (`side_by_side`).

    python benchmarks/bench_superres.py --workload conv fwd train --size 512
    CTGEN_GENERATECT_DIR=/path/to/GenerateCT python benchmarks/bench_superres.py --workload sample --size 512 --batch 4
    python benchmarks/bench_superres.py --quality --weights models/superres_pretrained --size 512 --sample-steps 10

--quality (trained weights only; random weights make the comparison meaningless) super-resolves
--batch downsampled slices of a synthetic chest phantom with the 25-step ancestral
sampler and with the fast sampler, and prints PSNR/SSIM of the fast output against the 25-step one,
and of both and of bicubic upsampling against the original slices.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REF_HELPER = os.path.join(os.path.dirname(HERE), "tests", "reference")
sys.path.insert(0, HERE)
from _common import compile_timed, flop_fields, flop_lines, run_child, save_results, side_by_side  # noqa: E402
from _common import side_by_side_line  # noqa: E402
from _common import peak_gb as _peak_gb, pin as _pin  # noqa: E402  (shared benchmark plumbing)

TEXT_LEN, TEXT_DIM = 20, 768


def _inputs(args, text_dim: int = TEXT_DIM):
    import numpy as np

    rng = np.random.default_rng(0)
    b, s = args.batch, args.size
    return (rng.standard_normal((b, s, s, 1)).astype(np.float32), rng.uniform(-1, 1, (b, s, s, 1)).astype(np.float32),
            rng.standard_normal((b, TEXT_LEN, text_dim)).astype(np.float32), np.ones((b, TEXT_LEN), bool))


def _conv_shapes(size):
    return [(size, 64), (size // 2, 128), (size // 4, 256)]


def _timed(call, steps):
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


# --- ctgen ----------------------------------------------------------------------------------------
def run_ctgen(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    if args.workload == "conv":
        out = {}
        for size, ch in _conv_shapes(args.size):
            x = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, size, size, ch)), jnp.float32)
            k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, ch, ch)) * 0.05, jnp.float32)
            f = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                                   dimension_numbers=("NHWC", "HWIO", "NHWC")))
            times = _timed(lambda: f(x, k).block_until_ready(), args.steps)
            out[f"{size}x{ch}"] = statistics.median(times[1:])
        return {"impl": "ctgen", "convs": out, "first": 0.0, "steady": [sum(out.values())], "peak_gb": _peak_gb(),
                "note": "XLA conv NHWC"}

    if args.workload == "conv-grad":
        from ctgen.models.layers import conv2d

        plain = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = {}
        for size, ch in _conv_shapes(args.size):
            rng = np.random.default_rng(0)
            x, dy = (jnp.asarray(rng.standard_normal((args.batch, size, size, ch)), jnp.float32) for _ in range(2))
            k = jnp.asarray(rng.standard_normal((3, 3, ch, ch)) * 0.05, jnp.float32)
            for name, conv in (("xla", plain), ("ctgen", lambda x, k: conv2d(x, k, None, 1))):
                fdx = jax.jit(lambda x, k, dy, conv=conv: jax.vjp(lambda x: conv(x, k), x)[1](dy)[0])
                fdw = jax.jit(lambda x, k, dy, conv=conv: jax.vjp(lambda k: conv(x, k), k)[1](dy)[0])
                for grad, f in (("dx", fdx), ("dw", fdw)):
                    times = _timed(lambda: f(x, k, dy).block_until_ready(), args.steps)
                    out[f"{size}x{ch} {grad} {name}"] = statistics.median(times[1:])
        return {"impl": "ctgen", "convs": out, "first": 0.0, "peak_gb": _peak_gb(), "note": "NHWC",
                "steady": [sum(v for key, v in out.items() if key.endswith("ctgen"))]}

    from ctgen.models.unet import UNet, UNetConfig
    from ctgen.sampling import diffusion as df
    from ctgen.sampling.superres import SamplerConfig, sample_slices

    if args.model == "tiny":
        cfg = UNetConfig.tiny(remat=args.workload == "train" and not args.no_remat, dtype=args.dtype)
    else:
        cfg = UNetConfig.paper(dim=args.dim, remat=args.workload == "train" and not args.no_remat, dtype=args.dtype)
    model = UNet(cfg, rngs=nnx.Rngs(0))
    x, low, text, mask = (jnp.asarray(a) for a in _inputs(args, cfg.text_embed_dim))
    log_snr = df.cosine_log_snr(jnp.full((args.batch,), 0.5))
    low_snr = df.linear_log_snr(jnp.full((args.batch,), 0.1))
    compiled = None
    if args.workload == "fwd":
        graphdef, weights = nnx.split(model)
        f = jax.jit(lambda w, *a: nnx.merge(graphdef, w)(*a))
        inputs = (weights, x, log_snr, low, low_snr, text, mask)
        compiled, compile_s = compile_timed(f, *inputs)
        call = lambda: compiled(*inputs).block_until_ready()  # noqa: E731
    elif args.workload == "train":
        graphdef, params = nnx.split(model, nnx.Param)

        @jax.jit
        def step(params):
            def loss(p):
                return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, log_snr, low, low_snr, text, mask) - x))
            return jax.value_and_grad(loss)(params)

        compiled, compile_s = compile_timed(step, params)
        call = lambda: jax.block_until_ready(compiled(params))  # noqa: E731
    else:
        sampler = SamplerConfig(sampler=args.sampler, steps=args.sample_steps)
        keys = jax.random.split(jax.random.PRNGKey(0), args.batch)
        lowres = (low[..., 0] + 1) * 0.5
        graphdef, weights = nnx.split(model)
        f = jax.jit(lambda w, *a: sample_slices(nnx.merge(graphdef, w), *a, (args.size, args.size), sampler))
        inputs = (weights, lowres, text, mask, keys)
        compiled, compile_s = compile_timed(f, *inputs)
        call = lambda: compiled(*inputs).block_until_ready()  # noqa: E731
    times = _timed(call, args.steps)
    out = {"impl": "ctgen", "first": times[0], "steady": times[1:], "peak_gb": _peak_gb(),
           "note": f"{args.dtype}, remat={cfg.remat}" + (", model=tiny" if args.model == "tiny" else ""),
           "slices_per_call": args.batch}
    if compiled is not None:  # first = compilation + first call, as a plain jit call would take
        out.update(first=compile_s + times[0], compile=compile_s, first_call=times[0],
                   **flop_fields(compiled, statistics.median(times[1:] or times)))
    return out


# --- GenerateCT -----------------------------------------------------------------------------------
def run_reference(args) -> dict:
    sys.path.insert(0, REF_HELPER)
    import generatect_superres_runtime as rt
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    if args.workload == "conv":
        out = {}
        for size, ch in _conv_shapes(args.size):
            x = torch.randn(args.batch, ch, size, size)
            k = torch.randn(ch, ch, 3, 3) * 0.05
            with torch.no_grad():
                times = _timed(lambda: torch.nn.functional.conv2d(x, k, padding=1), args.steps)
            out[f"{size}x{ch}"] = statistics.median(times[1:])
        return {"impl": "GenerateCT", "convs": out, "first": 0.0, "steady": [sum(out.values())],
                "peak_gb": _peak_gb(), "note": "torch conv2d NCHW"}
    if args.workload == "conv-grad":
        out = {}
        for size, ch in _conv_shapes(args.size):
            x, dy = torch.randn(args.batch, ch, size, size), torch.randn(args.batch, ch, size, size)
            k = torch.randn(ch, ch, 3, 3) * 0.05
            for grad, mask in (("dx", [True, False, False]), ("dw", [False, True, False])):
                with torch.no_grad():
                    times = _timed(lambda: torch.ops.aten.convolution_backward(
                        dy, x, k, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask), args.steps)
                out[f"{size}x{ch} {grad}"] = statistics.median(times[1:])
        return {"impl": "GenerateCT", "convs": out, "first": 0.0, "steady": [sum(out.values())],
                "peak_gb": _peak_gb(), "note": "torch convolution_backward NCHW"}
    ref = rt.build_superres(dict(rt.PAPER_UNET, dim=args.dim), image_sizes=(args.size // 4, args.size))
    unet = ref.unets[1]
    x, low, text, mask = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2) if a.ndim == 4 else a))
                          for a in _inputs(args))
    t = ref.noise_schedulers[1].get_condition(torch.full((args.batch,), 0.5))
    lt = ref.lowres_noise_schedule.get_condition(torch.full((args.batch,), 0.1))
    kw = dict(lowres_cond_img=low, lowres_noise_times=lt, text_embeds=text, text_mask=mask)
    if args.workload == "fwd":
        def call():
            with torch.no_grad():
                return unet(x, t, **kw)
    elif args.workload == "train":
        unet.train()

        def call():
            unet.zero_grad(set_to_none=True)
            loss = torch.mean((unet(x, t, **kw) - x) ** 2)
            loss.backward()
            return loss
    else:  # GenerateCT's inference: one slice at a time, 25 steps
        one = dict(lowres_cond_img=low[:1], lowres_noise_times=torch.full((1,), 0.1), text_embeds=text[:1],
                   text_mask=mask[:1])

        def call():
            with torch.no_grad():
                return ref.p_sample_loop(unet, (1, 1, args.size, args.size), noise_scheduler=ref.noise_schedulers[1],
                                         pred_objective="v", dynamic_threshold=True, use_tqdm=False, **one)
    times = _timed(call, args.steps)
    note = "torch, one slice per call, GenerateCT's 25 ancestral steps" if args.workload == "sample" else "torch"
    return {"impl": "GenerateCT", "first": times[0], "steady": times[1:], "peak_gb": _peak_gb(), "note": note,
            "slices_per_call": 1 if args.workload == "sample" else args.batch}


def run_quality(args) -> None:
    """PSNR/SSIM of the fast sampler's output against the 25-step ancestral sampler's (trained weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ctgen.convert.superres_store import load_superres
    from ctgen.data.phantom import make_phantom
    from ctgen.data.preprocess import resize_volume
    from ctgen.eval.image_metrics import psnr, ssim
    from ctgen.sampling.superres import SamplerConfig, sample_slices
    from ctgen.volume import clip_hu, hu_to_sr

    model, which = load_superres(args.weights)
    s, lo = args.size, args.size // 4
    vol = make_phantom(0, shape=(args.batch, s, s)).hu  # a synthetic chest phantom's slices
    sl = clip_hu(np.asarray(vol, np.float32))
    lowres = jnp.asarray(hu_to_sr(resize_volume(sl, (args.batch, lo, lo))))
    text = jnp.zeros((args.batch, 1, model.cfg.text_embed_dim))
    mask = jnp.zeros((args.batch, 1), bool)
    keys = jax.random.split(jax.random.PRNGKey(0), args.batch)
    fast_name = f"{args.sampler} {args.sample_steps}"
    if fast_name == "ancestral 25":
        fast_name += " (again)"
    runs = [("ancestral 25", SamplerConfig()), (fast_name, SamplerConfig(sampler=args.sampler, steps=args.sample_steps))]
    outs = {}
    for name, cfg in runs:
        t0 = time.perf_counter()
        outs[name] = np.asarray(sample_slices(model, lowres, text, mask, keys, (s, s), cfg))
        print(f"{name}: {time.perf_counter() - t0:.1f} s for {args.batch} slices (with compilation)")
    a, b = outs["ancestral 25"][:, None], outs[fast_name][:, None]
    print(f"{which} weights; fast vs 25-step: PSNR {float(np.mean(psnr(b, a, data_range=1.0))):.2f} dB, "
          f"SSIM {float(np.mean(ssim(b, a, data_range=1.0))):.4f}")
    from ctgen.sampling.superres import bicubic_upsample

    truth = hu_to_sr(sl)[:, None]
    outs["bicubic"] = np.asarray(bicubic_upsample(lowres, (s, s)))
    for name, out in outs.items():
        print(f"  {name:>14s} vs the original slices: PSNR {float(np.mean(psnr(out[:, None], truth, data_range=1.0))):.2f} dB, "
              f"SSIM {float(np.mean(ssim(out[:, None], truth, data_range=1.0))):.4f}")


# --- driver ---------------------------------------------------------------------------------------
def _spawn(impl: str, workload: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--workload", workload, "--size", str(args.size),
           "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads), "--dim",
           str(args.dim), "--dtype", args.dtype, "--sampler", args.sampler, "--sample-steps",
           str(args.sample_steps), "--model", args.model, *(["--no-remat"] if args.no_remat else [])]
    return run_child(cmd, impl, args.threads, args.background_load)


def _report(workload: str, r: dict, args) -> str:
    if "error" in r:
        return f"{r['impl']:>10s}: FAILED {r['error']}"
    s = statistics.median(r["steady"])
    line = f"{r['impl']:>10s}: steady {s:8.3f} s  first {r['first']:7.2f} s  peak RSS {r['peak_gb']:5.2f} GB  [{r['note']}]"
    if workload in ("conv", "conv-grad"):
        line += "  " + ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in r["convs"].items())
    if workload == "sample":
        per_slice = s / r.get("slices_per_call", args.batch)
        line += f"\n{'':12s}{per_slice:.2f} s per slice, {per_slice * 201 / 60:.1f} min per 201-slice volume"
    if "xla_flops" in r:
        line += flop_lines(r)
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", nargs="+", choices=("conv", "conv-grad", "fwd", "train", "sample"), default=["fwd"])
    ap.add_argument("--size", type=int, default=512, help="slice size (output of the SR U-Net)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64, help="U-Net base width (paper: 64)")
    ap.add_argument("--steps", type=int, default=3, help="timed calls per process after the first")
    ap.add_argument("--rounds", type=int, default=1, help="alternating ctgen/reference process pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--no-remat", action="store_true", help="train: no recomputation of the resnet blocks")
    ap.add_argument("--sampler", default="ancestral", choices=("ancestral", "ddim"))
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--no-reference", action="store_true", help="measure ctgen only")
    ap.add_argument("--background-load", type=int, default=0, help="N CPU-bound processes on the same cores")
    ap.add_argument("--quality", action="store_true", help="fast sampler vs 25-step PSNR/SSIM (needs --weights)")
    ap.add_argument("--weights", help="--quality: a trained or imported SR U-Net")
    ap.add_argument("--model", default="paper", choices=("paper", "tiny"),
                    help="tiny: UNetConfig.tiny (ctgen only; --dim is ignored), for smoke runs")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=("ctgen", "reference"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.workload = args.workload[0]
        _pin(args.threads)
        out = run_ctgen(args) if args.child == "ctgen" else run_reference(args)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    if args.quality:
        if not args.weights:
            ap.error("--quality needs --weights (random weights make the comparison meaningless)")
        run_quality(args)
        return 0
    sys.path.insert(0, REF_HELPER)
    import generatect_superres_runtime as rt

    reason = "--no-reference" if args.no_reference else ("--model tiny" if args.model == "tiny" else rt.skip_reason())
    impls = ["ctgen"] + ([] if reason else ["reference"])
    print(f"SR benchmark: size={args.size} batch={args.batch} dim={args.dim} threads={args.threads} "
          f"dtype={args.dtype} load avg {os.getloadavg()[0]:.2f}; reference: "
          f"{'GenerateCT' if not reason else 'off (' + reason + ')'}")
    records = []
    for workload in args.workload:
        label = f"{args.sampler} {args.sample_steps} steps" if workload == "sample" else ""
        print(f"\n== {workload} {label}==")
        runs = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl in impls:
                runs[impl].append(_spawn(impl, workload, args))
                print(_report(workload, runs[impl][-1], args), flush=True)
        # sample: GenerateCT's loop takes one slice per call, ctgen --batch: compare seconds per slice
        ratio = side_by_side(runs, per="slices_per_call" if workload == "sample" else None)
        if ratio:
            if workload == "sample" and (args.sampler, args.sample_steps) != ("ancestral", 25):
                ratio["note"] = f"ctgen {args.sampler} {args.sample_steps} steps, GenerateCT ancestral 25 steps"
            print(side_by_side_line(ratio) + (f" [{ratio['note']}]" if "note" in ratio else ""), flush=True)
        records.append({"workload": workload, "runs": runs, "side_by_side": ratio})
    if args.json:
        save_results(args.json, "superres", args, records, reference="GenerateCT" if not reason else f"skipped ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
