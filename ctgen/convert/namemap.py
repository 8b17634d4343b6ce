"""Declarative name maps between ctgen's flat parameter names and foreign checkpoints.

A conversion is a list of `Rule`s. Each rule pairs a ctgen path pattern with a foreign key
pattern; `{name}` placeholders match one dotted/slashed component of digits or identifiers
and are carried across. A rule may carry a pair of hooks: `to_foreign(array) -> array`
and `to_ours(array) -> array` (transposes, reshapes, layout changes). Keys on either side that no
rule matches, and shape mismatches after the hook, are reported together, never silently
dropped.

ctgen paths are '/'-joined NNX state paths (`enc_spatial/layers/0/attn/to_q/kernel`), foreign
keys are whatever the other side uses ('.'-joined for PyTorch).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import numpy as np

Hook = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """Dense kernel (in, out) <-> torch Linear weight (out, in)."""
    return np.ascontiguousarray(np.asarray(x).T)


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    foreign: str
    to_foreign: Hook = identity
    to_ours: Hook = identity

    def _regex(self, pattern: str) -> re.Pattern:
        parts = re.split(r"(\{[a-z_]+\})", pattern)
        rx = "".join(
            f"(?P<{p[1:-1]}>[A-Za-z0-9_]+)" if p.startswith("{") else re.escape(p) for p in parts
        )
        return re.compile(rx + r"\Z")

    def match_ours(self, path: str) -> dict | None:
        m = self._regex(self.ours).match(path)
        return m.groupdict() if m else None

    def match_foreign(self, key: str) -> dict | None:
        m = self._regex(self.foreign).match(key)
        return m.groupdict() if m else None


class ConversionError(ValueError):
    """Raised with a full report when a conversion has missing, unexpected or mis-shaped keys."""

    def __init__(self, report: "Report"):
        super().__init__(report.describe())
        self.report = report


@dataclasses.dataclass
class Report:
    missing: list[str] = dataclasses.field(default_factory=list)  # wanted by the target, not produced
    unexpected: list[str] = dataclasses.field(default_factory=list)  # present in the source, unused
    mismatched: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    converted: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        lines = [f"converted {self.converted} tensors"]

        def block(title, items):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {i}" for i in items[:limit])
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")

        block("missing keys", self.missing)
        block("unexpected keys", self.unexpected)
        block("shape mismatches (key, got, expected)", [f"{k}: {a} vs {b}" for k, a, b in self.mismatched])
        return "\n".join(lines)


def _fill(pattern: str, groups: Mapping[str, str]) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda m: groups[m.group(1)], pattern)


def convert(
    source: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    *,
    direction: str,
    expected_shapes: Mapping[str, tuple] | None = None,
    ignore_source: Callable[[str], bool] = lambda k: False,
    strict: bool = True,
) -> tuple[dict[str, np.ndarray], Report]:
    """Rename and transform `source` with `rules`.

    direction: "to_foreign" (source keys are ctgen paths) or "to_ours" (source keys are foreign).
    expected_shapes: the target's keys and shapes; when given, missing keys and shape
      mismatches are reported. `ignore_source` marks source keys that are knowingly dropped.
    strict: raise `ConversionError` if the report is not clean.
    """
    if direction not in ("to_foreign", "to_ours"):
        raise ValueError(f"direction must be 'to_foreign' or 'to_ours', got {direction!r}")
    rules = list(rules)
    out: dict[str, np.ndarray] = {}
    report = Report()
    for key, value in source.items():
        for rule in rules:
            groups = rule.match_ours(key) if direction == "to_foreign" else rule.match_foreign(key)
            if groups is None:
                continue
            if direction == "to_foreign":
                target, hook = _fill(rule.foreign, groups), rule.to_foreign
            else:
                target, hook = _fill(rule.ours, groups), rule.to_ours
            if target in out:
                raise ValueError(f"two source keys map to {target!r} (second: {key!r})")
            out[target] = hook(np.asarray(value))
            report.converted += 1
            break
        else:
            if not ignore_source(key):
                report.unexpected.append(key)
    if expected_shapes is not None:
        compare_shapes({k: np.shape(v) for k, v in out.items()}, expected_shapes, report)
    if strict and not report.ok:
        raise ConversionError(report)
    return out, report


def compare_shapes(got: Mapping[str, tuple], expected: Mapping[str, tuple], report: Report | None = None) -> Report:
    """Add to `report` (or a new one) what `got` lacks, has extra, or has in another shape than `expected`."""
    report = report if report is not None else Report(converted=len(got))
    for key, shape in expected.items():
        if key not in got:
            report.missing.append(key)
        elif tuple(got[key]) != tuple(shape):
            report.mismatched.append((key, tuple(got[key]), tuple(shape)))
    report.unexpected.extend(key for key in got if key not in expected)
    return report
