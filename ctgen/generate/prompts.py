"""What to generate: prompts from the command line or a file, their output names and seeds.

Inputs (`read_prompt_file`):
  * a CT-RATE reports CSV (`VolumeName, Findings_EN, Impressions_EN, ...`), with age and sex from
    `PatientAge` / `PatientSex` columns of the same file or of a metadata CSV keyed by VolumeName;
  * a CSV with a `prompt`, `report` or `text` column (GenerateCT's `Text_prompts` too), an optional
    name column (`name`, `VolumeName`, `input_image_name`, `Names`) and optional `age` / `sex` /
    `findings` columns;
  * a JSON list of `{"name": ..., "report" | "prompt" | "text": ...}` objects (the VLM3D text-to-CT
    challenge's format), or a JSON object mapping names to texts.

Every text goes through `ctgen.text.prompt.build_prompt`, the function data preparation uses, so a
report becomes the same model text it would have been in training (template "paper" uses the
impression, "findings" findings and impression). Output names are the given names made safe for
file systems, or `<slug of the prompt>_<row>` without one; `plan_samples` expands each prompt into
`--num-samples` samples (`<name>_s<k>` when more than one) with a seed derived from the run seed,
the name and k only, so any number of processes gives every sample the same volume.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from ctgen.errors import UserError
from ctgen.text.prompt import build_prompt, resolve_template

NAME_KEYS = ("name", "VolumeName", "input_image_name", "Names")
TEXT_KEYS = ("prompt", "report", "text", "Text_prompts")
CTRATE_TEXT = ("Impressions_EN", "Findings_EN")
AGE_KEYS = ("age", "PatientAge")
SEX_KEYS = ("sex", "PatientSex")
FINDINGS_KEYS = ("findings", "Findings_EN")
MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class PromptEntry:
    """One prompt of the input. `name`: the safe output name; `where`: file and row, for messages."""

    name: str
    prompt: str
    where: str
    age: str = ""
    sex: str = ""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One volume to generate: `name` is the output file stem, `seed` its own sampling seed."""

    name: str
    prompt: str
    seed: int
    index: int  # k of the prompt's `num_samples`
    base: str  # the prompt's name
    where: str
    age: str = ""
    sex: str = ""


def safe_name(name: str) -> str:
    """A file-system-safe stem: runs of characters outside [A-Za-z0-9._-] become "_", no leading dot,
    `.nii` / `.nii.gz` dropped, at most MAX_NAME characters; "" if nothing is left."""
    name = str(name).strip()
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return _UNSAFE.sub("_", name).lstrip("._")[:MAX_NAME].rstrip("._")


def slug(text: str, words: int = 8) -> str:
    """The first `words` words of `text`, lower case, joined by "-" (for names of unnamed prompts)."""
    parts = re.findall(r"[a-z0-9]+", text.lower())[:words]
    return "-".join(parts)[:60].rstrip("-") or "prompt"


def sample_seed(seed: int, name: str, k: int) -> int:
    """The seed of sample k of prompt `name` in a run with `--seed seed` (31 bits, any framework)."""
    digest = hashlib.sha256(f"ctgen-generate:{int(seed)}:{name}:{int(k)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _first(row: Mapping[str, Any], keys: Iterable[str]) -> str:
    for k in keys:
        v = row.get(k)
        if v is not None and str(v).strip():
            return str(v).strip()
    return ""


def _entry(name: str, where: str, template: str, *, text: str = "", findings: str = "",
           age: str = "", sex: str = "") -> PromptEntry:
    prompt = build_prompt(age=age or None, sex=sex or None, impression=text, findings=findings, template=template)
    if not prompt:
        raise UserError(f"{where}: empty prompt" + (f" for {name!r}" if name else ""))
    return PromptEntry(name=name, prompt=prompt, where=where, age=age, sex=sex)


def prompt_from_text(text: str, template: str = "paper") -> PromptEntry:
    """The command line's single prompt (named like the first prompt of a file: a slug of the prompt and 0001)."""
    if not str(text or "").strip():
        raise UserError("empty prompt: give the report text, e.g. \"64 years old female: Cardiomegaly.\"")
    entry = _entry("", "the prompt argument", resolve_template(template), text=text)
    return dataclasses.replace(entry, name=f"{slug(entry.prompt)}_0001")


def _read_rows(path: str, option: str = "--prompts") -> tuple[list[dict], str]:
    """(rows, kind) of a prompt file; kind is "json" or "csv" (comma, semicolon or tab separated,
    whichever the header line uses most). `option` names the file's flag in errors."""
    if not os.path.exists(path):
        raise UserError(f"{option} {path}: no such file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{option} {path}: cannot read ({type(e).__name__}: {e})") from None
    if path.lower().endswith(".json") or text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UserError(f"{option} {path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            return [{"name": k, "prompt": v} for k, v in data.items()], "json"
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{option} {path}: expected a JSON list of {{\"name\", \"report\"|\"prompt\"}} objects "
                            "or an object mapping names to prompts")
        return data, "json"
    header = text.splitlines()[0] if text.strip() else ""
    delimiter = max(",;\t", key=header.count)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    return [{(k or "").strip(): v for k, v in r.items()} for r in reader], "csv"


def _metadata(path: str) -> dict[str, dict]:
    """Rows of a CT-RATE metadata CSV keyed by VolumeName (without extension)."""
    rows, _ = _read_rows(path, "--prompt-metadata")
    if rows and "VolumeName" not in rows[0]:
        raise UserError(f"--prompt-metadata {path}: no VolumeName column; found columns: {', '.join(rows[0])}")
    return {safe_name(r.get("VolumeName") or ""): r for r in rows}


def read_prompt_file(path: str, template: str = "paper", metadata: str | None = None) -> list[PromptEntry]:
    """The prompts of a file (formats in the module docstring), in file order.

    template: "paper", "findings" or a `build_prompt` template. metadata: a CT-RATE metadata CSV
    giving PatientAge / PatientSex by VolumeName. Raises UserError (one line) for an unreadable
    file, a file without a usable text column (naming the columns found), an empty prompt or a
    duplicated name.
    """
    template = resolve_template(template)
    rows, kind = _read_rows(path)
    if not rows:
        raise UserError(f"--prompts {path}: no prompts in the file")
    meta = _metadata(metadata) if metadata else {}
    columns = list(rows[0]) if kind == "csv" else sorted({k for r in rows for k in r})
    text_keys = [k for k in TEXT_KEYS if k in columns] or [k for k in CTRATE_TEXT if k in columns]
    if not text_keys:
        what = "column" if kind == "csv" else "field"
        raise UserError(f"--prompts {path}: no prompt {what} ({', '.join(TEXT_KEYS)}, or CT-RATE's "
                        f"{' / '.join(CTRATE_TEXT)}); found {what}s: {', '.join(columns) or 'none'}")
    ctrate = text_keys[0] in CTRATE_TEXT
    entries: list[PromptEntry] = []
    seen: dict[str, str] = {}
    for i, row in enumerate(rows, start=1):
        where = f"{path}:{i + 1}" if kind == "csv" else f"{path} entry {i}"
        given = _first(row, NAME_KEYS)
        name = safe_name(given)
        extra = meta.get(name, {})
        findings = _first(row, FINDINGS_KEYS)
        if ctrate:
            text = _first(row, ("Impressions_EN",))
            if not (text or findings):
                raise UserError(f"{where}: empty prompt (no Impressions_EN or Findings_EN)"
                                + (f" for {given!r}" if given else ""))
        else:
            if kind == "json" and not any(k in row for k in TEXT_KEYS):
                raise UserError(f"{where}: no {'/'.join(TEXT_KEYS)} field; found keys: {', '.join(row) or 'none'}")
            text = _first(row, TEXT_KEYS)
        entry = _entry(name, where, template, text=text, findings=findings,
                       age=_first(row, AGE_KEYS) or _first(extra, AGE_KEYS),
                       sex=_first(row, SEX_KEYS) or _first(extra, SEX_KEYS))
        if given and not name:
            raise UserError(f"{where}: name {given!r} has no usable characters for a file name")
        if not name:
            entry = dataclasses.replace(entry, name=f"{slug(entry.prompt)}_{i:04d}")
        if entry.name in seen:
            raise UserError(f"--prompts {path}: duplicate name {entry.name!r} ({seen[entry.name]} and {where})")
        seen[entry.name] = where
        entries.append(entry)
    return entries


def plan_samples(entries: Sequence[PromptEntry], num_samples: int, seed: int) -> list[Sample]:
    """Each prompt `num_samples` times: names `<name>` (one sample) or `<name>_s<k>` (unique, as the
    prompts' names are and the suffix is), seeds `sample_seed(seed, name, k)`."""
    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: must be at least 1")
    samples = []
    for e in entries:
        for k in range(num_samples):
            name = e.name if num_samples == 1 else f"{e.name}_s{k}"
            samples.append(Sample(name=name, prompt=e.prompt, seed=sample_seed(seed, e.name, k), index=k, base=e.name,
                                  where=e.where, age=e.age, sex=e.sex))
    return samples
