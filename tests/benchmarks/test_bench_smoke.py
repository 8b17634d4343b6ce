"""Smoke test of the benchmark suite: `ctgen bench all --smoke` (tiny sizes, one repeat, including
`bench_scale --tiny`) writes one JSON and one Markdown file whose numbers are finite and positive;
the loop-corrected FLOP count, the ctgen/reference ratios and the scale benchmark's helpers; bad
arguments fail in one line; `ctgen bench NAME` runs a script; with a GenerateCT checkout, a
side-by-side run reports its ratios."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)

import _common  # noqa: E402
import bench_all  # noqa: E402
import bench_scale  # noqa: E402


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))


def _numbers(x, path=""):
    """Every int/float leaf of a JSON tree with its path (booleans excluded)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def _positive(tree, keys):
    for path, v in _numbers(tree):
        assert math.isfinite(v), path
        if re.sub(r"\[\d+\]$", "", path.rsplit(".", 1)[-1]) in keys:
            assert v > 0, (path, v)


def test_flops_count_every_iteration_of_a_scanned_matmul():
    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=6)[0]

    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((128, 128), jnp.float32)
    flops = _common.compiled_flops(jax.jit(f).lower(x, w).compile())
    one = 2 * 64 * 128 * 128
    assert flops["dot_conv"] == 6 * one
    assert flops["xla"] < 2 * one  # XLA's own count sees the loop body once
    assert 6 * one <= flops["flops"] < 6.5 * one  # corrected: all six, plus the (counted once) tanh


def test_scale_batches_and_layouts():
    assert bench_scale.parse_layout("data2xfsdp4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert bench_scale.layout_batch(4, 1, 8) == (8, 1)  # CT-ViT's batch 4 on 8 batch shards: one each
    assert bench_scale.layout_batch(192, 12, 8) == (192, 12)  # SR: micro-batch 16 splits 8 ways
    assert bench_scale.layout_batch(192, 12, 64) == (192, 3)  # 64 ways: micro-batch 64, 192 per update kept
    with pytest.raises(bench_scale.ScaleError, match="uses 16 devices"):
        bench_scale.parse_layout("fsdp4xdata4", 8)
    with pytest.raises(bench_scale.ScaleError, match="axis 'fsdp' given twice"):
        bench_scale.parse_layout("fsdp2xfsdp4", 8)


@pytest.mark.parametrize("argv, message", [
    (["bench_scale.py", "--layouts", "data3"], "bench_scale: error: layout 'data3' uses 3 devices, not 8"),
    (["bench_all.py", "--only", "nope"], "bench_all: error: unknown benchmark 'nope'"),
    (["bench_all.py", "--smoke", "--only", "generate"], "bench_all: error: generate has no --smoke size"),
    (["bench_generate.py", "--sr-slices", "4"], "bench_generate: error: --sr-slices must be an odd slice count"),
])
def test_bad_arguments_fail_in_one_line(argv, message):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, argv[0]), *argv[1:]], capture_output=True, text=True,
                          env=_env())
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_suite_smoke(tmp_path):
    out = tmp_path / "results"
    env = _env()
    env.pop("CTGEN_GENERATECT_DIR", None)
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_all.py"), "--smoke", "--jobs", "2",
                           "--out", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    names = ["scale", "ctvit", "maskgit", "superres", "t5", "checkpoint", "data"]
    assert list(payload["benchmarks"]) == names
    # results and logs only: the data benchmark's phantoms and TFDS files live in a removed scratch folder
    assert sorted(p.name for p in out.iterdir()) == sorted(["logs", "results.json", "results.md", "scale.md"]
                                                           + [f"{n}.json" for n in names])
    assert payload["not_run"] == {"generate": "no --smoke size"}
    assert payload["reference"].startswith("skipped")
    m = payload["machine"]
    assert m["cores"] >= 1 and m["ram_gb"] > 0 and m["jax"] == jax.__version__ and m["cpu"]
    for name, rec in payload["benchmarks"].items():
        assert "error" not in rec and rec["exit_code"] == 0, (name, rec.get("error"))
        assert rec["seconds"] > 0 and (out / rec["log"]).is_file()
        assert rec["result"]["machine"]["cores"] == m["cores"]
        _positive(rec["result"], {"steady", "median", "peak_gb", "compile", "xla_flops", "peak_gflops", "gflops_per_s",
                                  "mfu", "flops_per_device", "total", "arguments", "params", "opt_state",
                                  "seconds_per_batch", "prompts_per_s", "mean", "restore_other_mesh_s"})

    rows = payload["benchmarks"]["scale"]["result"]["rows"]
    assert [(r["stage"], r["devices"], r["layout"]) for r in rows] == [("maskgit", 8, "fsdp4xtensor2")]
    r = rows[0]
    b = r["per_device_bytes"]
    # the state/batch split is computed from the shardings, the arguments come from XLA: they must agree
    assert abs(b["params"] + b["opt_state"] + b["other_state"] + b["batch"] - b["arguments"]) <= 64
    assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs_not_aliased"]
    assert r["flops_per_device"] >= r["xla_cost_analysis_flops"] > 0
    assert r["spmd_full_remat_warnings"] >= 0  # the child's stderr log was read
    p = r["projection"]
    assert p["step_seconds"] > 0 and p["run_cost"] > 0 and p["run_steps"] == 40  # maskgit tiny: 40 steps
    assert r["over_hbm"] is False

    workloads = {"ctvit": ["gen", "infer"], "maskgit": ["train", "sample"], "superres": ["fwd", "sample"],
                 "t5": ["encode 4x16"]}
    for name, expected in workloads.items():
        res = payload["benchmarks"][name]["result"]
        assert res["reference"].startswith("skipped")
        assert [rec["workload"] for rec in res["results"]] == expected, name
        for rec in res["results"]:
            assert rec["side_by_side"] is None  # no reference ran
            (run,) = [r for runs in rec["runs"].values() for r in (runs if isinstance(runs, list) else [runs])]
            assert run["impl"] == "ctgen" and len(run["steady"]) == 1
            assert 0 < run["mfu"] < 1 and run["compile"] > 0, (name, rec["workload"])
    assert payload["side_by_side"] == []

    md = (out / "results.md").read_text()
    assert md.startswith("# ctgen benchmark suite (smoke")
    assert "Reference comparisons: skipped" in md
    assert "## ctgen beside the reference\n\nNo side-by-side ratios (no reference ran)." in md
    for name in names:
        assert f"## {name} (" in md
    assert "| maskgit | main | 8 | fsdp4xtensor2 |" in md and "(projection)" in md


def test_side_by_side_ratios():
    """One definition for every script: reference median time / ctgen's (pooled over runs), ctgen's
    largest peak / the reference's; per slice when asked; nothing unless both sides ran."""
    runs = {"ctgen": [{"steady": [1.0, 3.0], "peak_gb": 2.0}, {"steady": [2.0], "peak_gb": 3.0}],
            "reference": [{"steady": [8.0], "peak_gb": 6.0, "slices_per_call": 1}, {"error": "exit 1"}]}
    r = _common.side_by_side(runs)
    assert r["speed_ratio"] == 4.0 and r["memory_ratio"] == 0.5 and r["unit"] == "call"
    assert (r["ctgen_median_s"], r["reference_median_s"], r["ctgen_peak_gb"], r["reference_peak_gb"]) == (2, 8, 3, 6)
    for run in runs["ctgen"]:
        run["slices_per_call"] = 4  # ctgen does 4 slices per call, the reference 1
    r = _common.side_by_side(runs, per="slices_per_call")
    assert r["speed_ratio"] == 16.0 and r["unit"] == "slice"
    line = _common.side_by_side_line(r)
    assert "16.00x the reference's speed" in line and "per slice" in line
    assert _common.side_by_side({"ctgen": runs["ctgen"], "reference": [{"error": "exit 1"}]}) is None
    assert _common.side_by_side({"ctgen": runs["ctgen"]}) is None
    assert _common.side_by_side({"ctgen": {"steady": [2.0], "peak_gb": 1.0},  # one run, not a list
                                 "reference": {"steady": [3.0], "peak_gb": 2.0}})["speed_ratio"] == 1.5


def test_suite_collects_and_prints_ratios(tmp_path):
    ratio = _common.side_by_side({"ctgen": [{"steady": [1.0], "peak_gb": 1.0}],
                                  "reference": [{"impl": "GenerateCT", "steady": [4.0], "peak_gb": 2.0}]})
    result = {"reference": "GenerateCT at /x", "results": [
        {"workload": "sample", "slices": 3, "side_by_side": ratio,
         "runs": {"ctgen": [{"impl": "ctgen", "first": 5.0, "steady": [1.0], "peak_gb": 1.0}],
                  "reference": [{"impl": "GenerateCT", "first": 4.0, "steady": [4.0], "peak_gb": 2.0}]}},
        {"workload": "train", "slices": 3, "side_by_side": None,
         "runs": {"ctgen": [{"impl": "ctgen", "first": 5.0, "steady": [1.0], "peak_gb": 1.0}]}}]}
    benchmarks = {"maskgit": {"command": "bench_maskgit.py", "seconds": 9.0, "result": result}}
    rows = bench_all.side_by_side_rows(benchmarks)
    assert rows == [{"benchmark": "maskgit", "workload": "sample, 3 slices", "reference": "GenerateCT", **ratio}]
    payload = {"mode": "small sizes", "command": "ctgen bench all", "machine": {"cpu": "x"}, "reference": "GenerateCT",
               "load_avg_start": 1.0, "load_avg_end": 1.0, "out": str(tmp_path), "benchmarks": benchmarks,
               "side_by_side": rows}
    md = bench_all.summary_markdown(payload)
    assert "| maskgit | sample, 3 slices | GenerateCT | call | 1 | 4 | 4.00x | 1.00 / 2.00 | 0.50x |" in md


def test_ctgen_bench_runs_a_script(tmp_path):
    """`ctgen bench NAME ARGS` runs benchmarks/bench_NAME.py with ARGS (the tiny T5, ctgen only)."""
    out = tmp_path / "t5.json"
    proc = subprocess.run([sys.executable, "-m", "ctgen", "bench", "t5", "--size", "tiny", "--batch", "2", "--length",
                           "16", "--steps", "2", "--no-torch", "--json", str(out)], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "T5 v1.1 tiny encoder, batch 2 x 16 tokens" in proc.stdout
    res = json.loads(out.read_text())
    assert res["benchmark"] == "t5" and res["args"]["batch"] == 2 and res["reference"] == "skipped (--no-torch)"
    (rec,) = res["results"]
    (run,) = rec["runs"]["ctgen"]
    assert len(run["steady"]) == 2 and run["compile"] > 0 and run["prompts_per_s"] > 0


def _reference_skip():
    sys.path.insert(0, os.path.join(REPO, "tests", "reference"))
    import generatect_runtime

    return generatect_runtime.skip_reason()


@pytest.mark.skipif(_reference_skip() is not None, reason=str(_reference_skip()))
def test_maskgit_sample_side_by_side_with_generatect(tmp_path):
    """With a GenerateCT checkout: its own sampling loop at 3 slices beside ctgen's, and the ratios."""
    out = tmp_path / "maskgit.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_maskgit.py"), "--workload", "sample", "--slices",
                           "3", "--decode-steps", "2", "--steps", "1", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "=> ctgen is " in proc.stdout
    res = json.loads(out.read_text())
    (rec,) = res["results"]
    (ref,) = rec["runs"]["reference"]
    assert ref["impl"] == "GenerateCT" and "MaskGITTransformer.sample (2 steps" in ref["note"]
    ratio = rec["side_by_side"]
    assert ratio["speed_ratio"] > 0 and ratio["memory_ratio"] > 0 and ratio["unit"] == "call"
    assert ratio["reference_median_s"] == ref["steady"][0]
    (row,) = bench_all.side_by_side_rows({"maskgit": {"result": res}})
    assert row["reference"] == "GenerateCT" and row["workload"] == "sample, 3 slices"
