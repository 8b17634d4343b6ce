"""Loading `configs/<stage>.py:<variant>` files and applying `--config.a.b=value` overrides.

A config file defines `get_config(arg)` returning an `ml_collections.ConfigDict`; `arg` is the
variant string after the colon, parsed with `parse_arg` (a variant name plus typed `key=value`
settings, e.g. `configs/ctvit.py:tiny,res=64,slices=17`). The loaded config is locked: an
override of a key that does not exist fails with the closest existing keys suggested, and a value
that does not parse as the field's type fails naming the field. `ml_collections` is imported when
a config is loaded, not with this module, so building the command line (`ctgen --help`) stays fast.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

from ctgen.errors import UserError

if TYPE_CHECKING:
    import ml_collections


class ConfigError(UserError):
    pass


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py[:arg]` -> the ConfigDict returned by its `get_config(arg)`."""
    import ml_collections

    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise ConfigError(f"--config {spec!r}: expected a Python file such as configs/ctvit.py:tiny")
    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
        if os.path.isfile(here):  # configs/ relative to the source checkout
            path = here
        else:
            raise ConfigError(f"--config {spec!r}: no such file {path!r}")
    name = "ctgen_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError as e:  # a bad variant string: say which --config it came from
        raise ConfigError(f"--config {spec!r}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict")
    config.lock()
    return config


def parse_arg(arg: str | None, *, variants: Sequence[str], **keywords: Any) -> ml_collections.ConfigDict:
    """Parse a config file's variant string: `NAME[,key=value,...]`, e.g. `tiny,res=64,slices=17`.

    variants: the known variant names; the first is the default and at most one may be named.
    keywords: the accepted keys and their defaults; a value is parsed as its default's type, and a
      boolean key may be given bare (`ema` means `ema=True`).
    Returns a ConfigDict with `variant` and every keyword. An unknown name or key, or a value of the
    wrong type, raises ConfigError (one line naming it and what is known), like `--config.*` overrides.
    """
    import ml_collections

    out = ml_collections.ConfigDict({"variant": variants[0], **keywords})
    named = []
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq and key in variants:
            named.append(key)
        elif not eq and isinstance(keywords.get(key), bool):
            out[key] = True
        elif eq and key in keywords:
            out[key] = _parse_value(raw.strip(), keywords[key], key)
        elif key in keywords:
            raise ConfigError(f"{key} needs a value, e.g. {key}={keywords[key]!r}")
        else:
            what = "key" if eq else "variant"
            known = f"known variants: {', '.join(variants)}"
            if keywords:
                known += f"; keys: {', '.join(f'{k}={v!r}' for k, v in keywords.items())}"
            raise ConfigError(f"unknown {what} {key!r} ({known})")
    if len(named) > 1:
        raise ConfigError(f"variants {', '.join(named)} exclude each other; name one of {', '.join(variants)}")
    if named:
        out.variant = named[0]
    return out


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    import ml_collections

    keys = []
    for k, v in config.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, full + "."))
    return keys


def _parse_value(raw: str, current: Any, label: str) -> Any:
    """`raw` parsed as the type of `current`; `label` names the setting in errors (`--config.a.b`)."""
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{label}={raw!r}: expected a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{label}={raw!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{label}={raw!r}: expected a number") from None
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None:
            return raw
        raise ConfigError(
            f"{label}={raw!r}: expected a Python literal like the current value {current!r}"
        ) from None
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and isinstance(value, str):
        value = (value,)
    return value


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    import ml_collections

    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = all_keys(config)
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--config.' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key --config.{key}{hint}")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} is a group of settings; override one of its fields")
    value = _parse_value(raw, current, f"--config.{key}")
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.{key}={raw!r}: {e}") from None


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Separate `--config.a.b=v` / `--config.a.b v` pairs from the other arguments."""
    overrides, rest = [], []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value")
                key, value = body, argv[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    config = load_config_file(spec)
    for key, value in overrides:
        apply_override(config, key, value)
    return config
