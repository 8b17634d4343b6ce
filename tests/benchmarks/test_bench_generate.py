"""bench_generate's new paths at tiny sizes: the ahead-of-time plan (memory per program and the
largest SR batch within a budget), the spread of repeated runs and the side-by-side ratios, and
GenerateCT's cascade beside a ctgen run (skipped without a GenerateCT checkout and its
dependencies). No timing assertions."""
import argparse
import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(REPO, "tests", "reference"))

import bench_generate  # noqa: E402


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    # one device: `ctgen generate` would otherwise decode one prompt per emulated device
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    return env


def _bench(*argv, timeout=600):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_generate.py"), *argv], capture_output=True,
                          text=True, env=_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_plan_tiny(tmp_path):
    out = tmp_path / "plan.json"
    text = _bench("--size", "tiny", "--plan", "--json", str(out))
    plan = json.loads(out.read_text())["plan"]
    programs = [r["program"] for r in plan["rows"]]
    assert programs[:4] == ["T5 encoder", "MaskGIT decode, 2 guided steps", "CT-ViT decode",
                            "MaskGIT + CT-ViT decode in one program (as ctgen generate)"]
    assert all(p.startswith("SR sampling loop") for p in programs[4:]) and len(programs) >= 6
    for r in plan["rows"]:
        b = r["bytes"]
        assert b["parameters"] > 0 and b["inputs"] > 0 and b["temporaries"] >= 0 and b["outputs"] > 0, r
        assert b["parameters"] + b["inputs"] == b["arguments"]
        assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs"] - b["aliased"]
    # the decode reads the CT-ViT's decoder only: fewer bytes than its whole (resident) state
    decode = plan["rows"][2]["bytes"]["parameters"]
    assert 0 < decode < plan["params"]["ctvit"]
    # the largest SR batch: compiled and within the budget with every stage's weights resident
    fit = plan["sr_batch_fit"]
    assert fit >= 1
    row = next(r for r in plan["rows"] if r["shape"].startswith(f"{fit} x"))
    budget = plan["hbm_gib"] * 2**30 - sum(plan["params"].values())
    assert row["bytes"]["total"] - row["bytes"]["parameters"] <= budget
    assert plan["sr_per_slice_bytes"] > 0 and plan["cascade_peak_bytes"] <= plan["hbm_gib"] * 2**30
    assert plan["devices"] == 1
    assert "largest batch within 16 GiB" in text and "fits 16 GiB" in text


def _record(seconds, wall, rss):
    return {"seconds": seconds, "compile_seconds": {k: 1.0 for k in seconds}, "wall_seconds": wall,
            "peak_rss_gb": rss, "shape": [128, 128, 17], "load_avg_1m": [2.0, 2.1], "peak_memory": {}}


def test_repeats_spread_and_ratios(tmp_path, capsys):
    args = argparse.Namespace(size="demo", slices=17, steps=18, sr_steps=25, threads=2, sr_slices=0,
                              reference_on=True, json=str(tmp_path / "r.json"), repeats=3, extra=[])
    results = {"cold": _record({"text": 1.0, "maskgit": 9.0, "superres": 30.0}, 90.0, 1.1)}
    for i, (m, s) in enumerate([(2.0, 10.0), (4.0, 12.0), (3.0, 20.0)]):
        results[f"warm {i + 1}"] = _record({"text": 0.5, "maskgit": m, "superres": s, "write": 0.1}, 20.0 + i, 1.0)
    reference = [{"seconds": {"text": 1.0, "maskgit": 5.0 + i, "ctvit_decode": 1.0, "superres": 24.0},
                  "superres_text_seconds": 0.5, "build_seconds": 3.0, "peak_rss_gb": 2.0, "wall_seconds": 40.0,
                  "unet_notes": [], "shape": [17, 128, 128], "load_avg_1m": [2.0, 2.0]} for i in range(3)]
    decode = {"steady": [0.5, 0.5, 0.5], "compile_seconds": 2.0, "first_call": 0.6, "grid": [9, 8, 8]}
    bench_generate.report(args, results, reference, decode, None)
    printed = capsys.readouterr().out
    assert "warm median (min–max), n=3" in printed and "Side by side" in printed
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["results"]) == {"cold", "warm 1", "warm 2", "warm 3"}
    sp = saved["spread"]["warm"]["seconds"]["maskgit"]
    assert (sp["min"], sp["median"], sp["max"], sp["n"]) == (2.0, 3.0, 4.0, 3)
    side = saved["reference"]["side_by_side"]["stages"]
    assert side["maskgit+decode"]["generatect"]["median"] == 7.0  # 6 + 1
    assert side["maskgit+decode"]["speed_ratio"] == pytest.approx(7.0 / 3.0)  # _common.side_by_side's ratio
    assert side["maskgit"]["ctgen"]["median"] == pytest.approx(2.5)  # 3 - the decode measured alone
    assert side["superres"]["speed_ratio"] == pytest.approx(24.0 / 12.0)
    assert side["stages"]["memory_ratio"] == pytest.approx(0.5)
    assert "commit" in saved["source"]


def test_bad_repeats_fail_in_one_line():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_generate.py"), "--repeats", "0"],
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 2
    assert proc.stderr.strip() == "bench_generate: error: --repeats must be >= 1, got 0"


def _reference_skip():
    import generatect_cascade

    return generatect_cascade.skip_reason()


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.skipif(_reference_skip() is not None, reason=str(_reference_skip()))
def test_side_by_side_tiny(tmp_path):
    out = tmp_path / "side.json"
    text = _bench("--size", "tiny", "--slices", "3", "--steps", "1", "--sr-steps", "1", "--runs", "warm",
                  "--json", str(out))
    saved = json.loads(out.read_text())
    assert saved["reference"]["status"] == "ran"
    [run] = saved["reference"]["runs"]
    assert "error" not in run, run
    assert run["shape"] == [3, 128, 128] and run["peak_rss_gb"] > 0
    assert set(run["seconds"]) == {"text", "maskgit", "ctvit_decode", "superres"}
    assert all(v >= 0 for v in run["seconds"].values()) and run["seconds"]["superres"] > 0
    assert saved["results"]["warm"]["shape"] == [128, 128, 3]
    decode = saved["reference"]["ctgen_ctvit_decode_alone"]
    assert decode["grid"] == [2, 4, 4] and len(decode["steady"]) == 1
    for stage in saved["reference"]["side_by_side"]["stages"].values():
        assert stage["generatect"]["median"] >= 0 and math.isfinite(stage["ctgen"]["median"])
    assert "Side by side" in text and "GenerateCT / ctgen" in text
