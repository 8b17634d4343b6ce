"""One builder from a config section (ConfigDict, dict, or a JSON round trip) to a model's frozen dataclass.

Models take small frozen dataclasses, never the experiment ConfigDict. Every model config is
built here so they all accept the same inputs and fail the same way: nested dataclass fields are
built from nested sections, lists become tuples (JSON and ConfigDicts turn tuples into lists),
and an unknown field is one line naming the section, the field and the known fields.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

from ctgen.errors import UserError

T = TypeVar("T")


def _plain(values: Any) -> Any:
    return values.to_dict() if hasattr(values, "to_dict") else values


def _tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def build_dataclass(cls: type[T], values: Mapping[str, Any] | Any, *, where: str = "") -> T:
    """`cls(**values)` with nested dataclass fields built recursively and lists made tuples.

    where: the config path of `values` (e.g. "config.model"), used in error messages.
    Raises UserError for a field `cls` does not have, or a dataclass field given a non-mapping.
    """
    if isinstance(values, cls):
        return values
    values = _plain(values)
    label = where or cls.__name__
    if not isinstance(values, Mapping):
        raise UserError(f"{label}: expected a group of {cls.__name__} fields, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{label}: unknown {cls.__name__} field(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kind = hints.get(name)
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build_dataclass(kind, value, where=f"{label}.{name}")
        else:
            kwargs[name] = _tuples(_plain(value))
    return cls(**kwargs)
