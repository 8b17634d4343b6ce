"""MaskGIT speed and peak memory: ctgen (JAX) vs GenerateCT's PyTorch MaskGit, same shapes and threads.

Workloads (paper architecture: 8192 codes, dim 512, depth 6, 8 heads x 64, 768-wide text of 64 tokens):
  forward  one forward of batch --batch (default 2: a cond + null pair) at S slices ((S+1)/2 x 8 x 8
           tokens), no gradients. GenerateCT evaluates its position-bias MLP on all N^2 token pairs,
           which at 201 slices needs more memory than this machine has; its side runs with that MLP
           evaluated in 512-row chunks (same arithmetic, a benchmark-only monkeypatch, `chunkcpb`).
  sample   ctgen only: a full classifier-free-guided decode (--decode-steps, default 18; cond and null
           in one batched forward per step) of one prompt at S slices; prints seconds per decoding
           step. GenerateCT's equivalent is 2 x steps forwards of batch 1 (compare with `forward`).
  train    ctgen only: a training step (masked-token loss, forward + backward + Adam with clipping)
           of --batch volumes at S slices; its useful FLOPs (counted from the shapes) per second against the
           float32 matmul peak measured in the same process (MFU).
Every measurement runs in a fresh process (peak RSS = ru_maxrss of that process) pinned to
--threads cores; a warm-up call (compilation for ctgen) is excluded from the steady time.

    python benchmarks/bench_maskgit.py --workload forward --slices 33 201
    CTGEN_GENERATECT_DIR=/path/to/GenerateCT ctgen bench maskgit --workload forward --slices 201 \\
        --workload sample --slices 201 --workload train --slices 33
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
TEXT_LEN = 64
sys.path.insert(0, HERE)
from _common import compile_timed, flop_fields, flop_lines, matmul_peak_gflops, run_child  # noqa: E402
from _common import peak_gb as _peak_gb, save_results  # noqa: E402  (shared benchmark plumbing)


def _grid(slices: int) -> tuple[int, int, int]:
    return (1 + (slices - 1) // 2, 8, 8)


def _inputs(batch: int, slices: int, vocab: int = 8193, width: int = 768):
    import numpy as np

    rng = np.random.default_rng(0)
    n = 64 * _grid(slices)[0]
    ids = rng.integers(0, vocab, (batch, n))
    ctx = rng.normal(size=(batch, TEXT_LEN, width)).astype(np.float32)
    mask = np.ones((batch, TEXT_LEN), bool)
    mask[batch // 2:] = False  # the null half of a CFG pair
    return ids, ctx, mask


def _timed(call, steps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


# --- ctgen ----------------------------------------------------------------------------------------
def model_flops(cfg, batch: int, n: int, text_len: int) -> float:
    """Useful FLOPs of one training step (forward + backward = 3 x forward, recomputation not
    counted): every matmul and both attention products. Counted by hand because XLA's cost analysis
    counts the body of a scan (remat over layers, blocked attention) once."""
    inner = cfg.heads * cfg.dim_head
    ff_inner = int(cfg.ff_mult * 2 / 3 * cfg.dim)
    per_token = (cfg.dim * inner * 3 + inner * cfg.dim  # self: q, kv, out
                 + cfg.dim * inner + inner * cfg.dim  # cross: q, out
                 + cfg.dim * 2 * ff_inner + ff_inner * cfg.dim)  # GEGLU
    layer = 2 * n * per_token + 2 * text_len * cfg.dim_context * 2 * inner  # cross kv on the text
    layer += 4 * n * n * inner + 4 * n * (text_len + cfg.cross_num_null_kv) * inner  # q.k and p.v
    forward = cfg.depth * layer + 2 * n * cfg.dim * cfg.num_tokens
    return 3.0 * batch * forward


def run_ctgen(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ctgen.models.maskgit import MaskGIT, MaskGITConfig
    from ctgen.sampling.maskgit import SampleConfig, generate_ids
    from ctgen.sampling.mask_schedule import training_mask
    from ctgen.stages.maskgit import masked_ce

    preset = MaskGITConfig.tiny if args.model == "tiny" else MaskGITConfig.paper
    cfg = preset(attention=args.attention, attention_block=args.block, remat=args.workload == "train",
                 remat_policy="projections")
    model = MaskGIT(cfg, rngs=nnx.Rngs(0))
    grid = _grid(args.slices)
    ids, ctx, mask = (jnp.asarray(x) for x in _inputs(args.batch, args.slices, cfg.num_tokens + 1, cfg.dim_context))
    note = f"attention={args.attention} block={args.block}" + (" model=tiny" if args.model == "tiny" else "")
    extra = {}
    compiled = None
    if args.workload == "forward":
        graphdef, weights = nnx.split(model)
        fwd = jax.jit(lambda w, i, c, k: nnx.merge(graphdef, w)(i, grid, c, k))
        compiled, compile_s = compile_timed(fwd, weights, ids, ctx, mask)
        extra["compile"] = compile_s

        def call():
            jax.block_until_ready(compiled(weights, ids, ctx, mask))
    elif args.workload == "sample":
        opts = SampleConfig(steps=args.decode_steps)

        def call():
            jax.block_until_ready(generate_ids(model, ctx[:1], mask[:1], jax.random.key(0), grid=grid, options=opts))
    else:
        graphdef, params = nnx.split(model)
        opt = optax.chain(optax.clip_by_global_norm(2.0), optax.adam(3e-5, 0.9, 0.99))
        opt_state = opt.init(params)

        def loss_fn(params, rng):
            m = nnx.merge(graphdef, params)
            masked = training_mask(rng, ids.shape[0], ids.shape[1])
            logits = m(jnp.where(masked, cfg.mask_id, ids), grid, ctx, mask)
            ce, _ = masked_ce(logits, ids, masked)
            return jnp.sum(ce) / jnp.sum(masked)

        @jax.jit
        def step(params, opt_state, rng):
            loss, grads = jax.value_and_grad(loss_fn)(params, rng)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        compiled, extra["compile"] = compile_timed(step, params, opt_state, jax.random.key(0))
        state = {"p": params, "o": opt_state, "i": 0}

        def call():
            state["p"], state["o"], loss = compiled(state["p"], state["o"], jax.random.key(state["i"]))
            state["i"] += 1
            jax.block_until_ready(loss)

        extra["flops"] = model_flops(cfg, ids.shape[0], ids.shape[1], TEXT_LEN)
        note += " remat=projections"
    first, steady = _timed(call, args.steps)
    if compiled is not None:
        extra["first_call"] = first  # the first call after compilation
    if args.workload == "forward":
        first += extra["compile"]  # as the first call of a plain jit would take
    if args.workload == "train":
        extra["peak_gflops"] = matmul_peak_gflops()
    if compiled is not None:
        extra.update(flop_fields(compiled, statistics.median(steady or [first]), extra.get("peak_gflops")))
    return {"impl": "ctgen", "first": first, "steady": steady, "peak_gb": _peak_gb(), "note": note, **extra}


# --- GenerateCT -----------------------------------------------------------------------------------
def _chunked_position_bias(rt, chunk: int = 512):
    """GenerateCT's ContinuousPositionBias.forward with the MLP run over 512 query rows at a time
    (the same arithmetic in the same order; only the peak of its N^2 x 64 activations shrinks)."""
    torch = rt.torch

    def forward(self, *dimensions, device=None):
        positions = [torch.arange(d) for d in dimensions]
        grid = torch.stack(torch.meshgrid(*positions, indexing="ij")).reshape(len(dimensions), -1).T
        out = []
        for start in range(0, grid.shape[0], chunk):
            rel = (grid[start:start + chunk, None, :] - grid[None, :, :]).float()
            rel = torch.sign(rel) * torch.log(rel.abs() + 1)
            for layer in self.net:
                rel = layer(rel)
            out.append(rel)
        return torch.cat(out).permute(2, 0, 1)

    return forward


def run_reference(args) -> dict:
    sys.path.insert(0, REF_HELPER)
    import generatect_runtime as rt
    import torch

    from ctgen.models.maskgit import MaskGITConfig

    torch.set_num_threads(args.threads)
    ref = rt.load_maskgit()
    if args.chunkcpb:
        ref.attention.ContinuousPositionBias.forward = _chunked_position_bias(ref)
    model = rt.build_maskgit_reference(MaskGITConfig.paper(), seed=0).eval()
    ids, ctx, mask = _inputs(args.batch, args.slices)
    kw = dict(video_patch_shape=_grid(args.slices), context=torch.from_numpy(ctx), text_mask=torch.from_numpy(mask))
    x = torch.from_numpy(ids)

    def call():
        with torch.no_grad():
            model(x, **kw)

    first, steady = _timed(call, args.steps)
    return {"impl": "GenerateCT", "first": first, "steady": steady, "peak_gb": _peak_gb(),
            "note": "torch, position-bias MLP in 512-row chunks" if args.chunkcpb else "torch, original code"}


# --- driver ---------------------------------------------------------------------------------------
def _spawn(impl: str, workload: str, slices: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--workload", workload, "--slices",
           str(slices), "--steps", str(args.steps), "--threads", str(args.threads), "--batch", str(args.batch),
           "--decode-steps", str(args.decode_steps), "--attention", args.attention, "--block", str(args.block),
           "--model", args.model]
    if not args.chunkcpb:
        cmd.append("--no-chunkcpb")
    return run_child(cmd, impl, args.threads)


def _fmt(r: dict, workload: str, args) -> str:
    if "error" in r:
        return f"{r['impl']:>10s}: FAILED {r['error']}"
    s = r["steady"]
    med = statistics.median(s)
    line = (f"{r['impl']:>10s}: steady {med:7.2f} s (min {min(s):.2f}, max {max(s):.2f}, n={len(s)})"
            f"  first {r['first']:7.2f} s  peak RSS {r['peak_gb']:5.2f} GB  [{r['note']}]")
    if workload == "sample":
        line += f"\n{'':12s}{med / args.decode_steps:.2f} s per decoding step ({args.decode_steps} steps, CFG pair)"
    if workload == "train" and r.get("flops"):
        rate = r["flops"] / med / 1e9
        line += (f"\n{'':12s}{r['flops'] / 1e12:.3f} TFLOP per step -> {rate:.1f} GFLOP/s; matmul peak "
                 f"{r['peak_gflops']:.1f} GFLOP/s -> MFU {rate / r['peak_gflops']:.1%}")
    if "xla_flops" in r:
        line += flop_lines(r)
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", choices=("forward", "sample", "train"),
                    help="repeatable; each applies to the --slices list that follows it")
    ap.add_argument("--slices", type=int, nargs="+", action="append")
    ap.add_argument("--steps", type=int, default=2, help="timed calls per process after the warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="forward/train batch (forward: 2 = a cond + null pair)")
    ap.add_argument("--decode-steps", type=int, default=18)
    ap.add_argument("--attention", default="auto", choices=("auto", "dense", "blocked", "fused"))
    ap.add_argument("--block", type=int, default=512, help="tokens per block of the blocked attention")
    ap.add_argument("--no-chunkcpb", dest="chunkcpb", action="store_false",
                    help="run GenerateCT's original N^2 position bias (fails at 201 slices on 24 GB)")
    ap.add_argument("--no-reference", action="store_true", help="measure ctgen only")
    ap.add_argument("--model", default="paper", choices=("paper", "tiny"),
                    help="tiny: MaskGITConfig.tiny (ctgen only, at most 15 slices), for smoke runs")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=("ctgen", "reference"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
        args.workload, args.slices = args.workload[0], args.slices[0][0]
        out = run_ctgen(args) if args.child == "ctgen" else run_reference(args)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    workloads = args.workload or ["forward"]
    slices = args.slices or [[33]]
    if len(slices) != len(workloads):
        ap.error("give one --slices list per --workload")
    sys.path.insert(0, REF_HELPER)
    import generatect_runtime as rt

    reason = "--no-reference" if args.no_reference else ("--model tiny" if args.model == "tiny" else rt.skip_reason())
    print(f"MaskGIT benchmark: threads={args.threads} batch={args.batch} load avg {os.getloadavg()[0]:.2f}; "
          f"reference: {'GenerateCT at ' + rt.checkout_dir() if not reason else 'off (' + reason + ')'}")
    records = []
    for workload, counts in zip(workloads, slices):
        for f in counts:
            impls = ["ctgen"] + (["reference"] if workload == "forward" and not reason else [])
            results = {impl: _spawn(impl, workload, f, args) for impl in impls}
            records.append({"workload": workload, "slices": f, "runs": results})
            print(f"\n== {workload}, {f} slices ({_grid(f)[0] * 64} tokens) ==")
            for r in results.values():
                print("  " + _fmt(r, workload, args))
            ok = {k: r for k, r in results.items() if "error" not in r}
            if len(ok) == 2:
                tc, tr = (statistics.median(ok[k]["steady"]) for k in ("ctgen", "reference"))
                print(f"  => ctgen is {tr / tc:.2f}x the reference's speed, at "
                      f"{ok['ctgen']['peak_gb'] / ok['reference']['peak_gb']:.2f}x its peak memory")
            print(f"  load avg {os.getloadavg()[0]:.2f}")
    if args.json:
        save_results(args.json, "maskgit", args, records,
                     reference="GenerateCT at " + rt.checkout_dir() if not reason else f"skipped ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
