"""Phantom attributes (what a synthetic study shows) and the CT-RATE-style report written from them.

`sample_attributes` draws a study; `write_report` turns attributes into the four report sections.
Both are deterministic for a given `np.random.Generator` state. Attribute dicts are plain JSON.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ctgen.data.anatomy import LOBES

SEVERITY_LAA = {"none": 0.0, "mild": 0.08, "moderate": 0.17, "severe": 0.30}  # share of lung below -950 HU


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_attributes(rng: np.random.Generator, *, p_normal: float = 0.3, **overrides: Any) -> dict:
    """Draw one study: demographics, body habitus and findings.

    p_normal: probability of a study with no finding at all.
    overrides: replace any top-level attribute (e.g. `cardiomegaly=True, effusion={...}`).
    """
    sex = "M" if rng.random() < 0.55 else "F"
    age = int(np.clip(rng.normal(58, 14), 20, 90))
    a: dict[str, Any] = {
        "sex": sex,
        "age": age,
        "body": {
            "width_scale": float(rng.normal(1.0, 0.05) * (1.04 if sex == "M" else 0.96)),
            "depth_scale": float(rng.normal(1.0, 0.06)),
            "fat_mm": float(np.clip(rng.normal(14 if sex == "M" else 20, 6) + 0.08 * (age - 50), 4, 40)),
        },
        "cardiomegaly": False,
        "cardiothoracic_ratio": float(np.clip(rng.normal(0.45, 0.025), 0.38, 0.49)),
        "effusion": {"right_ml": 0.0, "left_ml": 0.0},
        "nodules": [],
        "emphysema": {"severity": "none", "bullae": 0},
        "opacities": [],
        "aortic_calcification": False,
    }
    if rng.random() >= p_normal:
        n_findings = 0
        while n_findings == 0:
            if rng.random() < 0.25:
                a["cardiomegaly"] = True
                a["cardiothoracic_ratio"] = float(rng.uniform(0.55, 0.70))
                n_findings += 1
            if rng.random() < 0.25:
                side = _pick(rng, ("right", "left", "both"))
                vol = lambda: float(np.round(np.exp(rng.uniform(np.log(80), np.log(1200))), -1))  # noqa: E731
                a["effusion"] = {"right_ml": vol() if side in ("right", "both") else 0.0,
                                 "left_ml": vol() if side in ("left", "both") else 0.0}
                n_findings += 1
            if rng.random() < 0.3:
                k = int(rng.choice([1, 1, 1, 2, 3, 4]))
                a["nodules"] = [{"lobe": _pick(rng, LOBES),
                                 "diameter_mm": float(np.round(rng.uniform(5, 25)))} for _ in range(k)]
                n_findings += 1
            if rng.random() < 0.25:
                sev = _pick(rng, ("mild", "moderate", "severe"))
                a["emphysema"] = {"severity": sev, "bullae": int(rng.integers(0, 3)) if sev != "mild" else 0}
                n_findings += 1
            if rng.random() < 0.25:
                a["opacities"] = [{"kind": _pick(rng, ("consolidation", "ground_glass")),
                                   "lobe": _pick(rng, LOBES),
                                   "fraction": float(np.round(rng.uniform(0.15, 0.6), 2))}
                                  for _ in range(int(rng.integers(1, 3)))]
                n_findings += 1
            if age > 55 and rng.random() < 0.3:
                a["aortic_calcification"] = True
                n_findings += 1
    a.update(overrides)
    a["normal"] = not has_findings(a)
    return a


def has_findings(a: dict) -> bool:
    eff = a["effusion"]
    return bool(a["cardiomegaly"] or eff["right_ml"] > 0 or eff["left_ml"] > 0 or a["nodules"]
                or a["emphysema"]["severity"] != "none" or a["opacities"] or a["aortic_calcification"])


def _effusion_size(ml: float) -> str:
    return "small" if ml < 300 else ("moderate" if ml <= 1000 else "large")


def _lobe_list(lobes: list[str]) -> str:
    uniq = list(dict.fromkeys(lobes))
    return uniq[0] if len(uniq) == 1 else ", ".join(uniq[:-1]) + " and " + uniq[-1]


def write_report(a: dict, rng: np.random.Generator) -> dict[str, str]:
    """CT-RATE-style sections {clinical, technique, findings, impression} for attributes `a`."""
    f: list[str] = []
    imp: list[str] = []
    f.append(_pick(rng, ("Trachea and both main bronchi are open.",
                         "Trachea and both main bronchi are in midline and open.")))
    if a["cardiomegaly"]:
        f.append(_pick(rng, ("Heart size is increased.", "The heart is enlarged.")) + " No pericardial effusion.")
        imp.append("Cardiomegaly.")
    else:
        f.append(_pick(rng, ("Heart size is normal.", "Heart contour and size are normal."))
                 + " No pericardial effusion.")
    if a["aortic_calcification"]:
        f.append("Calcific atherosclerotic changes are observed in the thoracic aorta.")
        imp.append("Atherosclerotic changes in the aorta.")
    else:
        f.append("Thoracic aorta diameter is normal.")
    r, l = a["effusion"]["right_ml"], a["effusion"]["left_ml"]
    if r > 0 and l > 0:
        more = "right" if r > l else "left"
        f.append(f"Bilateral pleural effusion is observed, more on the {more} "
                 f"({_effusion_size(max(r, l))} on the {more}, {_effusion_size(min(r, l))} on the "
                 f"{'left' if more == 'right' else 'right'}).")
        imp.append(f"Bilateral pleural effusion, more on the {more}.")
    elif r > 0 or l > 0:
        side, ml = ("right", r) if r > 0 else ("left", l)
        f.append(f"A {_effusion_size(ml)} pleural effusion is observed on the {side}.")
        imp.append(f"{_effusion_size(ml).capitalize()} {side} pleural effusion.")
    else:
        f.append("No pleural effusion or pneumothorax is observed.")
    emph = a["emphysema"]
    if emph["severity"] != "none":
        f.append(f"{emph['severity'].capitalize()} centrilobular emphysematous changes are observed in both lungs, "
                 "predominantly in the upper lobes.")
        imp.append("Emphysema.")
        if emph.get("bullae", 0):
            f.append("Subpleural bullae are observed at the lung apices.")
    for op in a["opacities"]:
        if op["kind"] == "consolidation":
            f.append(f"An area of consolidation is observed in the {op['lobe']}.")
        else:
            f.append(f"Ground-glass opacities are observed in the {op['lobe']}.")
    cons = [o["lobe"] for o in a["opacities"] if o["kind"] == "consolidation"]
    ggo = [o["lobe"] for o in a["opacities"] if o["kind"] == "ground_glass"]
    if cons:
        imp.append(f"Consolidation in the {_lobe_list(cons)}.")
    if ggo:
        imp.append(f"Ground-glass opacities in the {_lobe_list(ggo)}.")
    nods = a["nodules"]
    if len(nods) == 1:
        n = nods[0]
        f.append(f"A {n['diameter_mm']:.0f} mm nodule is observed in the {n['lobe']}.")
        imp.append(f"Pulmonary nodule in the {n['lobe']}.")
    elif nods:
        big = max(nods, key=lambda n: n["diameter_mm"])
        f.append(f"{len(nods)} pulmonary nodules are observed in the {_lobe_list([n['lobe'] for n in nods])}, "
                 f"the largest measuring {big['diameter_mm']:.0f} mm in the {big['lobe']}.")
        imp.append(f"Multiple pulmonary nodules, the largest in the {big['lobe']}.")
    if not (nods or a["opacities"] or emph["severity"] != "none"):
        f.append(_pick(rng, ("Both lung parenchyma are normal; no mass or infiltrative lesion.",
                             "No nodule, mass or infiltration is observed in either lung.")))
    f.append("No lytic-destructive lesion is observed in the bone structures within the study area.")
    if not imp:
        imp.append(_pick(rng, ("No significant pathology.", "The overall examination is within normal limits.")))
    clinical = _pick(rng, ("Shortness of breath.", "Cough.", "Follow-up.", "Chest pain.", "Screening."))
    if a["opacities"]:
        clinical = _pick(rng, ("Fever and cough.", "Suspected pneumonia."))
    technique = "Non-contrast chest CT was obtained in the axial plane (synthetic phantom)."
    return {"clinical": clinical, "technique": technique, "findings": " ".join(f), "impression": " ".join(imp)}
