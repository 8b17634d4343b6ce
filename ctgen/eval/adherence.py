"""Prompt adherence in the phantom world: what a prompt asks for, and whether a volume shows it.

`parse_prompt` reads the findings a phantom-world prompt states (the wording of
`ctgen.data.phantom_report.write_report`, in the impression and/or the findings section);
`predict` turns label-free measurements (`ctgen.eval.phantom_measure.measure_volume`) into the same
attributes; `score` compares them over a set of (prompt, measurement) pairs.

Scored attributes and the rule that reads them from a measurement:
  cardiomegaly    cardiothoracic ratio > 0.50 (the clinical cut-off)
  effusion        side ("none" / "right" / "left" / "both") from the fluid volume per side
                  (`MeasureConfig.effusion_present_ml`)
  effusion_size   small (< 300 mL) / moderate / large (> 1000 mL) per side the prompt sizes,
                  the report's own size words
  nodules         at least one nodule (absent: none)
  emphysema       %LAA-950 >= 5 (normal lungs stay below 5%)
The impression names every finding of a phantom, so a finding the prompt does not state is expected
absent. Consolidation, ground glass and aortic calcification are parsed but not scored (no
label-free measurement). A measurement that could not be made (NaN) counts as not adhering.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from ctgen.data.phantom_report import _effusion_size
from ctgen.eval.phantom_measure import MeasureConfig, effusion_side

CTR_CARDIOMEGALY = 0.50
LAA_EMPHYSEMA_PERCENT = 5.0
SCORED = ("cardiomegaly", "effusion", "effusion_size", "nodules", "emphysema")
_SIZE = r"(small|moderate|large)"
_SIDE = r"(right|left)"


def _sentences(text: str) -> list[str]:
    body = text.split(":", 1)[1] if ":" in text else text  # drop "{age} years old {sex}:"
    return [s.strip() for s in re.split(r"[.;]", body.lower()) if s.strip()]


def _negated(sentence: str, word: str) -> bool:
    i = sentence.find(word)
    return i >= 0 and re.search(r"\bno\b|\bwithout\b|\bnot\b", sentence[:i]) is not None


def parse_prompt(text: str) -> dict:
    """Expected attributes: cardiomegaly (bool), effusion ("none"/"right"/"left"/"both"),
    effusion_size ({side: "small"/"moderate"/"large"} for sides the text sizes), nodules (bool),
    nodule_count_min (the count the text implies: "a nodule" 1, "multiple" 2, "3 ... nodules" 3),
    emphysema (bool), unscored (other findings named)."""
    out = {"cardiomegaly": False, "effusion": "none", "effusion_size": {}, "nodules": False,
           "nodule_count_min": 0, "emphysema": False, "unscored": []}
    sides: set[str] = set()
    for s in _sentences(text):
        if ("cardiomegaly" in s and not _negated(s, "cardiomegaly")) or re.search(r"heart size is increased|heart is enlarged", s):
            out["cardiomegaly"] = True
        if "pleural effusion" in s and not _negated(s, "pleural effusion"):
            if "bilateral" in s:
                sides |= {"right", "left"}
            sides |= set(re.findall(r"\b" + _SIDE + r" pleural effusion", s))
            sides |= set(re.findall(r"observed on the " + _SIDE, s))
            for size, side in re.findall(_SIZE + r" (?:on the )?" + _SIDE, s):
                out["effusion_size"][side] = size
            m = re.search(r"\b(?:a|an) " + _SIZE + r" pleural effusion is observed on the " + _SIDE, s)
            if m:
                out["effusion_size"][m.group(2)] = m.group(1)
        if "nodule" in s and not _negated(s, "nodule"):
            out["nodules"] = True
            m = re.search(r"\b(\d+) pulmonary nodules", s)
            stated = int(m.group(1)) if m else (2 if "multiple" in s else 1)
            out["nodule_count_min"] = max(out["nodule_count_min"], stated)
        if re.search(r"emphysem", s) and not _negated(s, "emphysem"):
            out["emphysema"] = True
        for word in ("consolidation", "ground-glass", "atherosclerotic", "calcific"):
            if word in s and not _negated(s, word) and word not in out["unscored"]:
                out["unscored"].append(word)
    out["effusion"] = "both" if len(sides) == 2 else (sides.pop() if sides else "none")
    return out


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def predict(measured: dict, cfg: MeasureConfig = MeasureConfig()) -> dict:
    """The scored attributes read from a `measure_volume` result (None where not measured)."""
    ctr, laa, nod = measured["cardiothoracic_ratio"], measured["laa950_percent"], measured["nodule_count"]
    r, l = measured["effusion_right_ml"], measured["effusion_left_ml"]
    ok = _finite(r) and _finite(l)
    size = {side: (_effusion_size(v) if v >= cfg.effusion_present_ml else "none")
            for side, v in (("right", r), ("left", l))} if ok else None
    return {
        "cardiomegaly": bool(ctr > CTR_CARDIOMEGALY) if _finite(ctr) else None,
        "effusion": effusion_side(r, l, cfg.effusion_present_ml) if ok else None,
        "effusion_size": size,
        "nodules": bool(nod >= 1) if _finite(nod) else None,
        "emphysema": bool(laa >= LAA_EMPHYSEMA_PERCENT) if _finite(laa) else None,
    }


def _judge(expected: dict, got: dict) -> dict[str, bool | None]:
    """Per scored attribute: True / False, or None when the prompt does not ask about it."""
    out: dict[str, bool | None] = {}
    for key in ("cardiomegaly", "effusion", "nodules", "emphysema"):
        out[key] = got[key] is not None and got[key] == expected[key]
    sizes = expected["effusion_size"]
    if not sizes:
        out["effusion_size"] = None
    else:
        out["effusion_size"] = got["effusion_size"] is not None and all(
            got["effusion_size"][side] == size for side, size in sizes.items())
    return out


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if _finite(v)]
    return float(np.mean(vals)) if vals else None


def score(prompts: Sequence[str], measured: Sequence[dict], cfg: MeasureConfig = MeasureConfig()) -> dict:
    """Adherence of volumes to their prompts (pairs in order).

    Returns {pairs: [{prompt, expected, predicted, correct}], per_attribute: {attr: {n, correct,
    accuracy}}, overall_accuracy (all judged attribute checks), all_correct_fraction (pairs right on
    every judged attribute), summary: {ctr_cardiomegaly_mean, ctr_normal_mean, ctr_gap (their
    difference; "normal" = prompts without cardiomegaly), n_cardiomegaly, n_normal,
    right_effusion_detected_fraction (prompts with a right effusion, fluid measured on the right),
    no_effusion_fluid_fraction (prompts without effusion, fluid measured on either side)}}.
    """
    if len(prompts) != len(measured):
        raise ValueError(f"{len(prompts)} prompts for {len(measured)} measurements")
    pairs = []
    for text, m in zip(prompts, measured):
        exp, got = parse_prompt(text), predict(m, cfg)
        pairs.append({"prompt": text, "expected": exp, "predicted": got, "correct": _judge(exp, got)})
    per = {}
    for key in SCORED:
        judged = [p["correct"][key] for p in pairs if p["correct"][key] is not None]
        per[key] = {"n": len(judged), "correct": int(sum(judged)),
                    "accuracy": float(np.mean(judged)) if judged else None}
    checks = [v for p in pairs for v in p["correct"].values() if v is not None]
    all_right = [all(v for v in p["correct"].values() if v is not None) for p in pairs]
    cardio = [m["cardiothoracic_ratio"] for p, m in zip(pairs, measured) if p["expected"]["cardiomegaly"]]
    normal = [m["cardiothoracic_ratio"] for p, m in zip(pairs, measured) if not p["expected"]["cardiomegaly"]]
    c_mean, n_mean = _mean(cardio), _mean(normal)
    right = [p["predicted"]["effusion"] in ("right", "both") for p in pairs
             if p["expected"]["effusion"] in ("right", "both")]
    none = [p["predicted"]["effusion"] != "none" for p in pairs if p["expected"]["effusion"] == "none"]
    summary = {
        "ctr_cardiomegaly_mean": c_mean, "ctr_normal_mean": n_mean,
        "ctr_gap": c_mean - n_mean if c_mean is not None and n_mean is not None else None,
        "n_cardiomegaly": len(cardio), "n_normal": len(normal),
        "right_effusion_detected_fraction": float(np.mean(right)) if right else None, "n_right_effusion": len(right),
        "no_effusion_fluid_fraction": float(np.mean(none)) if none else None, "n_no_effusion": len(none),
    }
    return {"pairs": pairs, "per_attribute": per,
            "overall_accuracy": float(np.mean(checks)) if checks else None,
            "all_correct_fraction": float(np.mean(all_right)) if all_right else None, "summary": summary}
