"""The two matmuls of one attention block pair, alone: XLA:CPU against NumPy's BLAS on the same shapes.

The MaskGIT's blocked attention at 201 slices spends most of its time in two batched dots per block
pair: scores = Q K^T (contraction over the 64-wide head) and out = P V (contraction over the key
block). This prints the rate of each, as XLA compiles it (several equivalent einsum layouts) and as
NumPy's matmul (its BLAS) does it, next to a square float32 matmul, in GFLOP/s; the best of --repeats
calls after one warm-up. Defaults: batch x heads = 16 (cond + null, 8 heads), blocks of 2048 tokens
(the generation default `maskgit.attention_block`), head width 64.

    python benchmarks/bench_attention_dots.py
    XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=false" python benchmarks/bench_attention_dots.py
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _best(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(batch: int, block: int, head: int, square: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, block, head), np.float32)
    k = rng.standard_normal((batch, block, head), np.float32)
    p = rng.standard_normal((batch, block, block), np.float32)
    a = rng.standard_normal((square, square), np.float32)
    qj, kj, pj, aj = map(jnp.asarray, (q, k, p, a))
    flops = 2 * batch * block * block * head

    def xla(fn, *args):
        f = jax.jit(fn)
        return lambda: f(*args).block_until_ready()

    calls = {
        "QK^T xla bqd,bkd->bqk": (flops, xla(lambda x, y: jnp.einsum("bqd,bkd->bqk", x, y), qj, kj)),
        "QK^T xla bkd,bqd->bkq": (flops, xla(lambda x, y: jnp.einsum("bkd,bqd->bkq", y, x), qj, kj)),
        "QK^T numpy": (flops, lambda: np.matmul(q, k.transpose(0, 2, 1))),
        "PV xla bqk,bkd->bqd": (flops, xla(lambda x, y: jnp.einsum("bqk,bkd->bqd", x, y), pj, kj)),
        "PV numpy": (flops, lambda: np.matmul(p, k)),
        f"square {square} xla": (2 * square ** 3, xla(lambda x: x @ x, aj)),
        f"square {square} numpy": (2 * square ** 3, lambda: a @ a),
    }
    return {name: fl / _best(call, repeats) / 1e9 for name, (fl, call) in calls.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="batch x heads")
    ap.add_argument("--block", type=int, default=2048, help="query and key block length")
    ap.add_argument("--head", type=int, default=64, help="head width")
    ap.add_argument("--square", type=int, default=2048, help="size of the square reference matmul")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if min(args.batch, args.block, args.head, args.square, args.repeats) < 1:
        ap.error("all sizes and --repeats must be positive")
    rates = run(args.batch, args.block, args.head, args.square, args.repeats)
    print(f"attention dots: batch x heads {args.batch}, block {args.block}, head {args.head}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load avg {os.getloadavg()[0]:.2f}")
    for name, r in rates.items():
        print(f"  {name:28s} {r:7.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "gflops_per_s": rates}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
