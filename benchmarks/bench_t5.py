"""Batched T5 encoding throughput: ctgen (JAX) vs transformers (PyTorch) on the same CPU.

    python benchmarks/bench_t5.py [--size base] [--batch 32] [--length 48] [--repeats 5]

Both encoders get random weights of the same size (no download) and the same batch of
`--length`-token prompts. Reports prompts/s, the achieved FLOP/s (matmul FLOPs of the encoder,
counted analytically) and that as a fraction of this machine's measured float32 matmul rate
(the faster of a jitted 2048^3 `jnp.dot` and numpy's 2048^3 float32 matmul, best of several).
Runs are interleaved (ours, theirs, matmul, ...) and the best of `--repeats` rounds is reported,
so a shared machine affects all of them alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import save_results  # noqa: E402  (shared benchmark plumbing)


def encoder_flops(cfg, length: int) -> float:
    """Matmul FLOPs of one prompt of `length` tokens through the encoder."""
    d, inner, ff, n = cfg.d_model, cfg.inner_dim, cfg.d_ff, length
    per_layer = 2 * n * d * inner * 4 + 2 * 2 * n * n * inner + 2 * n * d * ff * 3
    return float(cfg.num_layers * per_layer)


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", help="T5 v1.1 preset (default: base)")
    parser.add_argument("--batch", type=int, default=32, help="prompts per call (default: 32)")
    parser.add_argument("--length", type=int, default=48, help="tokens per prompt (default: 48)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best is reported (default: 5)")
    parser.add_argument("--calls", type=int, default=3, help="encoder calls per timed round (default: 3)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ctgen.text.config import T5Config
    from ctgen.text.encode import encode_ids
    from ctgen.text.t5 import T5Encoder

    cfg = T5Config.preset(args.size)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (args.batch, args.length)).astype(np.int32)
    ids[:, -1] = 1
    mask = np.ones_like(ids, bool)

    model = T5Encoder(cfg, rngs=nnx.Rngs(0))
    run_ours = lambda: encode_ids(model, ids, mask)[0].block_until_ready()  # noqa: E731
    run_ours()  # compile

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    run_matmul = lambda: matmul(a, a).block_until_ready()  # noqa: E731
    a_np = np.asarray(a)
    run_np_matmul = lambda: a_np @ a_np  # noqa: E731

    run_theirs = None
    if not args.no_torch:
        import torch
        import transformers

        hf_cfg = transformers.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                                       num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                       feed_forward_proj="gated-gelu", dropout_rate=0.0)
        hf = transformers.T5EncoderModel(hf_cfg).eval()
        t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

        def hf_forward():
            with torch.inference_mode():
                hf(input_ids=t_ids, attention_mask=t_mask)

        run_theirs = hf_forward
        run_theirs()

    times = {"ours": [], "theirs": [], "matmul": [], "np_matmul": []}
    for _ in range(args.repeats):
        times["ours"].append(best_time(run_ours, args.calls))
        if run_theirs is not None:
            times["theirs"].append(best_time(run_theirs, args.calls))
        times["matmul"].append(best_time(run_matmul, 3))
        times["np_matmul"].append(best_time(run_np_matmul, 3))
    jnp_rate, np_rate = (2 * 2048**3 / min(times[k]) for k in ("matmul", "np_matmul"))
    matmul_rate = max(jnp_rate, np_rate)
    flops = encoder_flops(cfg, args.length) * args.batch

    print(f"T5 v1.1 {args.size} encoder, batch {args.batch} x {args.length} tokens, float32, "
          f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
    print(f"measured float32 matmul rate (2048^3): jnp {jnp_rate / 1e9:.1f} GFLOP/s, numpy {np_rate / 1e9:.1f} "
          f"GFLOP/s; fractions below are of {matmul_rate / 1e9:.1f}")
    if run_theirs is not None:
        print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'implementation':<40}{'s/batch':>10}{'prompts/s':>12}{'GFLOP/s':>10}{'of matmul':>11}")
    rows = [("ctgen (JAX, jit)", min(times["ours"]))]
    if run_theirs is not None:
        rows.append((f"transformers {transformers.__version__} (torch {torch.__version__})", min(times["theirs"])))
    for name, t in rows:
        print(f"{name:<40}{t:>10.3f}{args.batch / t:>12.1f}{flops / t / 1e9:>10.1f}{flops / t / matmul_rate:>10.0%}")
    if args.json:
        per_round = {k: {"min": min(v), "max": max(v), "n": len(v)} for k, v in times.items() if v}
        save_results(args.json, "t5", args,
                     [{"impl": name, "seconds_per_batch": t, "prompts_per_s": args.batch / t,
                       "gflops_per_s": flops / t / 1e9, "of_matmul": flops / t / matmul_rate} for name, t in rows],
                     reference="transformers (torch)" if run_theirs is not None else "skipped (--no-torch)",
                     flops_per_batch=flops, matmul_gflops={"jnp": jnp_rate / 1e9, "numpy": np_rate / 1e9},
                     seconds_per_batch=per_round)  # best of --calls calls per round, over --repeats rounds


if __name__ == "__main__":
    main()
