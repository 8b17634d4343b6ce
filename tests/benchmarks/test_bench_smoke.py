"""Smoke test of the benchmark suite: `ctgen bench all --smoke` (tiny sizes, one repeat, including
`bench_scale --tiny`) writes one JSON and one Markdown file whose numbers are finite and positive;
the loop-corrected FLOP count and the scale benchmark's helpers; bad arguments fail in one line."""
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

    for name in ("ctvit", "maskgit", "superres"):
        res = payload["benchmarks"][name]["result"]
        assert res["reference"].startswith("skipped")
        (run,) = [r for rec in res["results"] for runs in rec["runs"].values()
                  for r in (runs if isinstance(runs, list) else [runs])]
        assert run["impl"] == "ctgen" and len(run["steady"]) == 1
        assert 0 < run["mfu"] < 1 and run["compile"] > 0

    md = (out / "results.md").read_text()
    assert md.startswith("# ctgen benchmark suite (smoke")
    assert "Reference comparisons: skipped" in md
    for name in names:
        assert f"## {name} (" in md
    assert "| maskgit | main | 8 | fsdp4xtensor2 |" in md and "(projection)" in md
