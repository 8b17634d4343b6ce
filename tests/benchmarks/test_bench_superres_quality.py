"""`bench_superres.py --quality` on a tiny random U-Net: it samples with both samplers and reports the
fast sampler against the 25-step one and all three (and bicubic) against the original slices. With
the "fast" sampler set to the 25-step ancestral one, the two outputs must be identical; with DDIM
they differ. (The figures mean something only for trained weights; this checks the plumbing.)"""
import os
import re
import sys

import pytest
from flax import nnx

from ctgen.convert.superres_store import save_superres_dir
from ctgen.models.unet import UNet, UNetConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_superres  # noqa: E402

NUM = r"(inf|[-\d.]+)"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    cfg = UNetConfig.tiny()
    path = str(tmp_path_factory.mktemp("sr_quality") / "unet")
    save_superres_dir(path, cfg, nnx.state(UNet(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    return path


def _run(weights, capsys, *extra):
    assert bench_superres.main(["--quality", "--weights", weights, "--size", "32", "--batch", "2", *extra]) == 0
    out = capsys.readouterr().out
    fast = re.search(rf"fast vs 25-step: PSNR {NUM} dB, SSIM {NUM}", out)
    assert fast, out
    vs = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
          for m in re.finditer(rf"^\s*(.+?) vs the original slices: PSNR {NUM} dB, SSIM {NUM}", out, re.M)}
    return (float(fast.group(1)), float(fast.group(2))), vs, out


def test_quality_same_sampler_is_identical(weights, capsys):
    (p, s), vs, out = _run(weights, capsys, "--sampler", "ancestral", "--sample-steps", "25")
    assert p >= 100 and s == pytest.approx(1.0, abs=1e-4), out  # psnr() caps identical images at 120 dB
    assert set(vs) == {"ancestral 25", "ancestral 25 (again)", "bicubic"}, out
    assert vs["ancestral 25"] == vs["ancestral 25 (again)"], out
    assert 0 < vs["bicubic"][0] < 60 and 0 < vs["bicubic"][1] <= 1, out


def test_quality_ddim_differs_from_ancestral(weights, capsys):
    (p, s), vs, out = _run(weights, capsys, "--sampler", "ddim", "--sample-steps", "3")
    assert p < 100 and s < 1.0, out
    assert set(vs) == {"ancestral 25", "ddim 3", "bicubic"}, out
    assert vs["ancestral 25"] != vs["ddim 3"], out
