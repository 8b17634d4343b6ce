"""Prompt parsing and adherence scoring in the phantom world."""
import numpy as np
import pytest

from ctgen.data.phantom_report import sample_attributes, write_report
from ctgen.eval.adherence import parse_prompt, predict, score
from ctgen.text.prompt import FINDINGS_TEMPLATE, PAPER_TEMPLATE, build_prompt


@pytest.mark.parametrize("text,want", [
    ("64 years old male: Cardiomegaly. Small right pleural effusion.",
     dict(cardiomegaly=True, effusion="right", effusion_size={"right": "small"}, nodules=False, emphysema=False)),
    ("70 years old female: Bilateral pleural effusion, more on the left. Emphysema.",
     dict(cardiomegaly=False, effusion="both", effusion_size={}, emphysema=True)),
    ("50 years old male: Heart size is normal. No pericardial effusion. No pleural effusion or pneumothorax is "
     "observed. No nodule, mass or infiltration is observed in either lung. No significant pathology.",
     dict(cardiomegaly=False, effusion="none", nodules=False, nodule_count_min=0)),
    ("50 years old male: The heart is enlarged. Bilateral pleural effusion is observed, more on the right large on "
     "the right, small on the left. 3 pulmonary nodules are observed in the right upper lobe and left lower lobe, "
     "the largest measuring 12 mm in the right upper lobe. Multiple pulmonary nodules, the largest in the right "
     "upper lobe.",
     dict(cardiomegaly=True, effusion="both", effusion_size={"right": "large", "left": "small"}, nodules=True,
          nodule_count_min=3)),
    ("40 years old female: A moderate pleural effusion is observed on the left. Consolidation in the left lower lobe.",
     dict(effusion="left", effusion_size={"left": "moderate"}, unscored=["consolidation"])),
])
def test_parse_prompt(text, want):
    got = parse_prompt(text)
    assert {k: got[k] for k in want} == want


def test_parse_matches_every_report_wording():
    """The report writer's attributes come back from its own text, impression-only and with findings."""
    for seed in range(150):
        rng = np.random.default_rng(seed)
        a = sample_attributes(rng, p_normal=0.2)
        rep = write_report(a, rng)
        r, l = a["effusion"]["right_ml"], a["effusion"]["left_ml"]
        side = "both" if r and l else ("right" if r else ("left" if l else "none"))
        for template in (PAPER_TEMPLATE, FINDINGS_TEMPLATE):
            p = parse_prompt(build_prompt(age=a["age"], sex=a["sex"], impression=rep["impression"],
                                          findings=rep["findings"], template=template))
            assert (p["cardiomegaly"], p["effusion"], p["nodules"], p["emphysema"]) == (
                a["cardiomegaly"], side, bool(a["nodules"]), a["emphysema"]["severity"] != "none"), (seed, rep)


def test_phantoms_adhere_to_their_own_prompts(measured_studies):
    prompts = [ph.prompt() for ph, _ in measured_studies]
    measured = [m for _, m in measured_studies]
    result = score(prompts, measured)
    assert result["overall_accuracy"] == 1.0 and result["all_correct_fraction"] == 1.0
    assert all(v["accuracy"] == 1.0 for v in result["per_attribute"].values() if v["n"])
    s = result["summary"]
    assert s["n_cardiomegaly"] == 2 and s["ctr_gap"] > 0.1
    assert s["right_effusion_detected_fraction"] == 1.0 and s["n_right_effusion"] == 2
    assert s["no_effusion_fluid_fraction"] == 0.0 and s["n_no_effusion"] == 3
    # the same volumes under each other's prompts adhere much less
    shuffled = score(prompts[1:] + prompts[:1], measured)
    assert shuffled["overall_accuracy"] < 0.8


def test_unmeasured_volume_does_not_adhere(measured_studies):
    ph, m = measured_studies[0]
    lost = dict(m, cardiothoracic_ratio=float("nan"))
    assert predict(lost)["cardiomegaly"] is None
    result = score([ph.prompt()], [lost])
    assert result["pairs"][0]["correct"]["cardiomegaly"] is False
    assert result["summary"]["ctr_cardiomegaly_mean"] is None
    with pytest.raises(ValueError, match="2 prompts for 1"):
        score([ph.prompt()] * 2, [m])
