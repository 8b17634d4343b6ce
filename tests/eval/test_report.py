"""evaluate_generated / `python -m ctgen.eval.generated_command` end to end on phantom NIfTI directories."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ctgen.errors import UserError
from ctgen.eval import generated_command
from ctgen.eval.report import evaluate_generated, load_prompts
from ctgen.io.nifti import write_nifti


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, studies, make_study):
    """generated/: four designed studies (with prompts); reference/: two others."""
    root = tmp_path_factory.mktemp("eval")
    prompts = {}
    for sub, chosen in (("generated", studies[:4]), ("reference", studies[4:])):
        os.makedirs(root / sub)
        for seed, findings in chosen:
            ph = make_study(seed, findings, (17, 64, 64), (301.5 / 17, 350 / 64, 350 / 64))
            write_nifti(str(root / sub / f"study{seed}.nii.gz"), ph.hu, ph.spacing)
            prompts[f"study{seed}.nii.gz"] = ph.prompt()
    with open(root / "prompts.csv", "w") as f:
        f.write("VolumeName,report\n" + "".join(f'{k},"{v}"\n' for k, v in prompts.items()))
    return root


def test_command_writes_report(dirs, capsys):
    out = dirs / "out"
    code = generated_command.main(["--generated", str(dirs / "generated"), "--reference", str(dirs / "reference"),
                                   "--prompts", str(dirs / "prompts.csv"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "2.5D FID: not computed" in printed and "prompt adherence" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["generated"]["count"] == 4 and report["reference"]["count"] == 2
    m = report["metrics"]
    assert m["feature_network"]["computed"] is False and "fid_2p5d" not in m["feature_network"]
    assert m["hu_histogram"]["hu_wasserstein"] > 0 and "no network" in m["hu_histogram"]["note"]
    assert m["phantom_attributes"]["generated_used"] == 4
    by_name = {v["name"]: v["measured"] for v in report["generated"]["volumes"]}
    assert by_name["study2"]["effusion_side"] == "right" and by_name["study3"]["effusion_side"] == "left"
    ad = report["adherence"]
    assert ad["without_prompt"] == 0 and ad["per_attribute"]["effusion"]["accuracy"] == 1.0
    assert ad["summary"]["ctr_gap"] > 0.05
    md = (out / "report.md").read_text()
    assert "not computed" in md and "## Prompt adherence" in md and "![HU histograms](hu_histograms.png)" in md
    for name in ("hu_histograms.png", "examples.png", "measurements.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 300 and img.size[1] > 300


def test_feature_network_path(dirs, tmp_path):
    """With weights: per-plane and volume-level distances on the requested grid. The weights are a
    random one-block-per-stage network, used only to exercise the path."""
    from flax import nnx
    from safetensors.numpy import save_file

    from ctgen.convert.namemap import convert
    from ctgen.weights import flatten_state
    from ctgen.convert.resnet import torchvision_resnet_rules
    from ctgen.models.resnet import ResNet50, ResNetConfig

    cfg = ResNetConfig(blocks=(1, 1, 1, 1))
    shapes = flatten_state(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: ResNet50(cfg, rngs=nnx.Rngs(0))))))
    rng = np.random.default_rng(0)
    flat = {k: rng.uniform(0.5, 1.5, v.shape) if k.endswith("/var") else 0.05 * rng.standard_normal(v.shape)
            for k, v in shapes.items()}
    sd, _ = convert(flat, torchvision_resnet_rules(cfg), direction="to_foreign")
    weights = str(tmp_path / "resnet.safetensors")
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, weights)
    report = evaluate_generated(str(dirs / "generated"), str(dirs / "reference"), str(tmp_path / "out"),
                                feature_weights=weights, grid=(17, 32, 32))
    fn = report["metrics"]["feature_network"]
    assert fn["computed"] and fn["protocol"] == {"grid": [17, 32, 32], "center_ratio": 0.4, "slice_size": None}
    planes = [fn[f"fid_{p}"] for p in ("axial", "coronal", "sagittal")]
    assert min(planes) > 0 and fn["fid_2p5d"] == pytest.approx(np.mean(planes)) and fn["volume_frechet"] > 0
    assert "| 2.5D FID |" in (tmp_path / "out" / "report.md").read_text()


def test_user_errors(dirs, tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    code = generated_command.main(["--generated", str(tmp_path / "empty"), "--reference", str(dirs / "reference")])
    assert code == 2 and "ctgen: error: --generated" in capsys.readouterr().err
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps([{"file": "study1"}]))
    with pytest.raises(UserError, match="entry 0 has no name .* or no prompt"):
        load_prompts(str(bad))
    with pytest.raises(UserError, match="no prompt names match"):
        evaluate_generated(str(dirs / "generated"), str(dirs / "reference"), str(tmp_path / "o"),
                           prompts={"elsewhere": "Cardiomegaly."})


def test_ctgen_eval_generated_mode(dirs, tmp_path, capsys):
    """`ctgen eval --generated --reference` runs this report; the modes do not mix."""
    from ctgen.cli import main

    out = tmp_path / "cli_out"
    assert main(["eval", "--generated", str(dirs / "generated"), "--reference", str(dirs / "reference"),
                 "--out", str(out)]) == 0
    assert "HU Wasserstein-1" in capsys.readouterr().out and (out / "report.json").exists()
    assert main(["eval", "--generated", str(dirs / "generated")]) == 2  # adherence only: needs prompts
    assert "no provenance/*.json with prompts" in capsys.readouterr().err
    assert main(["eval", "--reference", str(dirs / "reference")]) == 2
    assert "--reference needs --generated" in capsys.readouterr().err
    assert main(["eval", "--generated", str(dirs / "generated"), "--reference", str(dirs / "reference"),
                 "--weights", "w"]) == 2
    assert "belong to the other mode" in capsys.readouterr().err
    assert main(["eval", "--config", "configs/ctvit.py:tiny"]) == 2
    assert "needs --config and --weights" in capsys.readouterr().err


def test_adherence_only_from_provenance_or_prompt_file(dirs, tmp_path, capsys):
    """Without --reference: prompt adherence of the generated volumes, prompts from the provenance
    records `ctgen generate` writes, or from --prompts."""
    from ctgen.cli import main

    gen = tmp_path / "gen"
    os.makedirs(gen / "provenance")
    prompts = {}
    for line in (dirs / "prompts.csv").read_text().splitlines()[1:]:
        name, text = line.split(",", 1)
        if (dirs / "generated" / name).exists():
            prompts[name.replace(".nii.gz", "")] = text.strip('"')
    for name, text in prompts.items():
        os.link(dirs / "generated" / f"{name}.nii.gz", gen / f"{name}.nii.gz")
        (gen / "provenance" / f"{name}.json").write_text(json.dumps({"prompt": text, "seed": 0}))
    out = tmp_path / "adh"
    assert main(["eval", "--generated", str(gen), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prompt adherence of 4 generated volumes" in printed and "effusion: 1.000 (4/4)" in printed
    report = json.loads((out / "adherence.json").read_text())
    assert report["generated"] == {"dir": str(gen), "count": 4, "scored": 4}
    assert {p["name"] for p in report["adherence"]["pairs"]} == set(prompts)
    md = (out / "adherence.md").read_text()
    assert "| attribute | accuracy | judged |" in md and "| effusion | 1 | 4 |" in md
    # a prompt file pairs by name too; a wrong prompt shows as a miss
    wrong = dict(prompts)
    right_effusion = next(n for n, t in prompts.items() if "right pleural effusion" in t.lower())
    wrong[right_effusion] = "60 years old male: No significant pathology."
    (tmp_path / "p.json").write_text(json.dumps(wrong))
    assert main(["eval", "--generated", str(gen), "--prompts", str(tmp_path / "p.json"), "--out", str(out)]) == 0
    assert "effusion: 0.750 (3/4)" in capsys.readouterr().out
