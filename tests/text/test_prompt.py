import pytest

from ctgen.text.prompt import FINDINGS_TEMPLATE, build_prompt, format_age


def test_paper_prompt_matches_generatect_convention():
    # GenerateCT issue #15 example, built from CT-RATE-style fields.
    p = build_prompt(age="026Y", sex="M", impression="Findings compatible with COVID-19 pneumonia.")
    assert p == "26 years old male: Findings compatible with COVID-19 pneumonia."


def test_quotes_and_parentheses_removed():
    p = build_prompt(age=50, sex="F", impression='Nodule (8 mm) in the "right" lung\'s apex.')
    assert p == "50 years old female: Nodule 8 mm in the right lungs apex."


@pytest.mark.parametrize("age,sex,want", [
    ("064Y", None, "64 years old: No acute findings."),
    (None, "F", "female: No acute findings."),
    (None, None, "No acute findings."),
    (float("nan"), "", "No acute findings."),
    ("unknown", float("nan"), "No acute findings."),
])
def test_missing_demographics_are_left_out(age, sex, want):
    assert build_prompt(age=age, sex=sex, impression="No acute findings.") == want
    both = build_prompt(age=age, sex=sex, findings="Heart size is increased.", impression="No acute findings.",
                        template=FINDINGS_TEMPLATE)
    assert both == want.replace("No acute", "Heart size is increased. No acute")


@pytest.mark.parametrize("age,sex,want", [
    (64, "M", "Patient, 64 years old, male. Report: x ,; . y"),
    (None, "M", "Patient, male. Report: x ,; . y"),
    (64, None, "Patient, 64 years old. Report: x ,; . y"),
    (None, None, "Patient. Report: x ,; . y"),
])
def test_custom_template_drops_a_missing_field_with_its_words_and_keeps_report_text(age, sex, want):
    template = "Patient, {age} years old, {sex}. Report: {impression}"
    assert build_prompt(age=age, sex=sex, impression="x ,; . y", template=template) == want


@pytest.mark.parametrize("raw,want", [("064Y", "64"), (64, "64"), (64.0, "64"), ("7M", "0"), ("abc", ""), (None, "")])
def test_age(raw, want):
    assert format_age(raw) == want


def test_findings_template_and_bad_template():
    p = build_prompt(age="050Y", sex="F", findings="Heart size is increased.", impression="Cardiomegaly.",
                     template=FINDINGS_TEMPLATE)
    assert p == "50 years old female: Heart size is increased. Cardiomegaly."
    with pytest.raises(ValueError, match="unknown field"):
        build_prompt(impression="x", template="{nope}")
