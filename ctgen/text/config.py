"""`T5Config`: the sizes of a T5 v1.1 encoder, and how a run names its text encoder.

One frozen dataclass covers every size (small ... xxl, plus ctgen's built-in `tiny`). It is
read from a Hugging Face `config.json`, inferred from a T5X checkpoint's shapes, or stored in
ctgen's own format. Only the encoder matters here: GenerateCT conditions on the encoder's last
hidden state, so decoder sizes are not kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from ctgen.config_dataclass import build_dataclass
from ctgen.errors import UserError

# T5 v1.1 sizes (t5x `t5_1_1_*.gin`, Hugging Face `google/t5-v1_1-*` config.json).
_PRESETS: dict[str, dict[str, int]] = {
    "small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, d_kv=64),
    "base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, d_kv=64),
    "large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16, d_kv=64),
    "xl": dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64),
    "xxl": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64),
    # ctgen's shipped demo/test encoder (ctgen/assets/text/builtin_t5, see make_builtin.py).
    "tiny": dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=640),
}
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes and numerics of a T5 v1.1 encoder (gated-GELU, RMS norms, no biases).

    dtype: compute dtype of matmuls ("float32", "bfloat16", "float16"); norms and softmax
      always run in float32, parameters are kept in `param_dtype`, outputs are float32.
    """

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise UserError(f"T5Config.{name} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise UserError("T5Config.relative_attention_num_buckets must be even and >= 4, got "
                             f"{self.relative_attention_num_buckets}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise UserError(f"T5Config.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")

    @property
    def inner_dim(self) -> int:
        """Width of the joined attention heads (`num_heads * d_kv`)."""
        return self.num_heads * self.d_kv

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "T5Config":
        """`small` / `base` / `large` / `xl` / `xxl` (T5 v1.1) or `tiny` (ctgen's built-in)."""
        if name not in _PRESETS:
            raise UserError(f"unknown T5 preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "T5Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
        return build_dataclass(cls, d)

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike, **overrides: Any) -> "T5Config":
        """Read a Hugging Face T5 `config.json`; refuses non-T5 and non-v1.1 (non gated-GELU) models."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise UserError(f"{path} must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type != "t5":
            raise UserError(f"{path}: model_type is {model_type!r}, expected 't5' (a T5 v1.1 checkpoint "
                             "such as google/t5-v1_1-base)")
        ff = hf.get("feed_forward_proj", "relu")
        if ff not in ("gated-gelu",):
            raise UserError(f"{path}: feed_forward_proj is {ff!r}; ctgen implements T5 v1.1 encoders "
                             "(gated-gelu, e.g. google/t5-v1_1-base). The original T5 (relu) is not supported.")
        act = hf.get("dense_act_fn", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"{path}: dense_act_fn {act!r} is not the tanh-approximated GELU of T5 v1.1")
        missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k not in hf]
        if missing:
            raise UserError(f"{path}: missing T5 config fields {missing}")
        fields = dict(
            vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), d_kv=int(hf["d_kv"]),
            d_ff=int(hf["d_ff"]), num_layers=int(hf["num_layers"]), num_heads=int(hf["num_heads"]),
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        )
        return cls(**{**fields, **overrides})

    def to_hf_dict(self, architecture: str = "T5EncoderModel") -> dict[str, Any]:
        """A Hugging Face `config.json` body for this encoder (used to ship the built-in model)."""
        return {
            "architectures": [architecture], "model_type": "t5",
            "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.d_kv,
            "d_ff": self.d_ff, "num_layers": self.num_layers, "num_decoder_layers": self.num_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
            "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
            "tie_word_embeddings": False, "is_encoder_decoder": False, "use_cache": False,
        }
