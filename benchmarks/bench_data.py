"""Data-layer throughput: phantom generation, `prepare` of CT-RATE-sized NIfTIs, grain loader.

    python benchmarks/bench_data.py [--work /tmp/ctgen_bench_data] [--volumes 4] [--phantoms 16]

1. Phantom generation time per volume at the prepared grid (201 x 128 x 128) and at a full
   CT-RATE-like grid (300 x 512 x 512, 0.75 / 1.0 mm; one sample).
2. `prepare` throughput (volumes/s) for 512 x 512 x 300 int16 `.nii.gz` inputs resized to
   201 x 128 x 128, with 1 and 2 conversion processes.
3. Loader throughput of `volume_pipeline` at the paper CT-ViT batch (4 x 201 x 128 x 128) in
   batches/s and volumes/s, with 0 and 2 grain worker processes, compared with the training step's
   consumption (GenerateCT's reference step ~30 s on this machine; ctgen aims at ~15 s).

Numbers depend on the machine and on what else runs on it; the script prints what it measured.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import save_results  # noqa: E402  (shared benchmark plumbing)


def _phantom_times(n: int, big: bool = True) -> dict:
    from ctgen.data.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, make_phantom

    make_phantom(0, DEFAULT_SHAPE, DEFAULT_SPACING)  # warm-up (imports, caches)
    times = []
    for s in range(n):
        t = time.perf_counter()
        make_phantom(100 + s, DEFAULT_SHAPE, DEFAULT_SPACING)
        times.append(time.perf_counter() - t)
    per = sum(times) / n
    print(f"phantom 201x128x128: {per:.2f} s per phantom ({1 / per:.2f} phantoms/s, 1 process, mean of {n})")
    out = {"phantom_201x128x128_s": {"mean": per, "min": min(times), "max": max(times), "n": n}}
    if big:
        t = time.perf_counter()
        make_phantom(1, (300, 512, 512), (1.0, 0.75, 0.75))
        dt = time.perf_counter() - t
        print(f"phantom 300x512x512 (0.75 mm in-plane, 1 mm slices): {dt:.1f} s (1 sample)")
        out["phantom_300x512x512_s"] = dt
    return out


def _make_inputs(work: str, n: int) -> str:
    """n CT-RATE-sized int16 NIfTIs (upsampled phantoms + noise) and a CSV; reused if present."""
    from ctgen.data.phantom import make_phantom
    from ctgen.data.preprocess import resize_volume
    from ctgen.io.nifti import write_nifti

    folder = os.path.join(work, "nifti512")
    csv_path = os.path.join(folder, "list.csv")
    if os.path.exists(csv_path):
        with open(csv_path) as f:
            if sum(1 for _ in f) - 1 >= n:
                return csv_path
    os.makedirs(folder, exist_ok=True)
    rows = []
    t = time.perf_counter()
    for i in range(n):
        ph = make_phantom(1000 + i)
        big = resize_volume(ph.hu.astype(np.float32), (300, 512, 512))
        big += np.random.default_rng(i).normal(0, 15, big.shape).astype(np.float32)
        path = os.path.join(folder, f"vol_{i:03d}.nii.gz")
        write_nifti(path, np.rint(big).astype(np.int16), (1.0, 0.68, 0.68))
        rows.append([os.path.basename(path), ph.report["impression"], ph.attributes["age"], ph.attributes["sex"]])
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text", "age", "sex"])
        w.writerows(rows)
    size = sum(os.path.getsize(os.path.join(folder, r[0])) for r in rows) / n / 2 ** 20
    print(f"made {n} inputs of 512x512x300 int16 ({size:.0f} MiB .nii.gz each) in {time.perf_counter() - t:.0f} s")
    return csv_path


def _prepare_throughput(work: str, csv_path: str, workers: list[int]) -> list[dict]:
    from ctgen.data.features import DatasetConfig
    from ctgen.data.preprocess import GridConfig
    from ctgen.data.sources import NiftiCsvSource
    from ctgen.data.writer import build

    n = sum(1 for _ in open(csv_path)) - 1
    out = []
    for w in workers:
        out = os.path.join(work, f"prepared_w{w}")
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        build(NiftiCsvSource(csv_path), DatasetConfig(name="bench", grid=GridConfig((201, 128, 128))), out,
              validation_fraction=0.0, num_workers=w, progress=False, log=lambda s: None)
        dt = time.perf_counter() - t
        how = "in-process" if w == 0 else f"{w} worker process(es)"
        print(f"prepare 512x512x300 -> 201x128x128, {how}: {n / dt:.2f} volumes/s ({dt:.1f} s for {n})")
        out.append({"workers": w, "volumes": n, "seconds": dt, "volumes_per_s": n / dt})
    return out


def _loader_throughput(work: str, n_phantoms: int, batches: int, workers: list[int]) -> list[dict]:
    from ctgen.data.features import DatasetConfig
    from ctgen.data.pipelines import LoaderOptions, volume_pipeline
    from ctgen.data.preprocess import GridConfig
    from ctgen.data.sources import PhantomSource
    from ctgen.data.writer import build

    grid = GridConfig((201, 128, 128))
    out = os.path.join(work, "phantoms201")
    t = time.perf_counter()
    summary = build(PhantomSource(n_phantoms, 0, grid), DatasetConfig(name="bench", grid=grid, phantom=True), out,
                    validation_fraction=0.0, num_workers=2, progress=False, log=lambda s: None)
    dt = time.perf_counter() - t
    if dt > 1:
        print(f"prepare {n_phantoms} phantoms 201x128x128 with labels, 2 processes: {n_phantoms / dt:.2f} phantoms/s")
    out = []
    for w in workers:
        it = volume_pipeline(summary["path"], "train", global_batch_size=4, seed=0,
                             options=LoaderOptions(worker_count=w, read_threads=2, prefetch_batches=2))
        next(it)  # start-up (worker spawn) is not throughput
        t = time.perf_counter()
        for _ in range(batches):
            b = next(it)
        dt = time.perf_counter() - t
        assert b["volume"].shape == (4, 201, 128, 128)
        rate = batches / dt
        print(f"loader batch 4x201x128x128, {w} grain workers: {rate:.2f} batches/s = {4 * rate:.1f} volumes/s "
              f"(vs ~{4 / 15:.2f} volumes/s consumed by a 15 s step: {4 * rate / (4 / 15):.0f}x)")
        out.append({"grain_workers": w, "batches": batches, "batches_per_s": rate, "volumes_per_s": 4 * rate})
        if hasattr(it, "close"):
            it.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/ctgen_bench_data", help="scratch folder (inputs are reused)")
    p.add_argument("--volumes", type=int, default=4, help="CT-RATE-sized NIfTI inputs to prepare")
    p.add_argument("--phantoms", type=int, default=16, help="phantoms in the loader dataset")
    p.add_argument("--phantom-samples", type=int, default=5, help="phantoms timed at 201x128x128")
    p.add_argument("--batches", type=int, default=30, help="loader batches timed")
    p.add_argument("--prepare-workers", default="0,1,2", help="0 = convert in the calling process")
    p.add_argument("--loader-workers", default="0,2")
    p.add_argument("--skip", default="", help="comma list of parts to skip: phantom,phantom512,prepare,loader "
                                              "(phantom512: the one 300x512x512 phantom)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = {}
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    skip = set(args.skip.split(","))
    os.makedirs(args.work, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs (shared; numbers vary with load)")
    if "phantom" not in skip:
        results["phantom"] = _phantom_times(args.phantom_samples, big="phantom512" not in skip)
    if "prepare" not in skip:
        csv_path = _make_inputs(args.work, args.volumes)
        results["prepare"] = _prepare_throughput(args.work, csv_path, [int(w) for w in args.prepare_workers.split(",")])
    if "loader" not in skip:
        results["loader"] = _loader_throughput(args.work, args.phantoms, args.batches,
                                               [int(w) for w in args.loader_workers.split(",")])
    if args.json:
        save_results(args.json, "data", args, results)


if __name__ == "__main__":
    main()
