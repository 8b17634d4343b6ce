"""Text conditioning: T5 v1.1 encoder (native Flax NNX), tokenizer, weight loading, prompts, embedding cache.

    model, tokenizer, cfg = load_text_encoder("builtin")        # or a HF / T5X / ctgen directory
    emb_BxLxD, mask_BxL = encode_text(model, tokenizer, ["64 years old male: Emphysema."])
"""
from ctgen.text.config import T5Config
from ctgen.text.encode import encode_ids, encode_text, place_on_mesh
from ctgen.text.load import (
    BUILTIN,
    TextEncoderSpec,
    builtin_dir,
    load_text_config,
    load_text_encoder,
    save_text_encoder,
)
from ctgen.text.prompt import FINDINGS_TEMPLATE, PAPER_TEMPLATE, build_prompt
from ctgen.text.t5 import T5Encoder
from ctgen.text.tokenizer import T5Tokenizer

__all__ = [
    "BUILTIN", "FINDINGS_TEMPLATE", "PAPER_TEMPLATE", "T5Config", "T5Encoder", "T5Tokenizer", "TextEncoderSpec",
    "build_prompt", "builtin_dir", "encode_ids", "encode_text", "load_text_config", "load_text_encoder",
    "place_on_mesh", "save_text_encoder",
]
