"""Shared benchmark plumbing: fresh child processes, peak memory, the float32 matmul peak of this
process's cores, the FLOPs of a compiled XLA program, the machine description, Markdown tables.

Imported by the bench_*.py scripts (they put this folder on sys.path); not a benchmark itself.

FLOPs of a compiled program. XLA's `compiled.cost_analysis()["flops"]` counts the body of a
while loop once, whatever its trip count, so a scanned layer stack (remat), blocked attention or a
gradient-accumulation scan is undercounted (e.g. 6x for MaskGIT's six scanned layers).
`compiled_flops` therefore also walks the optimized HLO text: it counts the FLOPs of every dot and
convolution (2 x output elements x contracted elements) with each computation weighted by how often
it runs (a while body: its `known_trip_count`), and corrects XLA's figure by the difference
between that count and the same count with every loop run once. Elementwise work inside loop
bodies stays counted once (it is small next to the matmuls and convolutions of these models).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time


# --- processes ------------------------------------------------------------------------------------
def pin(threads: int) -> None:
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)


def peak_gb() -> float:
    """Peak resident memory of this process (ru_maxrss), GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


_LOAD = """
import os, sys, numpy as np
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:int(sys.argv[1])])
a = np.ones((384, 384), np.float32)
while True:
    a = np.tanh(a @ a * 1e-3)
"""


def run_child(cmd: list[str], impl: str, threads: int, background_load: int = 0, env: dict | None = None) -> dict:
    """One measurement in a fresh process (`threads` BLAS/OpenMP threads, `background_load` CPU-bound
    processes beside it): the JSON of its `RESULT ` line, or an error with the tail of its output."""
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    load = start_load(background_load, threads)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        for p in load:
            p.kill()
            p.wait()
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    return {"impl": impl, "error": f"exit {proc.returncode}: {tail}"}


def start_load(n: int, threads: int) -> list:
    """`n` single-threaded CPU-bound processes on the benchmark's cores (a shared machine)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return [subprocess.Popen([sys.executable, "-c", _LOAD, str(threads)], env=env) for _ in range(n)]


# --- rates ----------------------------------------------------------------------------------------
def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 matmul rate of this process's cores (n^3 jitted `x @ x`, best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def rate_fields(flops: float, seconds: float, peak_gflops: float) -> dict:
    """Achieved GFLOP/s of `flops` in `seconds`, and that as a fraction of `peak_gflops` (MFU)."""
    rate = flops / seconds / 1e9
    return {"gflops_per_s": rate, "mfu": rate / peak_gflops}


def compile_timed(jitted, *args):
    """(compiled program, seconds to lower and compile it) of a `jax.jit` function for `args`."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def flop_fields(compiled, seconds: float, peak: float | None = None) -> dict:
    """FLOPs per call of `compiled` (loop-corrected XLA cost analysis), the float32 matmul peak
    measured now in this process (unless given), and the rate / MFU of one call taking `seconds`."""
    f = compiled_flops(compiled)
    peak = matmul_peak_gflops() if peak is None else peak
    return {"xla_flops": f["flops"], "xla_flops_raw": f["xla"], "peak_gflops": peak,
            **rate_fields(f["flops"], seconds, peak)}


def flop_lines(r: dict, indent: int = 12) -> str:
    """The printed lines (after a result line) for a result with `compile` and `flop_fields`."""
    f = r["xla_flops"]
    amount = f"{f / 1e12:.3f} TFLOP" if f >= 1e11 else f"{f / 1e9:.3g} GFLOP"
    return (f"\n{'':{indent}s}compile {r['compile']:.1f} s\n{'':{indent}s}{amount} per call (XLA cost analysis, "
            f"loops expanded) -> {r['gflops_per_s']:.1f} GFLOP/s; matmul peak {r['peak_gflops']:.1f} GFLOP/s -> "
            f"MFU {r['mfu']:.1%}")


def side_by_side(runs: dict, per: str | None = None) -> dict | None:
    """ctgen against the reference for one workload: `runs` maps "ctgen" and "reference" to a run or
    a list of interleaved runs (dicts with `steady` seconds and `peak_gb`, or an `error`).

    The same definition in every script: speed ratio = the reference's median steady seconds over
    ctgen's (pooled over all timed calls of all runs; > 1: ctgen is faster); memory ratio = ctgen's
    peak RSS over the reference's (the largest of each side's runs; < 1: ctgen needs less). With
    `per`, each run's seconds are divided by its value of that key first (`slices_per_call`: the
    two sides process different amounts per call; `unit` then says "slice"). None unless both
    sides have a run."""
    sides = {}
    for impl in ("ctgen", "reference"):
        ok = [r for r in _as_list(runs.get(impl)) if "error" not in r and r.get("steady")]
        if not ok:
            return None
        seconds = [t / (r.get(per, 1) if per else 1) for r in ok for t in r["steady"]]
        sides[impl] = (statistics.median(seconds), max(r["peak_gb"] for r in ok))
    (tc, mc), (tr, mr) = sides["ctgen"], sides["reference"]
    return {"speed_ratio": tr / tc, "memory_ratio": mc / mr, "ctgen_median_s": tc, "reference_median_s": tr,
            "ctgen_peak_gb": mc, "reference_peak_gb": mr, "unit": per.removesuffix("s_per_call") if per else "call"}


def side_by_side_line(ratio: dict | None) -> str:
    """The printed form of `side_by_side` (empty without a comparison)."""
    if not ratio:
        return ""
    return (f"=> ctgen is {ratio['speed_ratio']:.2f}x the reference's speed (median {ratio['ctgen_median_s']:.3g} s vs "
            f"{ratio['reference_median_s']:.3g} s per {ratio['unit']}), at "
            f"{ratio['memory_ratio']:.2f}x its peak memory ({ratio['ctgen_peak_gb']:.2f} vs "
            f"{ratio['reference_peak_gb']:.2f} GB)")


def _as_list(x) -> list:
    return [] if x is None else x if isinstance(x, list) else [x]


def spread(values: list[float]) -> dict:
    """Median, min, max and n of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# --- FLOPs of a compiled program ------------------------------------------------------------------
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _balanced(s: str, start: int) -> int:
    """Index just past the parenthesis group opening at s[start]."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "(":
            depth += 1
        elif s[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced parentheses in HLO line: {s[:200]}")


def _dims(shape: str) -> list[int] | None:
    m = _SHAPE.match(shape)
    if not m:
        return None
    return [int(d) for d in m.group(1).split(",") if d]


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"(?:^|[ ,]){key}=(\{{[^}}]*\}}|[^,\s]+)", attrs)
    return m.group(1) if m else None


def _parse_hlo(text: str):
    """{computation: (own dot/conv FLOPs, [(callee, runs per call, runs per call with loops once)])}, entry."""
    comps, entry, cur = {}, None, None
    shapes: dict[str, list[int] | None] = {}
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            cur = h.group(2)
            comps[cur] = [0.0, []]
            shapes = {}
            if h.group(1):
                entry = cur
            continue
        if cur is None:
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        if rest.startswith("("):  # tuple type
            end = _balanced(rest, 0)
            typ, rest = rest[:end], rest[end:].lstrip()
        else:
            typ, _, rest = rest.partition(" ")
        shapes[name] = _dims(typ)
        op = re.match(r"([\w\-]+)\(", rest)
        if not op:
            continue
        opcode = op.group(1)
        close = _balanced(rest, op.end() - 1)
        operands = _NAME.findall(rest[op.end():close - 1])
        attrs = rest[close:]
        out = shapes[name]
        if opcode == "dot" and out is not None and operands:
            lhs = shapes.get(operands[0])
            contract = _attr(attrs, "lhs_contracting_dims")
            if lhs is not None and contract:
                k = _prod(lhs[int(d)] for d in contract.strip("{}").split(",") if d)
                comps[cur][0] += 2.0 * _prod(out) * k
        elif opcode == "convolution" and out is not None and len(operands) > 1:
            kernel = shapes.get(operands[1])
            labels = _attr(attrs, "dim_labels")
            if kernel is not None and labels and "_" in labels:
                klabels = labels.split("_")[1].split("->")[0]
                o = kernel[klabels.index("o")] if "o" in klabels else 1
                comps[cur][0] += 2.0 * _prod(out) * _prod(kernel) / max(o, 1)
        calls = comps[cur][1]
        if opcode == "while":
            trip = _TRIP.search(attrs)
            n = int(trip.group(1)) if trip else None
            body, cond = _attr(attrs, "body"), _attr(attrs, "condition")
            runs = n if n is not None else 1
            if body:
                calls.append((body.lstrip("%"), runs, 1, n is None))
            if cond:
                calls.append((cond.lstrip("%"), runs + 1, 1, False))
        else:
            for key in ("calls", "to_apply", "branch_computations", "true_computation", "false_computation",
                        "called_computations"):
                value = _attr(attrs, key)
                if value:
                    for callee in _NAME.findall(value) or [value]:
                        calls.append((callee.lstrip("%"), 1, 1, False))
    return comps, entry


def hlo_flops(text: str) -> dict:
    """Dot + convolution FLOPs of an optimized HLO module's text (one device's program after SPMD
    partitioning): `expanded` runs every while body its known trip count, `once` runs each loop
    body once (as XLA's cost analysis does); `unknown_loops` counts loops without a known trip
    count (taken as 1)."""
    comps, entry = _parse_hlo(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    memo: dict[tuple[str, bool], float] = {}
    unknown = set()

    def total(name: str, expand: bool, stack: tuple = ()) -> float:
        key = (name, expand)
        if key in memo:
            return memo[key]
        if name not in comps or name in stack:
            return 0.0
        own, calls = comps[name]
        t = own
        for callee, runs, runs_once, is_unknown in calls:
            if is_unknown:
                unknown.add(callee)
            t += (runs if expand else runs_once) * total(callee, expand, stack + (name,))
        memo[key] = t
        return t

    return {"expanded": total(entry, True), "once": total(entry, False), "unknown_loops": len(unknown)}


def compiled_flops(compiled) -> dict:
    """FLOPs per device of one call of a compiled program (`jax.jit(f).lower(...).compile()`):
    `xla` as XLA's cost analysis reports it, `flops` corrected for loop trip counts (module
    docstring), `dot_conv` the loop-expanded dot + convolution count alone."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per device program
        ca = ca[0]
    xla = float(ca.get("flops", 0.0))
    hlo = hlo_flops(compiled.as_text())
    return {"xla": xla, "flops": xla + hlo["expanded"] - hlo["once"], "dot_conv": hlo["expanded"],
            "unknown_loops": hlo["unknown_loops"]}


# --- machine, output ------------------------------------------------------------------------------
def machine_info() -> dict:
    """CPU model, cores, RAM, versions, date and load: what a result file records about where it ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = 0.0
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "ram_gb": round(ram, 1), "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        import jax
        import jaxlib

        info.update(jax=jax.__version__, jaxlib=jaxlib.__version__)
    except ImportError:
        pass
    return info


def tree_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs: each leaf's largest shard
    where it carries a sharding, else the whole leaf."""
    import math

    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(path: str, benchmark: str, args, results, **extra) -> None:
    """A benchmark script's --json file: its name, arguments, the machine, `extra` and `results`."""
    write_json(path, {"benchmark": benchmark, "args": vars(args), "machine": machine_info(), **extra,
                      "results": results})


def write_json(path: str, payload) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
