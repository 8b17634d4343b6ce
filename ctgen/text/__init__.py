"""Text conditioning: T5 v1.1 encoder (native Flax NNX), tokenizer, weight loading, prompts.

    model, tokenizer, cfg = load_text_encoder("builtin")        # or a HF / T5X / ctgen directory
    emb_BxLxD, mask_BxL = encode_text(model, tokenizer, ["64 years old male: Emphysema."])

The names below are loaded from their submodule on first use, so importing a light part
(`ctgen.text.prompt`, used by data preparation and the CLI) does not import JAX.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "T5Config": "ctgen.text.config",
    "encode_ids": "ctgen.text.encode",
    "encode_text": "ctgen.text.encode",
    "place_on_mesh": "ctgen.text.encode",
    "BUILTIN": "ctgen.text.load",
    "TextEncoderSpec": "ctgen.text.load",
    "builtin_dir": "ctgen.text.load",
    "load_text_config": "ctgen.text.load",
    "load_text_encoder": "ctgen.text.load",
    "save_text_encoder": "ctgen.text.load",
    "FINDINGS_TEMPLATE": "ctgen.text.prompt",
    "PAPER_TEMPLATE": "ctgen.text.prompt",
    "build_prompt": "ctgen.text.prompt",
    "T5Encoder": "ctgen.text.t5",
    "T5Tokenizer": "ctgen.text.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
