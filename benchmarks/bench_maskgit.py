"""MaskGIT speed and peak memory: ctgen (JAX) vs GenerateCT's PyTorch MaskGit, same shapes and threads.

Workloads (paper architecture: 8192 codes, dim 512, depth 6, 8 heads x 64, 768-wide text of 64 tokens):
  forward  one forward of batch --batch (default 2: a cond + null pair) at S slices ((S+1)/2 x 8 x 8
           tokens), no gradients. GenerateCT: `MaskGit.forward`.
  sample   a full classifier-free-guided decode (--decode-steps, default 18; guidance scale 5,
           temperature 0.9, as GenerateCT's inference) of one prompt at S slices, up to the token
           ids; prints seconds per decoding step. ctgen: `generate_ids` (cond and null in one batched
           forward per step), compiled apart. GenerateCT: its own `MaskGITTransformer.sample` loop
           (two batch-1 forwards per step); its final CT-ViT decode is replaced by returning the ids
           (`bench_ctvit.py --workload infer` measures the decode), and the CT-ViT its constructor
           needs is a narrow stand-in with the paper's token geometry (the loop reads only that).
  train    a training step of --batch volumes at S slices: masked-token cross-entropy, forward +
           backward + Adam(3e-5, 0.9, 0.99) with gradient clipping at 2.0 (GenerateCT's trainer).
           ctgen: remat of the projections, its useful FLOPs (counted from the shapes) and the XLA
           count per second against the float32 matmul peak of the same process (MFU). GenerateCT:
           `MaskGITTransformer.forward(video_codebook_ids=..., text_embeds=...)` (its training loss,
           text dropout 0.25), `backward`, `clip_grad_norm_`, `Adam.step` over the MaskGit's weights.
GenerateCT evaluates its position-bias MLP on all N^2 token pairs, which at 201 slices needs more
memory than this machine has; its side runs with that MLP evaluated in 512-row chunks (same
arithmetic, a benchmark-only monkeypatch, `--no-chunkcpb` turns it off).
Every measurement runs in a fresh process (peak RSS = ru_maxrss of that process) pinned to
--threads cores (torch.set_num_threads too); ctgen and reference runs are interleaved (--rounds
pairs); a warm-up call (compilation for ctgen) is excluded from the steady time. With the
reference, each workload ends with ctgen's speed and memory ratio to it (_common.side_by_side), also
in the JSON (`side_by_side`).

    python benchmarks/bench_maskgit.py --workload forward --slices 33 201
    CTGEN_GENERATECT_DIR=/path/to/GenerateCT ctgen bench maskgit --workload forward --slices 201 \\
        --workload sample --slices 201 --workload train --slices 33 --rounds 2
    CTGEN_GENERATECT_DIR=/path/to/GenerateCT ctgen bench maskgit --workload sample --slices 3 \\
        --decode-steps 2 --steps 1      # a quick check of the reference path
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
from _common import peak_gb as _peak_gb, save_results, side_by_side, side_by_side_line  # noqa: E402


def _grid(slices: int) -> tuple[int, int, int]:
    return (1 + (slices - 1) // 2, 8, 8)


def _inputs(batch: int, slices: int, vocab: int, width: int = 768):
    """Token ids in [0, vocab), text states and mask (the second half of the batch: null text)."""
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
    ids, ctx, mask = (jnp.asarray(x) for x in _inputs(args.batch, args.slices, _vocab(args, cfg), cfg.dim_context))
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
        graphdef, weights = nnx.split(model)
        decode = jax.jit(lambda w, c, k, key: generate_ids(nnx.merge(graphdef, w), c, k, key, grid=grid, options=opts))
        compiled, extra["compile"] = compile_timed(decode, weights, ctx[:1], mask[:1], jax.random.key(0))

        def call():
            jax.block_until_ready(compiled(weights, ctx[:1], mask[:1], jax.random.key(0)))
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
    if args.workload in ("forward", "sample"):
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


def _vocab(args, cfg) -> int:
    """Ids drawn for the inputs: training targets are codes; a forward's input may be the mask id."""
    return cfg.num_tokens if args.workload == "train" else cfg.num_tokens + 1


def _ctvit_standin(ref, cfg):
    """A narrow GenerateCT CTViT with the paper's token geometry (128^2 slices, 16^2 patches, 2 slices
    per temporal patch): `MaskGITTransformer` needs one, and its training step (given token ids) and
    sampling loop (whose decode is replaced) read only that geometry from it."""
    return ref.CTViT(dim=8, codebook_size=16, image_size=cfg.image_size, patch_size=cfg.patch_size,
                     temporal_patch_size=cfg.temporal_patch_size, spatial_depth=1, temporal_depth=1, dim_head=8,
                     heads=1, use_vgg_and_gan=False)


def run_reference(args) -> dict:
    sys.path.insert(0, REF_HELPER)
    import generatect_runtime as rt
    import torch

    from ctgen.models.ctvit import CTViTConfig
    from ctgen.models.maskgit import MaskGITConfig

    torch.set_num_threads(args.threads)
    ref = rt.load_maskgit()
    if args.chunkcpb:
        ref.attention.ContinuousPositionBias.forward = _chunked_position_bias(ref)
    cfg = MaskGITConfig.paper()
    maskgit = rt.build_maskgit_reference(cfg, seed=0)
    ids, ctx, mask = _inputs(args.batch, args.slices, _vocab(args, cfg))
    grid = _grid(args.slices)
    context = torch.from_numpy(ctx)
    note = "torch, position-bias MLP in 512-row chunks" if args.chunkcpb else "torch, original code"
    if args.workload == "forward":
        maskgit.eval()
        kw = dict(video_patch_shape=grid, context=context, text_mask=torch.from_numpy(mask))
        x = torch.from_numpy(ids)

        def call():
            with torch.no_grad():
                maskgit(x, **kw)
    else:
        model = ref.MaskGITTransformer(maskgit=maskgit, ctvit=_ctvit_standin(ref, CTViTConfig.paper()),
                                       steps=args.decode_steps if args.workload == "sample" else 18)
        if args.workload == "sample":
            model.encode_texts = lambda texts, output_device=None: context[:1]  # the prompt's T5 states
            model.ctvit.decode_from_codebook_indices = lambda ids: ids  # stop at the ids, as ctgen's sample
            note += f", MaskGITTransformer.sample ({args.decode_steps} steps, guidance 5), no decode"

            def call():
                model.sample(texts="a prompt", num_frames=args.slices, cond_scale=5.0)
        else:
            model.train()
            params = list(maskgit.parameters())
            opt = torch.optim.Adam(params, lr=3e-5, betas=(0.9, 0.99))
            codes = torch.from_numpy(ids).reshape(args.batch, *grid)
            note += ", MaskGITTransformer.forward + backward + clip 2.0 + Adam"

            def call():
                loss = model(video_codebook_ids=codes, text_embeds=context)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 2.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

    first, steady = _timed(call, args.steps)
    return {"impl": "GenerateCT", "first": first, "steady": steady, "peak_gb": _peak_gb(), "note": note}


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
    ap.add_argument("--rounds", type=int, default=1, help="interleaved ctgen/reference process pairs")
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
            impls = ["ctgen"] + ([] if reason else ["reference"])
            results = {impl: [] for impl in impls}
            for _ in range(args.rounds):
                for impl in impls:
                    results[impl].append(_spawn(impl, workload, f, args))
            ratio = side_by_side(results)
            records.append({"workload": workload, "slices": f, "runs": results, "side_by_side": ratio})
            print(f"\n== {workload}, {f} slices ({_grid(f)[0] * 64} tokens) ==")
            for runs in results.values():
                for r in runs:
                    print("  " + _fmt(r, workload, args))
            if ratio:
                print("  " + side_by_side_line(ratio))
            print(f"  load avg {os.getloadavg()[0]:.2f}")
    if args.json:
        save_results(args.json, "maskgit", args, records,
                     reference="GenerateCT at " + rt.checkout_dir() if not reason else f"skipped ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
