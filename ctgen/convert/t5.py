"""Name maps for T5 v1.1 encoder weights: Hugging Face and T5X <-> ctgen (T5X-named NNX state).

ctgen's parameter paths are T5X's without the `target/` prefix, so the T5X map is a rename; the
Hugging Face map also transposes (torch `Linear.weight` is `(out, in)`, ctgen kernels `(in, out)`;
HF's relative attention bias is `(buckets, heads)`, T5X's `(heads, buckets)`).
Decoder and LM-head tensors of a full encoder-decoder checkpoint are knowingly dropped; any other
unknown, missing or mis-shaped tensor fails the conversion with a report naming it.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ctgen.convert.namemap import Rule, convert, transpose
from ctgen.errors import UserError

HF_RULES: tuple[Rule, ...] = (
    Rule("token_embedder/embedding", "shared.weight"),
    Rule("encoder/relpos_bias/rel_embedding",
         "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", transpose, transpose),
    Rule("encoder/layers_{i}/pre_attention_layer_norm/scale", "encoder.block.{i}.layer.0.layer_norm.weight"),
    Rule("encoder/layers_{i}/attention/query/kernel", "encoder.block.{i}.layer.0.SelfAttention.q.weight",
         transpose, transpose),
    Rule("encoder/layers_{i}/attention/key/kernel", "encoder.block.{i}.layer.0.SelfAttention.k.weight",
         transpose, transpose),
    Rule("encoder/layers_{i}/attention/value/kernel", "encoder.block.{i}.layer.0.SelfAttention.v.weight",
         transpose, transpose),
    Rule("encoder/layers_{i}/attention/out/kernel", "encoder.block.{i}.layer.0.SelfAttention.o.weight",
         transpose, transpose),
    Rule("encoder/layers_{i}/pre_mlp_layer_norm/scale", "encoder.block.{i}.layer.1.layer_norm.weight"),
    Rule("encoder/layers_{i}/mlp/wi_0/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",
         transpose, transpose),
    Rule("encoder/layers_{i}/mlp/wi_1/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",
         transpose, transpose),
    Rule("encoder/layers_{i}/mlp/wo/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
         transpose, transpose),
    Rule("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight"),
)

T5X_RULES: tuple[Rule, ...] = (
    Rule("token_embedder/embedding", "target/token_embedder/embedding"),
    Rule("encoder/relpos_bias/rel_embedding", "target/encoder/relpos_bias/rel_embedding"),
    Rule("encoder/layers_{i}/{norm}/scale", "target/encoder/layers_{i}/{norm}/scale"),
    Rule("encoder/layers_{i}/attention/{proj}/kernel", "target/encoder/layers_{i}/attention/{proj}/kernel"),
    Rule("encoder/layers_{i}/mlp/{proj}/kernel", "target/encoder/layers_{i}/mlp/{proj}/kernel"),
    Rule("encoder/encoder_norm/scale", "target/encoder/encoder_norm/scale"),
)

# HF encoder-decoder checkpoints also hold these; the encoder does not use them.
_HF_UNUSED = ("decoder.", "lm_head.")
# T5X checkpoints also hold the decoder, optimizer state and the step.
_T5X_UNUSED = ("target/decoder/", "state/", "flax_mutables/")


def _describe_fix(source: str) -> str:
    return (f"\n(source: {source}; the tensors above were expected by a ctgen T5 v1.1 encoder with the "
            "sizes read from its config. Is this a T5 v1.1 encoder checkpoint of that size?)")


def hf_to_ours(
    tensors: Mapping[str, Any], expected_shapes: Mapping[str, tuple], *, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """Convert a `T5EncoderModel` / `T5ForConditionalGeneration` state dict to ctgen paths.

    The encoder's token embedding is `encoder.embed_tokens.weight` when present (it is what the
    encoder uses), otherwise the tied `shared.weight`.
    """
    tensors = dict(tensors)
    if "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors.pop("encoder.embed_tokens.weight")
    return _run(tensors, HF_RULES, expected_shapes, lambda k: k.startswith(_HF_UNUSED), source)


def ours_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """ctgen paths -> `T5EncoderModel` state dict (`shared.weight` holds the embedding)."""
    out, _ = convert(params, HF_RULES, direction="to_foreign")
    return out


def t5x_to_ours(
    tensors: Mapping[str, Any], expected_shapes: Mapping[str, tuple], *, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """Convert a flat T5X state dict (`target/encoder/...`) to ctgen paths."""
    return _run(tensors, T5X_RULES, expected_shapes, lambda k: k.startswith(_T5X_UNUSED), source)


def _run(tensors, rules, expected_shapes, ignore, source):
    out, report = convert(tensors, rules, direction="to_ours", expected_shapes=expected_shapes,
                          ignore_source=ignore, strict=False)
    if not report.ok:
        raise UserError(f"cannot load T5 encoder weights from {source}:\n{report.describe()}"
                         + _describe_fix(source))
    return out
