"""The TFDS feature spec of prepared datasets (a contract) and assembly of one example.

Feature names (every dataset): `volume` int16 (D,H,W) HU zlib, `spacing` float32 (3,) mm (D,H,W),
`original_spacing` float32 (3,), `original_shape` int32 (3,), `orientation` text (original voxel
axis codes), `prompt`, `findings`, `impression`, `clinical`, `technique`, `sex`, `source_id`,
`patient_id` text, `age` float32 (NaN if unknown). Phantom datasets add `attributes` (JSON text)
and, with `keep_labels`, `labels` uint8 (D,H,W) zlib.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata
from typing import Any

import numpy as np

from ctgen.data.preprocess import GridConfig, preprocess
from ctgen.text.prompt import PAPER_TEMPLATE, build_prompt, parse_age
from ctgen.volume import VolumeError, to_int16_hu

DATASET_NAME = "ctgen_ct"
VERSION = "1.0.0"
REPORT_FIELDS = ("clinical", "technique", "findings", "impression")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """The builder config of one prepared dataset.

    name: TFDS config name (directory `<out>/ctgen_ct/<name>/1.0.0`).
    grid: target grid (see `preprocess.GridConfig`).
    report_fields: report sections to keep (others are stored as empty strings).
    prompt_template: `build_prompt` template (`PAPER_TEMPLATE`: "{age} years old {sex}: {impression}").
    phantom: add `attributes` (and `labels` if keep_labels).
    """

    name: str
    grid: GridConfig = GridConfig()
    report_fields: tuple[str, ...] = REPORT_FIELDS
    prompt_template: str = PAPER_TEMPLATE
    phantom: bool = False
    keep_labels: bool = True

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ValueError(f"dataset config name {self.name!r} may only use letters, digits, _ . -")
        bad = set(self.report_fields) - set(REPORT_FIELDS)
        if bad:
            raise ValueError(f"unknown report fields {sorted(bad)}; choose from {REPORT_FIELDS}")
        build_prompt(template=self.prompt_template)  # fail early on a bad template

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"] = dataclasses.asdict(self.grid)
        return d


def features(config: DatasetConfig):
    """`tfds.features.FeaturesDict` for `config`."""
    import tensorflow_datasets as tfds

    D, H, W = config.grid.shape
    f = {
        "volume": tfds.features.Tensor(shape=(D, H, W), dtype=np.int16, encoding="zlib"),
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "original_spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "original_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
        "orientation": tfds.features.Text(),
        "prompt": tfds.features.Text(),
        **{k: tfds.features.Text() for k in REPORT_FIELDS},
        "age": tfds.features.Scalar(dtype=np.float32),
        "sex": tfds.features.Text(),
        "source_id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
    }
    if config.phantom:
        f["attributes"] = tfds.features.Text()
        if config.keep_labels:
            f["labels"] = tfds.features.Tensor(shape=(D, H, W), dtype=np.uint8, encoding="zlib")
    return tfds.features.FeaturesDict(f)


_ASCII_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                            "\u2014": "-", "\u2212": "-", "\u00a0": " ", "\u00d7": "x", "\u2026": "..."})


def normalize_text(text: Any) -> tuple[str, str]:
    """NFKC + common punctuation to ASCII + whitespace collapse. Returns (text, remaining non-ASCII chars)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "", ""
    s = unicodedata.normalize("NFKC", str(text)).translate(_ASCII_MAP)
    s = " ".join(s.split())
    odd = "".join(sorted({c for c in s if ord(c) > 127}))
    return s, odd


def parse_sex(sex: Any) -> str:
    """M / F / "" (unknown)."""
    if sex is None or (isinstance(sex, float) and math.isnan(sex)):
        return ""
    s = str(sex).strip().upper()
    return {"MALE": "M", "FEMALE": "F"}.get(s, s if s in ("M", "F") else "")


def text_fields(report: dict, config: DatasetConfig, age: float, sex: str) -> tuple[dict, list[str]]:
    """Report sections + prompt for an example, and warnings about non-ASCII characters."""
    out, warnings = {}, []
    for k in REPORT_FIELDS:
        txt, odd = normalize_text(report.get(k)) if k in config.report_fields else ("", "")
        if odd:
            warnings.append(f"non-ASCII characters {odd!r} in {k} (kept)")
        out[k] = txt
    out["prompt"] = build_prompt(age=None if math.isnan(age) else age, sex=sex or None,
                                 impression=out["impression"], findings=out["findings"],
                                 template=config.prompt_template)
    return out, warnings


def assemble(loaded: dict, config: DatasetConfig, *, source_id: str, patient_id: str, name: str) -> tuple[dict, list[str]]:
    """Loaded source fields -> (TFDS example dict, warnings).

    `loaded` holds either `hu_ijk` + `affine` (+ optional `spacing_ijk`) in file order, or a
    canonical `volume_DxHxW` + `spacing` already on the grid (phantoms; with `labels`,
    `attributes`); plus `report` (dict of sections), `age`, `sex`.
    """
    age, sex = parse_age(loaded.get("age")), parse_sex(loaded.get("sex"))
    if "hu_ijk" in loaded:
        vol = preprocess(loaded["hu_ijk"], loaded["affine"], config.grid, name=name,
                         spacing_ijk=loaded.get("spacing_ijk"))
    else:
        v = loaded["volume_DxHxW"]
        if config.grid.shape[0] is not None and tuple(v.shape) != tuple(config.grid.shape):
            raise VolumeError(f"{name}: volume shape {v.shape} is not the grid {config.grid.shape}")
        vol = {"volume": to_int16_hu(v), "spacing": np.asarray(loaded["spacing"], np.float32),
               "orientation": loaded.get("orientation", "LPS"),
               "original_spacing": np.asarray(loaded["spacing"], np.float32),
               "original_shape": np.asarray(v.shape, np.int32)}
    text, warnings = text_fields(loaded.get("report", {}), config, age, sex)
    ex = {**vol, **text, "age": np.float32(age), "sex": sex, "source_id": source_id, "patient_id": patient_id}
    if config.phantom:
        ex["attributes"] = json.dumps(loaded.get("attributes", {}), sort_keys=True)
        if config.keep_labels:
            ex["labels"] = np.asarray(loaded["labels"], np.uint8)
    return ex, warnings
