"""Batched T5 encoding: ctgen (JAX) vs transformers (PyTorch) on the same CPU, same threads.

    python benchmarks/bench_t5.py [--size base] [--batch 32] [--length 48] [--steps 5] [--rounds 1]
    ctgen bench t5 --size tiny --batch 4 --length 16 --steps 1 --no-torch        # smoke size

Both encoders get random weights of the same size (no download) and the same batch of
`--length`-token prompts. Each implementation runs in a fresh process (peak RSS = ru_maxrss of that
process) pinned to --threads cores (torch.set_num_threads too); ctgen and transformers processes
alternate (--rounds pairs). In each process: a warm-up call (ctgen: compilation, timed apart, then
its first call), then --steps timed calls, reported as min / median / max. ctgen's call is the
jitted encoder as `ctgen.text.encode.encode_ids` runs it (length rounded up to a multiple of 16,
padded positions zeroed); transformers' is `T5EncoderModel` under `torch.inference_mode`.

Reported per run: prompts/s at the median time; the matmul FLOPs of the encoder counted from its
shapes (`encoder_flops`) per second, as a fraction of the float32 matmul rate of a 2048^3 product
measured in the same process afterwards (jnp for ctgen, torch for transformers); for ctgen also the
loop-corrected XLA count and MFU against the jitted matmul peak (_common.flop_fields, as the other
scripts). With both sides: ctgen's speed and memory ratio to transformers (_common.side_by_side).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import compile_timed, flop_fields, flop_lines, peak_gb, pin, run_child, save_results  # noqa: E402
from _common import side_by_side, side_by_side_line  # noqa: E402  (shared benchmark plumbing)

LENGTH_BUCKET = 16  # ctgen.text.encode.LENGTH_BUCKET (not imported: the torch child stays free of jax)


def encoder_flops(cfg, length: int) -> float:
    """Matmul FLOPs of one prompt of `length` tokens through the encoder."""
    d, inner, ff, n = cfg.d_model, cfg.inner_dim, cfg.d_ff, length
    per_layer = 2 * n * d * inner * 4 + 2 * 2 * n * n * inner + 2 * n * d * ff * 3
    return float(cfg.num_layers * per_layer)


def _inputs(cfg, batch: int, length: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (batch, length)).astype(np.int32)
    ids[:, -1] = 1  # EOS
    return ids, np.ones_like(ids, bool)


def _timed(call, steps: int) -> list[float]:
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


# --- ctgen ----------------------------------------------------------------------------------------
def run_ctgen(args, cfg) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ctgen.text.t5 import T5Encoder

    ids, mask = _inputs(cfg, args.batch, args.length)
    padded = -(-args.length // LENGTH_BUCKET) * LENGTH_BUCKET
    ids = jnp.asarray(np.pad(ids, ((0, 0), (0, padded - args.length))))
    mask = jnp.asarray(np.pad(mask, ((0, 0), (0, padded - args.length))))
    graphdef, state = nnx.split(T5Encoder(cfg, rngs=nnx.Rngs(0)))
    encode = jax.jit(lambda s, i, m: jnp.where(m[:, :, None], nnx.merge(graphdef, s)(i, m), 0.0))
    compiled, compile_s = compile_timed(encode, state, ids, mask)
    times = _timed(lambda: compiled(state, ids, mask).block_until_ready(), args.steps)
    out = {"impl": "ctgen", "first": compile_s + times[0], "compile": compile_s, "first_call": times[0],
           "steady": times[1:], "peak_gb": peak_gb(), "note": f"JAX jit, length {padded}"}
    out.update(flop_fields(compiled, statistics.median(times[1:])))
    return out


# --- transformers ---------------------------------------------------------------------------------
def run_transformers(args, cfg) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    ids, mask = _inputs(cfg, args.batch, args.length)
    hf_cfg = transformers.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                                   num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(hf_cfg).eval()
    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def call():
        with torch.inference_mode():
            model(input_ids=t_ids, attention_mask=t_mask)

    times = _timed(call, args.steps)
    out = {"impl": "transformers", "first": times[0], "steady": times[1:], "peak_gb": peak_gb(),
           "note": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads"}
    a = torch.ones(2048, 2048)
    best = min(_timed(lambda: torch.matmul(a, a), 4)[1:])
    out["torch_matmul_gflops"] = 2 * 2048**3 / best / 1e9
    return out


# --- driver ---------------------------------------------------------------------------------------
def _analytic(run: dict, flops: float, batch: int) -> None:
    """Prompts/s and the shape-counted FLOP rate at the median time, against the same process's matmul rate."""
    med = statistics.median(run["steady"])
    rate = flops / med / 1e9
    peak = run.get("peak_gflops", run.get("torch_matmul_gflops"))
    run.update(seconds_per_batch=med, prompts_per_s=batch / med, analytic_gflops_per_s=rate,
               analytic_of_matmul=rate / peak)


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['impl']:>12s}: FAILED {r['error']}"
    s = r["steady"]
    line = (f"{r['impl']:>12s}: steady {r['seconds_per_batch']:.4f} s (min {min(s):.4f}, max {max(s):.4f}, "
            f"n={len(s)})  first {r['first']:.2f} s  peak RSS {r['peak_gb']:.2f} GB  [{r['note']}]\n"
            f"{'':14s}{r['prompts_per_s']:.1f} prompts/s; {r['analytic_gflops_per_s']:.1f} GFLOP/s counted from the "
            f"shapes = {r['analytic_of_matmul']:.0%} of this process's matmul rate")
    if "xla_flops" in r:
        line += flop_lines(r, indent=14)
    return line


def _spawn(impl: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--size", args.size, "--batch",
           str(args.batch), "--length", str(args.length), "--steps", str(args.steps), "--threads", str(args.threads)]
    return run_child(cmd, impl, args.threads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base", help="T5 v1.1 preset (default: base)")
    ap.add_argument("--batch", type=int, default=32, help="prompts per call (default: 32)")
    ap.add_argument("--length", type=int, default=48, help="tokens per prompt (default: 48)")
    ap.add_argument("--steps", "--repeats", dest="steps", type=int, default=5,
                    help="timed calls per process after the warm-up (default: 5)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating ctgen/transformers process pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=("ctgen", "reference"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from ctgen.text.config import T5Config

    cfg = T5Config.preset(args.size)
    if args.child:
        pin(args.threads)
        out = run_ctgen(args, cfg) if args.child == "ctgen" else run_transformers(args, cfg)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    impls = ["ctgen"] + ([] if args.no_torch else ["reference"])
    flops = encoder_flops(cfg, args.length) * args.batch
    print(f"T5 v1.1 {args.size} encoder, batch {args.batch} x {args.length} tokens, float32, threads={args.threads}, "
          f"load avg {os.getloadavg()[0]:.2f}; reference: {'off (--no-torch)' if args.no_torch else 'transformers'}")
    runs = {impl: [] for impl in impls}
    for _ in range(args.rounds):
        for impl in impls:
            r = _spawn(impl, args)
            if "error" not in r:
                _analytic(r, flops, args.batch)
            runs[impl].append(r)
            print("  " + _fmt(r), flush=True)
    ratio = side_by_side(runs)
    if ratio:
        print("  " + side_by_side_line(ratio))
    if args.json:
        save_results(args.json, "t5", args,
                     [{"workload": f"encode {args.batch}x{args.length}", "runs": runs, "side_by_side": ratio}],
                     reference="transformers (torch)" if not args.no_torch else "skipped (--no-torch)",
                     flops_per_batch=flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
