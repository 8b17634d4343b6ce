"""Prompt building: the one function that turns report fields into model text.

Data preparation (training prompts) and generation (user prompts) both call `build_prompt`, so
the text a model was trained on and the text it is sampled with never disagree.

GenerateCT's convention (its `videotextdataset.py`): `"{age} years old {sex}: {impression}"`
with age from DICOM `PatientAge` ("064Y" -> "64"), sex M/F -> male/female, and the characters
`" ' ( )` removed from the whole prompt. Ages are read by `parse_age`, the one age rule (the
prepared datasets' `age` feature uses it too): ages in months, weeks or days become whole years
("006M" -> "0"; GenerateCT, which only saw years, would have printed "06").

Missing demographics are left out (GenerateCT wrote the literal "None"): "64 years old: X"
without sex, "female: X" without age, just "X" with neither. The rule, for any template: a
missing age or sex drops out together with the words the template attaches to it (its text up
to the next punctuation mark or field, e.g. " years old"); the template's own punctuation is
then tidied (no space before a mark, a run of marks keeps its last, no mark at the start).
Report text is never changed by this rule.
"""
from __future__ import annotations

import math
import re
import string
from typing import Any

PAPER_TEMPLATE = "{age} years old {sex}: {impression}"
FINDINGS_TEMPLATE = "{age} years old {sex}: {findings} {impression}"
TEMPLATES = {"paper": PAPER_TEMPLATE, "findings": FINDINGS_TEMPLATE}  # names `--prompt-template` accepts
DEMOGRAPHICS = ("age", "sex")  # fields that may be missing and then drop out of the prompt
_REMOVED = str.maketrans("", "", "\"'()")
_MARKS = ":,;."


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
    unparsable -> `""`."""
    years = parse_age(age)
    return str(int(years)) if math.isfinite(years) else ""


def format_sex(sex: Any) -> str:
    """M/F (any case, or male/female) -> male/female; missing -> `""`; else unchanged."""
    if sex is None or (isinstance(sex, float) and math.isnan(sex)):
        return ""
    s = str(sex).strip()
    low = s.lower()
    if low in ("m", "male"):
        return "male"
    if low in ("f", "female"):
        return "female"
    return s


def clean_text(text: Any) -> str:
    """Collapse whitespace; missing -> empty string."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return " ".join(str(text).split())


def resolve_template(name_or_template: str) -> str:
    """A template name from `TEMPLATES` ("paper", "findings") -> its template; anything else is
    taken as a `str.format` template itself."""
    return TEMPLATES.get(name_or_template, name_or_template)


def _tidy(text: str) -> str:
    """The template's punctuation after a field dropped out (see module docstring)."""
    text = re.sub(r"\s+([:,;.])", r"\1", text)
    text = re.sub(r"(?:[:,;.]\s*)+([:,;.])", r"\1", text)
    return re.sub(r"^\s*[:,;.]+", "", text)


def _fill(template: str, fields: dict[str, str]) -> str:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"prompt template {template!r}: {e}") from None
    pieces, values, dropped, after_missing = [], [], False, False
    for literal, name, spec, conversion in parsed:
        if after_missing:  # the words attached to the missing field, up to a mark or the next field
            cut = next((i for i, c in enumerate(literal) if c in _MARKS), len(literal))
            literal, after_missing = literal[cut:], False
        pieces.append(literal)
        if name is None:
            continue
        if name not in fields:
            raise ValueError(f"prompt template {template!r} uses unknown field {{{name}}}; available: {sorted(fields)}")
        if name in DEMOGRAPHICS and not fields[name]:
            dropped = after_missing = True
            continue
        value = "{0" + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        values.append(value.format(fields[name]))
        pieces.append(f"\0{len(values) - 1}\0")  # keeps report text out of `_tidy`
    text = "".join(pieces)
    if dropped:
        text = _tidy(text)
    return re.sub("\0(\\d+)\0", lambda m: values[int(m.group(1))], text)


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
    A missing (None, NaN, empty or unparsable) age or sex is left out with the words the template
    attaches to it: `"64 years old: X"`, `"female: X"`, `"X"` (rule in the module docstring).
    """
    fields = {
        "age": format_age(age),
        "sex": format_sex(sex),
        "impression": clean_text(impression),
        "findings": clean_text(findings),
    }
    return " ".join(_fill(template, fields).translate(_REMOVED).split())
