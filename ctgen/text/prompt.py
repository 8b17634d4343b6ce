"""Prompt building: the one function that turns report fields into model text.

Data preparation (training prompts) and generation (user prompts) both call `build_prompt`, so
the text a model was trained on and the text it is sampled with never disagree.

GenerateCT's convention (its `videotextdataset.py`): `"{age} years old {sex}: {impression}"`
with age from DICOM `PatientAge` ("064Y" -> "64"), sex M/F -> male/female, and the characters
`" ' ( )` removed from the whole prompt. Missing age or sex become the literal "None", as there.
Ages are read by `parse_age`, the one age rule (the prepared datasets' `age` feature uses it too):
ages in months, weeks or days become whole years ("006M" -> "0"; GenerateCT, which only saw
years, would have printed "06").
"""
from __future__ import annotations

import math
import re
from typing import Any

PAPER_TEMPLATE = "{age} years old {sex}: {impression}"
FINDINGS_TEMPLATE = "{age} years old {sex}: {findings} {impression}"
_REMOVED = str.maketrans("", "", "\"'()")


def parse_age(age: Any) -> float:
    """"064Y" / 64 / "64" -> 64.0; months/weeks/days converted to years; unknown -> NaN."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return float("nan")
    if isinstance(age, (int, float)):
        return float(age)
    m = re.fullmatch(r"\s*0*(\d+(?:\.\d+)?)\s*([YyMmWwDd])?\s*", str(age))
    if not m:
        return float("nan")
    value = float(m.group(1))
    return value / {"Y": 1, "M": 12, "W": 52.18, "D": 365.25}[(m.group(2) or "Y").upper()]


def format_age(age: Any) -> str:
    """Whole years of `parse_age`: `"064Y"` / `64` / `64.0` -> `"64"`, `"006M"` -> `"0"`; missing or
    unparsable -> `"None"` (as GenerateCT)."""
    years = parse_age(age)
    return str(int(years)) if math.isfinite(years) else "None"


def format_sex(sex: Any) -> str:
    """M/F (any case, or male/female) -> male/female; missing -> `"None"`; else unchanged."""
    if sex is None or (isinstance(sex, float) and math.isnan(sex)):
        return "None"
    s = str(sex).strip()
    low = s.lower()
    if low in ("m", "male"):
        return "male"
    if low in ("f", "female"):
        return "female"
    return s or "None"


def clean_text(text: Any) -> str:
    """Collapse whitespace; missing -> empty string."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return " ".join(str(text).split())


def build_prompt(
    *,
    age: Any = None,
    sex: Any = None,
    impression: Any = None,
    findings: Any = None,
    template: str = PAPER_TEMPLATE,
) -> str:
    """The model's text for one study.

    template: a `str.format` template over `age`, `sex`, `impression`, `findings`
      (`PAPER_TEMPLATE` by default; `FINDINGS_TEMPLATE` uses findings and impression together).
    """
    fields = {
        "age": format_age(age),
        "sex": format_sex(sex),
        "impression": clean_text(impression),
        "findings": clean_text(findings),
    }
    try:
        text = template.format(**fields)
    except KeyError as e:
        raise ValueError(
            f"prompt template {template!r} uses unknown field {e}; available: {sorted(fields)}"
        ) from None
    return " ".join(text.translate(_REMOVED).split())
