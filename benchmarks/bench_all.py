"""The benchmark suite: every per-stage benchmark at small sizes, each in a fresh process, collected
into one JSON file and one Markdown file with the machine and the command.

    ctgen bench all [--out bench_results/]          # small sizes (paper architectures where cheap)
    ctgen bench all --smoke --out /tmp/smoke        # tiny models, one timed repeat (the smoke test)
    ctgen bench all --only scale maskgit            # a subset; --skip NAME ... leaves some out

Benchmarks and what the suite runs (default / --smoke):
  scale       bench_scale.py --tiny on the fsdp4xtensor2 layout (remat as configured) / the same for
              MaskGIT only: ahead-of-time compiled per-device memory and FLOPs, projections labelled
  ctvit       paper CT-ViT: generator step at 3 slices with Adam, encode+decode at 17 slices, 3 timed
              steps / CTViTConfig.tiny generator step (with Adam) and encode+decode at 3 slices, 1 step
  maskgit     paper MaskGIT: train step at 3 slices (128 tokens, batch 2), forward at 17 slices, an
              18-step guided sample at 3 slices / MaskGITConfig.tiny train step and a 2-step sample
              at 3 slices, 1 step
  superres    paper U-Net: train, forward and 25-step ancestral sampling on 64x64 slices /
              UNetConfig.tiny forward and 2-step sampling on 32x32, 1 step
  t5          T5 v1.1 small, batch 8 x 48 tokens, 3 timed calls / tiny, batch 4 x 16, 1 call, no torch
  checkpoint  64 MiB / 4 MiB state on 8 emulated devices, 3 / 1 repeats
  data        phantom generation (2 / 1 samples, no 300x512x512 one) and the loader over 8 phantoms /
              phantom generation only
  generate    `ctgen generate` demo cascade, 4 MaskGIT and 4 SR steps, cold and warm / not run
Each script's own output is kept in OUT/logs/<name>.log and its JSON in OUT/<name>.json; the
suite's summary is OUT/results.json and OUT/results.md. Compile time is reported apart from
steady-state time; steady times are the median with min/max over the timed repeats; peak memory is
each measuring process's max RSS. Where a reference ran (GenerateCT, or transformers for t5), the
summary lists ctgen's speed ratio (reference median time / ctgen's) and memory ratio (ctgen peak
RSS / reference's) per workload, the definition of _common.side_by_side. --jobs 2 runs two
benchmarks at once (for smoke runs only: they then share the cores and their timings interfere).
The timed benchmarks compare against GenerateCT's PyTorch code only when CTGEN_GENERATECT_DIR names
a checkout; otherwise the output says they were skipped.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import machine_info, markdown_table, write_json  # noqa: E402  (shared benchmark plumbing)

from ctgen.errors import UserError  # noqa: E402

NAMES = ("scale", "ctvit", "maskgit", "superres", "t5", "checkpoint", "data", "generate")

# name -> (default arguments, --smoke arguments or None = not run in smoke mode)
PLAN: dict[str, tuple[list[str], list[str] | None]] = {
    "scale": (["--tiny", "--layouts", "fsdp4xtensor2", "--remat", "config"],
              ["--tiny", "--stages", "maskgit", "--layouts", "fsdp4xtensor2", "--remat", "config"]),
    "ctvit": (["--workload", "gen", "--slices", "3", "--workload", "infer", "--slices", "17", "--optimizer",
               "--steps", "3"],
              ["--model", "tiny", "--workload", "gen", "--slices", "3", "--workload", "infer", "--slices", "3",
               "--optimizer", "--steps", "1"]),
    "maskgit": (["--workload", "train", "--slices", "3", "--workload", "forward", "--slices", "17", "--workload",
                 "sample", "--slices", "3", "--steps", "3"],
                ["--model", "tiny", "--workload", "train", "--slices", "3", "--workload", "sample", "--slices", "3",
                 "--decode-steps", "2", "--steps", "1"]),
    "superres": (["--workload", "train", "fwd", "sample", "--size", "64", "--steps", "3"],
                 ["--model", "tiny", "--workload", "fwd", "sample", "--size", "32", "--batch", "2", "--sample-steps",
                  "2", "--steps", "1"]),
    "t5": (["--size", "small", "--batch", "8", "--length", "48", "--steps", "3"],
           ["--size", "tiny", "--batch", "4", "--length", "16", "--steps", "1", "--no-torch"]),
    "checkpoint": (["--mb", "64", "--repeats", "3"], ["--mb", "4", "--repeats", "1"]),
    "data": (["--skip", "phantom512,prepare", "--phantom-samples", "2", "--phantoms", "8", "--batches", "5",
              "--loader-workers", "0"],
             ["--skip", "phantom512,prepare,loader", "--phantom-samples", "1"]),
    "generate": (["--size", "demo", "--steps", "4", "--sr-steps", "4"], None),
}
DEVICES = {"checkpoint": 8}  # emulated CPU devices a benchmark needs (its docstring's XLA_FLAGS)


class SuiteError(UserError):
    """Bad suite arguments (one line, exit code 2)."""


def _env(name: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if name in DEVICES:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES[name]}".strip()
    return env


def run_one(name: str, args: list[str], out: str, timeout: float) -> dict:
    """Run benchmarks/bench_<name>.py with `args` + --json in a fresh process; its record."""
    json_path = os.path.join(out, f"{name}.json")
    extra = ["--json", json_path]
    if name == "scale":
        extra += ["--markdown", os.path.join(out, "scale.md")]
    scratch = None
    if name == "data":  # its phantoms and TFDS files are scratch, not results: kept out of OUT
        scratch = tempfile.mkdtemp(prefix="ctgen_bench_data_")
        extra += ["--work", scratch]
    cmd = [sys.executable, os.path.join(HERE, f"bench_{name}.py"), *args, *extra]
    if os.path.exists(json_path):
        os.remove(json_path)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(name), timeout=timeout or None)
        code, text = proc.returncode, proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr.strip() else "")
    except subprocess.TimeoutExpired as e:
        code = None
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\n--- killed after {timeout:.0f} s (--timeout) ---"
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with open(os.path.join(out, "logs", f"{name}.log"), "w", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n" + text)
    record = {"command": shlex.join(cmd[1:]), "args": args, "seconds": seconds, "exit_code": code,
              "log": os.path.join("logs", f"{name}.log")}
    if os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as f:
            record["result"] = json.load(f)
    errors = _errors(record.get("result"))
    if code != 0 or "result" not in record or errors:
        tail = " | ".join(text.strip().splitlines()[-4:])
        record["error"] = "; ".join(errors) if errors else f"exit {code}: {tail[-600:]}"
    return record


def _errors(result) -> list[str]:
    """Per-measurement failures a benchmark reported inside its JSON (runs with an `error`)."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "error" in x and isinstance(x["error"], str):
                found.append(x["error"].splitlines()[0][:300])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(result)
    return found


def reference_status() -> str:
    sys.path.insert(0, os.path.join(REPO, "tests", "reference"))
    import generatect_runtime as rt

    reason = rt.skip_reason()
    if reason:
        return f"skipped: no usable GenerateCT checkout ({reason}); ctvit, maskgit and superres measured ctgen only"
    return f"GenerateCT at {rt.checkout_dir()}"


def side_by_side_rows(benchmarks: dict) -> list[dict]:
    """Every workload a benchmark compared with its reference: its ratios (_common.side_by_side)."""
    rows = []
    for name, rec in benchmarks.items():
        for r in (rec.get("result") or {}).get("results") or []:
            if isinstance(r, dict) and r.get("side_by_side"):
                what = r["workload"] + (f", {r['slices']} slices" if "slices" in r else "")
                refs = r["runs"].get("reference") or []
                ref = next((x["impl"] for x in (refs if isinstance(refs, list) else [refs]) if "impl" in x), "reference")
                rows.append({"benchmark": name, "workload": what, "reference": ref, **r["side_by_side"]})
    return rows


# --- Markdown ---------------------------------------------------------------------------------------
def _s(x, fmt=".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _timed_rows(result: dict) -> list[list]:
    rows = []
    for rec in result.get("results", []):
        what = rec["workload"] + (f", {rec['slices']} slices" if "slices" in rec else "")
        for impl, runs in rec["runs"].items():
            for r in runs if isinstance(runs, list) else [runs]:
                if "error" in r:
                    rows.append([what, impl] + ["FAILED"] + ["–"] * 6)
                    continue
                s = r["steady"]
                rows.append([what, r["impl"], _s(r.get("compile"), ".1f"), _s(r.get("first_call", r["first"])),
                             f"{min(s) if s else math.nan:.3f} / {_median(s):.3f} / {max(s) if s else math.nan:.3f} "
                             f"(n={len(s)})", _s(r["peak_gb"]), _s(r.get("gflops_per_s"), ".1f"),
                             _s(r.get("peak_gflops"), ".1f"), _s(r.get("mfu"), ".1%")])
    return rows


def _median(xs):
    import statistics

    return statistics.median(xs) if xs else math.nan


def _side_by_side_markdown(rows: list[dict]) -> list[str]:
    lines = ["## ctgen beside the reference", ""]
    if not rows:
        return lines + ["No side-by-side ratios (no reference ran).", ""]
    lines.append("Speed ratio = the reference's median steady time / ctgen's (> 1: ctgen is faster); memory "
                 "ratio = ctgen's peak RSS / the reference's (< 1: ctgen needs less). Medians over all timed calls "
                 "of the interleaved runs, peaks the largest run's; per slice where the two sides process "
                 "different numbers of slices per call.")
    lines.append("")
    lines.append(markdown_table(
        ["benchmark", "workload", "reference", "per", "ctgen median s", "reference median s", "speed ratio",
         "peak RSS GB ctgen / reference", "memory ratio"],
        [[r["benchmark"], r["workload"], r["reference"], r["unit"], _s(r["ctgen_median_s"], ".4g"),
          _s(r["reference_median_s"], ".4g"), _s(r["speed_ratio"]) + "x",
          f"{r['ctgen_peak_gb']:.2f} / {r['reference_peak_gb']:.2f}", _s(r["memory_ratio"]) + "x"] for r in rows]))
    return lines + [""]


def summary_markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [f"# ctgen benchmark suite ({payload['mode']})", "",
             f"Command: `{payload['command']}`", "",
             markdown_table(["machine", ""], [[k, v] for k, v in m.items()]), "",
             f"Reference comparisons: {payload['reference']}.", "",
             f"Load average over the run: {payload['load_avg_start']:.2f} at the start, {payload['load_avg_end']:.2f} "
             f"at the end (a loaded machine slows every timing; compile and steady times are wall-clock).", ""]
    lines += _side_by_side_markdown(payload.get("side_by_side", []))
    for name, rec in payload["benchmarks"].items():
        lines.append(f"## {name} ({rec['seconds']:.0f} s)")
        lines.append("")
        lines.append(f"`{rec['command']}`")
        lines.append("")
        if "error" in rec:
            lines.append(f"**FAILED**: {rec['error']}")
            lines.append("")
        res = rec.get("result")
        if not res:
            continue
        if name == "scale":
            path = os.path.join(payload["out"], "scale.md")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    lines.append(f.read().strip())
        elif name in ("ctvit", "maskgit", "superres", "t5"):
            lines.append(f"Reference: {res.get('reference', '–')}.")
            lines.append("")
            lines.append(markdown_table(
                ["workload", "impl", "compile s", "first call s", "steady s min / median / max",
                 "peak RSS GB", "GFLOP/s (XLA count)", "matmul peak GFLOP/s", "MFU"], _timed_rows(res)))
            if name == "t5":
                lines.append("")
                lines.append(markdown_table(
                    ["impl", "prompts/s (median)", "GFLOP/s counted from the shapes", "of the process's matmul rate"],
                    [[r["impl"], _s(r["prompts_per_s"], ".1f"), _s(r["analytic_gflops_per_s"], ".1f"),
                      _s(r["analytic_of_matmul"], ".0%")]
                     for w in res["results"] for runs in w["runs"].values() for r in runs if "error" not in r]))
        elif name == "checkpoint":
            r = res["results"]
            rows = [[k, f"{v['blocked_s']['median']:.3f} ({v['blocked_s']['min']:.3f}–{v['blocked_s']['max']:.3f})",
                     f"{v['complete_s']['median']:.3f} ({v['complete_s']['min']:.3f}–{v['complete_s']['max']:.3f})"]
                    for k, v in r.items() if k.endswith("_save")]
            lines.append(markdown_table(["save", "training blocked s median (min–max)", "complete s"], rows))
            if "restore_other_mesh_s" in r:
                lines.append("")
                lines.append(f"Restore onto another mesh: {r['restore_other_mesh_s']:.3f} s ({res['devices']} devices).")
        elif name == "data":
            r = res["results"]
            rows = []
            if "phantom" in r:
                p = r["phantom"]["phantom_201x128x128_s"]
                rows.append(["phantom 201x128x128", f"{p['mean']:.2f} s mean ({p['min']:.2f}–{p['max']:.2f}, n={p['n']})"])
                if "phantom_300x512x512_s" in r["phantom"]:
                    rows.append(["phantom 300x512x512", f"{r['phantom']['phantom_300x512x512_s']:.1f} s"])
            for x in r.get("prepare", []):
                rows.append([f"prepare, {x['workers']} workers", f"{x['volumes_per_s']:.2f} volumes/s"])
            for x in r.get("loader", []):
                rows.append([f"loader 4x201x128x128, {x['grain_workers']} grain workers",
                             f"{x['volumes_per_s']:.1f} volumes/s"])
            lines.append(markdown_table(["measurement", "result"], rows))
        elif name == "generate":
            rows = []
            for run, r in res["results"].items():
                stages = ", ".join(f"{k} {v:.1f} s (compile {r['compile_seconds'].get(k, 0):.1f})"
                                   for k, v in r["seconds"].items())
                rows.append([run, "x".join(map(str, r["shape"])), stages, f"{r['wall_seconds']:.1f}",
                             f"{r['peak_rss_gb']:.2f}"])
            lines.append(markdown_table(["run", "output", "stages", "wall s", "peak RSS GB"], rows))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_results", help="folder for results.json, results.md, logs")
    ap.add_argument("--smoke", "--tiny", dest="smoke", action="store_true",
                    help="tiny models and one timed repeat (the smoke test)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these of {', '.join(NAMES)}")
    ap.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave these out")
    ap.add_argument("--timeout", type=float, default=0, help="seconds after which a benchmark is stopped (0: none)")
    ap.add_argument("--jobs", type=int, default=1, help="benchmarks run at once (timings interfere when > 1)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise SuiteError(f"--jobs {args.jobs}: give at least 1")
    for n in (args.only or []) + args.skip:
        if n not in NAMES:
            raise SuiteError(f"unknown benchmark {n!r}; the suite has {', '.join(NAMES)}")
    names = [n for n in (args.only or NAMES) if n not in args.skip]
    not_smoke = [n for n in names if args.smoke and PLAN[n][1] is None]
    if args.only and not_smoke:
        raise SuiteError(f"{', '.join(not_smoke)} has no --smoke size (too slow for it); leave it out of --only")
    names = [n for n in names if n not in not_smoke]
    if not names:
        raise SuiteError("nothing to run (every benchmark was skipped)")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    command = "ctgen bench all " + shlex.join(sys.argv[1:] if argv is None else argv)
    reference = reference_status()
    mode = "smoke (tiny sizes, 1 repeat)" if args.smoke else "small sizes"
    print(f"benchmark suite, {mode}: {', '.join(names)} -> {out}\nreference comparisons: {reference}", flush=True)
    payload = {"suite": "ctgen benchmarks", "mode": mode, "command": command, "argv": sys.argv, "out": out,
               "machine": machine_info(), "reference": reference, "load_avg_start": os.getloadavg()[0],
               "not_run": {n: "no --smoke size" for n in not_smoke}, "benchmarks": {}}
    payload["jobs"] = args.jobs
    done, lock = {}, threading.Lock()

    def one(name):
        bench_args = PLAN[name][1] if args.smoke else PLAN[name][0]
        print(f"[{name}] bench_{name}.py {shlex.join(bench_args)}", flush=True)
        rec = run_one(name, bench_args, out, args.timeout)
        print(f"[{name}] {'FAILED: ' + rec['error'] if 'error' in rec else 'ok'} ({rec['seconds']:.0f} s)", flush=True)
        with lock:  # one writer of results.json at a time
            done[name] = rec
            payload["benchmarks"] = {n: done[n] for n in names if n in done}  # suite order
            payload["load_avg_end"] = os.getloadavg()[0]
            write_json(os.path.join(out, "results.json"), payload)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, names))
    payload["side_by_side"] = side_by_side_rows(payload["benchmarks"])
    write_json(os.path.join(out, "results.json"), payload)
    text = summary_markdown(payload)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"\n{text}")
    return 1 if any("error" in r for r in payload["benchmarks"].values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"bench_all: error: {e}", file=sys.stderr)
        sys.exit(2)
