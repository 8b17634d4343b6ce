import pytest

from ctgen.text.prompt import FINDINGS_TEMPLATE, build_prompt, format_age


def test_paper_prompt_matches_generatect_convention():
    # GenerateCT issue #15 example, built from CT-RATE-style fields.
    p = build_prompt(age="026Y", sex="M", impression="Findings compatible with COVID-19 pneumonia.")
    assert p == "26 years old male: Findings compatible with COVID-19 pneumonia."


def test_quotes_and_parentheses_removed_and_missing_fields():
    p = build_prompt(age=None, sex="F", impression='Nodule (8 mm) in the "right" lung\'s apex.')
    assert p == "None years old female: Nodule 8 mm in the right lungs apex."


@pytest.mark.parametrize("raw,want", [("064Y", "64"), (64, "64"), (64.0, "64"), ("7M", "0"), ("abc", "None")])
def test_age(raw, want):
    assert format_age(raw) == want


def test_findings_template_and_bad_template():
    p = build_prompt(age="050Y", sex="F", findings="Heart size is increased.", impression="Cardiomegaly.",
                     template=FINDINGS_TEMPLATE)
    assert p == "50 years old female: Heart size is increased. Cardiomegaly."
    with pytest.raises(ValueError, match="unknown field"):
        build_prompt(impression="x", template="{nope}")
