"""CT-ViT speed and peak memory: ctgen (JAX) vs GenerateCT's PyTorch CTViT, same shapes and threads.

Workloads (paper architecture, batch 1 unless --batch, 128x128 slices, random volumes in [-1, 1]):
  gen     generator training step: recon MSE + VGG16 perceptual + hinge GAN with the adaptive weight
          + commitment, forward and backward (GenerateCT: `loss = ctvit(video); loss.backward()` in
          train mode), plus an Adam update with clipping 0.5 when --optimizer is given
  discr   discriminator step (hinge + gradient penalty), forward and backward
  infer   encode -> ids and decode -> volume, no gradients (eval mode)
Every measurement runs in a fresh process (peak RSS = ru_maxrss of that process), pinned to
--threads cores (torch.set_num_threads too); ctgen and reference runs are interleaved (--rounds
pairs), a warm-up call (compilation for ctgen) is excluded from the steady time. With the reference,
each workload ends with ctgen's speed and memory ratio to it (_common.side_by_side), also in the
JSON (`side_by_side`).

    python benchmarks/bench_ctvit.py --workload gen --slices 17 201 --workload infer --slices 201
    CTGEN_GENERATECT_DIR=/path/to/GenerateCT python benchmarks/bench_ctvit.py --workload gen --slices 17

Without CTGEN_GENERATECT_DIR only ctgen is measured. --background-load N adds N CPU-bound
single-thread processes on the same cores during every measurement (a shared machine). ctgen options: --remat (recompute
transformer activations in the backward pass; default on for gen/discr),
--dtype bfloat16.
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


# --- ctgen ----------------------------------------------------------------------------------------
def run_ctgen(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from ctgen.models.ctvit import CTViTConfig
    from ctgen.models.ctvit_losses import LossNetworksConfig, discriminator_loss, generator_loss
    from ctgen.stages.ctvit import CTViTTrainer

    remat = args.remat if args.remat is not None else args.workload != "infer"
    if args.model == "tiny":
        cfg = CTViTConfig.tiny(max_slices=max(args.slices, 17), remat=remat, dtype=args.dtype)
        nets = LossNetworksConfig.tiny() if args.workload != "infer" else None
    else:
        cfg = CTViTConfig.paper(max_slices=max(args.slices, 201), remat=remat, dtype=args.dtype)
        nets = LossNetworksConfig() if args.workload != "infer" else None
    graphdef, params, rest = nnx.split(CTViTTrainer(cfg, nets, rngs=nnx.Rngs(0)), nnx.Param, ...)
    size = cfg.image_size
    vol = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (args.batch, args.slices, size, size)).astype(np.float32))
    if args.workload == "infer":
        @jax.jit
        def fn(params, rest, vol):
            m = nnx.merge(graphdef, params, rest).ctvit
            ids = m.encode(vol)
            return ids, m.decode(ids)

        compiled, compile_s = compile_timed(fn, params, rest, vol)

        def call():
            return compiled(params, rest, vol)
    else:
        def loss_fn(m, batch, rng):
            if args.workload == "gen":
                return generator_loss(m.ctvit, m.vgg, m.discr, batch, rng)
            return discriminator_loss(m.ctvit, m.discr, batch, rng)

        discr = nnx.PathContains("discr")
        trains = nnx.All(nnx.Param, discr if args.workload == "discr" else nnx.Not(discr))
        trainable, frozen = nnx.split_state(params, trains, ...)
        opt = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(3e-5, 0.9, 0.99)) if args.optimizer else None
        opt_state = opt.init(trainable) if opt else None

        def loss_of(trainable, frozen, rest, rng, vol):
            m = nnx.merge(graphdef, trainable, frozen, rest, copy=True)
            loss, _ = loss_fn(m, {"volume": vol}, rng)
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        @jax.jit
        def step(trainable, frozen, rest, opt_state, rng, vol):
            (loss, rest), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable, frozen, rest, rng, vol)
            if opt is not None:
                updates, opt_state = opt.update(grads, opt_state, trainable)
                trainable = optax.apply_updates(trainable, updates)
                return loss, trainable, rest, opt_state
            return loss, grads, rest, opt_state

        state = {"trainable": trainable, "rest": rest, "opt": opt_state, "i": 0}
        compiled, compile_s = compile_timed(step, trainable, frozen, rest, opt_state, jax.random.key(0), vol)

        def call():
            loss, out, new_rest, new_opt = compiled(state["trainable"], frozen, state["rest"], state["opt"],
                                                    jax.random.key(state["i"]), vol)
            state["i"] += 1
            state["rest"], state["opt"] = new_rest, new_opt
            if opt is not None:
                state["trainable"] = out
            return loss

    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    # first = compilation + first call (as a plain jit call would take); compile reported apart too
    return {"impl": "ctgen", "first": compile_s + times[0], "compile": compile_s, "first_call": times[0],
            "steady": times[1:],
            "peak_gb": _peak_gb(), "note": f"remat={remat} dtype={args.dtype}" + (" model=tiny" if args.model == "tiny" else ""),
            **flop_fields(compiled, statistics.median(times[1:] or times))}


# --- GenerateCT -----------------------------------------------------------------------------------
def run_reference(args) -> dict:
    sys.path.insert(0, REF_HELPER)
    import generatect_runtime as rt
    import torch

    from ctgen.models.ctvit import CTViTConfig
    from ctgen.models.ctvit_losses import LossNetworksConfig

    torch.set_num_threads(args.threads)
    cfg = CTViTConfig.paper()
    model = rt.build_reference(cfg, LossNetworksConfig() if args.workload != "infer" else None, seed=0)
    video = torch.rand(args.batch, 1, args.slices, 128, 128) * 2 - 1
    if args.workload == "infer":
        model.eval()

        def call():
            with torch.no_grad():
                ids = model(video, return_only_codebook_ids=True)
                return model.decode_from_codebook_indices(ids)
    else:
        model.train()
        params = [p for n, p in model.named_parameters() if not n.startswith("discr.")]
        if args.workload == "discr":
            params = list(model.discr.parameters())
        opt = torch.optim.Adam(params, lr=3e-5, betas=(0.9, 0.99)) if args.optimizer else None

        def call():
            model.zero_grad(set_to_none=True)
            loss = model(video, return_discr_loss=args.workload == "discr")
            loss.sum().backward()
            if opt is not None:
                if args.workload == "gen":
                    torch.nn.utils.clip_grad_norm_(params, 0.5)
                opt.step()
            return loss

    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"impl": "GenerateCT", "first": times[0], "steady": times[1:], "peak_gb": _peak_gb(), "note": "torch"}


# --- driver ---------------------------------------------------------------------------------------
def _child(args) -> None:
    _pin(args.threads)
    out = run_ctgen(args) if args.child == "ctgen" else run_reference(args)
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(impl: str, workload: str, slices: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--workload", workload,
           "--slices", str(slices), "--steps", str(args.steps), "--threads", str(args.threads),
           "--batch", str(args.batch), "--dtype", args.dtype, "--model", args.model]
    if args.optimizer:
        cmd.append("--optimizer")
    if args.remat is not None:
        cmd.append("--remat" if args.remat else "--no-remat")
    return run_child(cmd, impl, args.threads, args.background_load)


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['impl']:>10s}: FAILED {r['error']}"
    s = r["steady"]
    line = (f"{r['impl']:>10s}: steady {statistics.median(s):7.2f} s (min {min(s):.2f}, max {max(s):.2f}, n={len(s)})"
            f"  first {r['first']:7.2f} s  peak RSS {r['peak_gb']:5.2f} GB  [{r['note']}]")
    if "xla_flops" in r:
        line += flop_lines(r)
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", choices=("gen", "discr", "infer"),
                    help="repeatable; each applies to the --slices list that follows it")
    ap.add_argument("--slices", type=int, nargs="+", action="append")
    ap.add_argument("--steps", type=int, default=3, help="timed calls per process after the warm-up")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved ctgen/reference process pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--optimizer", action="store_true", help="gen/discr: include clipping + Adam update")
    ap.add_argument("--remat", dest="remat", action="store_true", default=None)
    ap.add_argument("--no-remat", dest="remat", action="store_false")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--no-reference", action="store_true", help="measure ctgen only")
    ap.add_argument("--background-load", type=int, default=0,
                    help="run N CPU-bound single-thread processes on the same cores during each measurement")
    ap.add_argument("--model", default="paper", choices=("paper", "tiny"),
                    help="tiny: CTViTConfig.tiny (32x32 slices, ctgen only), for smoke runs")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=("ctgen", "reference"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.workload, args.slices = args.workload[0], args.slices[0][0]
        _child(args)
        return 0
    workloads = args.workload or ["gen"]
    slices = args.slices or [[17]]
    if len(slices) != len(workloads):
        ap.error("give one --slices list per --workload")
    sys.path.insert(0, REF_HELPER)
    import generatect_runtime as rt

    reason = None if not args.no_reference else "--no-reference"
    reason = reason or ("--model tiny" if args.model == "tiny" else None) or rt.skip_reason()
    impls = ["ctgen"] + ([] if reason else ["reference"])
    print(f"CT-ViT benchmark: threads={args.threads} batch={args.batch} optimizer={args.optimizer} "
          f"background_load={args.background_load} "
          f"load avg {os.getloadavg()[0]:.2f}; reference: {'GenerateCT at ' + rt.checkout_dir() if not reason else 'off (' + reason + ')'}")
    records = []
    side = 8 if args.model == "paper" else 4
    for workload, counts in zip(workloads, slices):
        for f in counts:
            results = {impl: [] for impl in impls}
            for _ in range(args.rounds):
                for impl in impls:
                    results[impl].append(_spawn(impl, workload, f, args))
            ratio = side_by_side(results)
            records.append({"workload": workload, "slices": f, "runs": results, "side_by_side": ratio})
            print(f"\n== {workload}, {f} slices ({1 + (f - 1) // 2} x {side} x {side} tokens) ==")
            for runs in results.values():
                for r in runs:
                    print("  " + _fmt(r))
            if ratio:
                print("  " + side_by_side_line(ratio))
            print(f"  load avg {os.getloadavg()[0]:.2f}")
    if args.json:
        save_results(args.json, "ctvit", args, records,
                     reference="GenerateCT at " + rt.checkout_dir() if not reason else f"skipped ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
