"""`bench_attention_dots.py` at toy sizes: every dot is timed and reported as a positive rate."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_attention_dots  # noqa: E402


def test_prints_and_writes_every_rate(tmp_path, capsys):
    out = tmp_path / "dots.json"
    assert bench_attention_dots.main(["--batch", "2", "--block", "64", "--head", "8", "--square", "64",
                                      "--repeats", "1", "--json", str(out)]) == 0
    rates = json.loads(out.read_text())["gflops_per_s"]
    assert len(rates) == 7 and all(r > 0 for r in rates.values()), rates
    text = capsys.readouterr().out
    assert all(name in text for name in rates)


def test_rejects_non_positive_sizes(capsys):
    with pytest.raises(SystemExit):
        bench_attention_dots.main(["--block", "0"])
    assert "must be positive" in capsys.readouterr().err
