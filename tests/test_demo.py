"""`ctgen demo`, the README's second example (stage 1 training), end to end at a very small size, on 8 emulated devices."""
import json

import pytest
from safetensors.numpy import load_file

from ctgen.cli import main
from ctgen.train.metrics import read_jsonl


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    work = tmp_path / "demo"
    args = ["demo", "--workdir", str(work), "--phantoms", "6", "--steps", "4", "--resolution", "32",
            "--slices", "5", "--num-workers", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[4/4]" in out and "PSNR" in out
    summary = json.loads((work / "demo_summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["metrics"]["validation_phantoms"]["psnr"] > 0
    assert len(summary["metrics"]["real_ct"]) == 2  # both real volumes from tests/data/real_ct
    for name in ("example_ct_ctvit.png", "example_ct_ctvit_recon.nii.gz"):
        assert (work / "real_ct" / name).exists()
    assert list((work / "ctvit" / "previews").glob("step_*/ctvit_recon.png"))
    exported = load_file(str(work / "ctvit_generatect.safetensors"))
    assert "vq._codebook.embed" in exported and "to_pixels.0.weight" in exported
    assert len(exported) == summary["keys"]
    # Running it again resumes: nothing is retrained (no new train metrics, checkpoints untouched).
    before = _training_record(work / "ctvit")
    assert before[0] > 0
    assert main(args) == 0
    assert json.loads((work / "demo_summary.json").read_text())["steps"] == 4
    assert _training_record(work / "ctvit") == before


def _training_record(run_dir):
    """(train rows in metrics.jsonl, {checkpoint directory: mtime})."""
    rows = read_jsonl(str(run_dir / "metrics.jsonl"))
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    return sum(r["split"] == "train" for r in rows), checkpoints
