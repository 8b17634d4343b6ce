"""`ctgen.generate.prompts`: prompt files of every kind, output names, per-sample seeds, errors."""
import json

import pytest

from ctgen.errors import UserError
from ctgen.generate.prompts import (plan_samples, prompt_from_text, read_prompt_file, safe_name, sample_seed)
from ctgen.text.prompt import FINDINGS_TEMPLATE, build_prompt


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_ctrate_reports_with_metadata(tmp_path):
    reports = _write(tmp_path / "validation_reports.csv",
                     "VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN\n"
                     "valid_1_a_1.nii.gz,Cough.,Non-contrast.,Heart enlarged.,\"Cardiomegaly (mild).\"\n"
                     "valid_2_a_1.nii.gz,,,Lungs clear.,No acute findings.\n")
    meta = _write(tmp_path / "validation_metadata.csv",
                  "VolumeName,RescaleSlope,RescaleIntercept,PatientAge,PatientSex\n"
                  "valid_1_a_1.nii.gz,1,-1024,064Y,F\nvalid_2_a_1.nii.gz,1,-1024,,M\n")
    entries = read_prompt_file(reports, metadata=meta)
    assert [e.name for e in entries] == ["valid_1_a_1", "valid_2_a_1"]
    assert entries[0].prompt == "64 years old female: Cardiomegaly mild." == build_prompt(
        age="064Y", sex="F", impression="Cardiomegaly (mild).")
    assert entries[1].prompt == "male: No acute findings."
    assert (entries[0].age, entries[0].sex) == ("064Y", "F")
    findings = read_prompt_file(reports, template="findings", metadata=meta)
    assert findings[0].prompt == build_prompt(age="064Y", sex="F", findings="Heart enlarged.",
                                              impression="Cardiomegaly (mild).", template=FINDINGS_TEMPLATE)
    assert findings[0].where == f"{reports}:2"


def test_prompt_column_csv_names_and_slugs(tmp_path):
    path = _write(tmp_path / "p.csv", "prompt,age,sex,name\n"
                                      "Bilateral pleural effusion.,51,M,case one\n"
                                      "\"Emphysema, upper lobes.\",,,\n")
    a, b = read_prompt_file(path)
    assert (a.name, a.prompt) == ("case_one", "51 years old male: Bilateral pleural effusion.")
    assert b.name == "emphysema-upper-lobes_0002" and b.prompt == "Emphysema, upper lobes."
    assert read_prompt_file(path) == [a, b]  # deterministic
    semicolons = _write(tmp_path / "s.csv", "report;name\nNodule.;n1\n")
    assert [(e.name, e.prompt) for e in read_prompt_file(semicolons)] == [("n1", "Nodule.")]
    one_column = _write(tmp_path / "o.csv", "text\nAtelectasis; small effusion.\n")
    assert [e.prompt for e in read_prompt_file(one_column)] == ["Atelectasis; small effusion."]


def test_vlm3d_json_list_and_mapping(tmp_path):
    path = _write(tmp_path / "challenge.json", json.dumps([
        {"name": "valid_10_a_1", "report": "Cardiomegaly. Bilateral pleural effusion."},
        {"name": "valid_11_a_1.nii.gz", "prompt": "No pathology."}]))
    entries = read_prompt_file(path)
    assert [(e.name, e.prompt) for e in entries] == [("valid_10_a_1", "Cardiomegaly. Bilateral pleural effusion."),
                                                    ("valid_11_a_1", "No pathology.")]
    mapping = _write(tmp_path / "m.json", json.dumps({"x/y": "Atelectasis."}))
    assert [(e.name, e.prompt) for e in read_prompt_file(mapping)] == [("x_y", "Atelectasis.")]


def test_safe_names():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name(" train 1 (a).nii.gz ") == "train_1_a"
    assert safe_name("...") == ""
    assert len(safe_name("x" * 500)) == 120


@pytest.mark.parametrize("content,suffix,match", [
    ("VolumeName,Findings\nv1,x\n", ".csv", "no prompt column .*found columns: VolumeName, Findings"),
    ("[{\"name\": \"a\", \"caption\": \"x\"}]", ".json", "no prompt field .*found fields: caption, name"),
    ("[{\"name\": \"a\", \"report\": \"x\"}, {\"name\": \"b\"}]", ".json", "entry 2: no prompt/report/text"),
    ("prompt,name\nx,a\n\"  \",b\n", ".csv", r"p\.csv:3: empty prompt for 'b'"),
    ("prompt,name\nx,a\ny,a\n", ".csv", r"duplicate name 'a' \(.*p\.csv:2 and .*p\.csv:3\)"),
    ("[1, 2]", ".json", "expected a JSON list"),
    ("{not json", ".json", "not valid JSON"),
    ("prompt\n", ".csv", "no prompts in the file"),
])
def test_prompt_file_errors(tmp_path, content, suffix, match):
    path = _write(tmp_path / f"p{suffix}", content)
    with pytest.raises(UserError, match=match):
        read_prompt_file(path)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_prompt_file(str(tmp_path / "missing.csv"))
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="cannot read"):
        read_prompt_file(str(binary))


def test_single_prompt():
    entry = prompt_from_text("64 years old female: Cardiomegaly (severe).")
    assert entry.prompt == "64 years old female: Cardiomegaly severe."
    assert entry.name == "64-years-old-female-cardiomegaly-severe_0001"
    for empty in ("", "   ", "\"()'"):
        with pytest.raises(UserError, match="empty prompt"):
            prompt_from_text(empty)


def test_samples_names_and_seeds():
    entries = [prompt_from_text("Cardiomegaly."), prompt_from_text("Effusion.")]
    one = plan_samples(entries, 1, seed=7)
    three = plan_samples(entries, 3, seed=7)
    assert [s.name for s in one] == ["cardiomegaly_0001", "effusion_0001"]
    assert [s.name for s in three[:3]] == ["cardiomegaly_0001_s0", "cardiomegaly_0001_s1", "cardiomegaly_0001_s2"]
    # a sample's seed depends on the run seed, the prompt's name and k only
    assert three[0].seed == one[0].seed == sample_seed(7, "cardiomegaly_0001", 0)
    assert len({s.seed for s in three}) == 6
    assert plan_samples(entries[1:], 3, seed=7)[1].seed == three[4].seed
    assert plan_samples(entries, 1, seed=8)[0].seed != one[0].seed
    with pytest.raises(UserError, match="at least 1"):
        plan_samples(entries, 0, seed=0)
