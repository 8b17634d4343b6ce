"""Checkpoint cost of the shared loop: how long training is blocked by an asynchronous save, how
long the save takes in the background, a synchronous save, and a restore onto another mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_checkpoint.py --mb 256
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ctgen.parallel.mesh import make_mesh
from ctgen.train.checkpoint import Checkpointer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import save_results, spread  # noqa: E402  (shared benchmark plumbing)


def state_of(mb: int, mesh):
    n = int(mb * 2**20 / 4 / 1024)  # rows of 1024 float32
    n -= n % mesh.size
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    make = jax.jit(lambda: {"params": {"w": jnp.ones((n, 1024))}, "step": jnp.int32(1)},
                   out_shardings={"params": {"w": sharding}, "step": NamedSharding(mesh, P())})
    return make()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="state size in MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = {}
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    state = state_of(args.mb, mesh)
    jax.block_until_ready(state)
    print(f"state {args.mb} MiB on {mesh.size} devices (fsdp={mesh.size}), {jax.devices()[0].platform}")
    for mode in ("async", "sync"):
        blocked, total = [], []
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                ck = Checkpointer(d, async_save=(mode == "async"))
                t0 = time.perf_counter()
                ck.save(r + 1, state, {"pos": r})
                t1 = time.perf_counter()
                ck.wait()
                t2 = time.perf_counter()
                ck.close()
            blocked.append(t1 - t0)
            total.append(t2 - t0)
        print(f"{mode:5s} save: training blocked {np.median(blocked):.3f} s, complete after {np.median(total):.3f} s"
              f" (median of {args.repeats})")
        results[f"{mode}_save"] = {"blocked_s": spread(blocked), "complete_s": spread(total)}
    if jax.device_count() < 2:
        print("restore onto another mesh: skipped (needs >= 2 devices; set XLA_FLAGS as in the docstring)")
        _write(args, mesh, results)
        return
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(d, async_save=False)
        ck.save(1, state, {"pos": 0})
        other = make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            other, P(("data", "fsdp"), None) if x.ndim else P())), state)
        t0 = time.perf_counter()
        restored, _ = ck.restore(1, abstract)
        jax.block_until_ready(restored)
        dt = time.perf_counter() - t0
        print(f"restore onto data=2 x fsdp={other.shape['fsdp']}: {dt:.3f} s")
        results["restore_other_mesh_s"] = dt
        ck.close()
    _write(args, mesh, results)


def _write(args, mesh, results: dict) -> None:
    if args.json:
        save_results(args.json, "checkpoint", args, results, devices=mesh.size, platform=jax.devices()[0].platform)


if __name__ == "__main__":
    main()
