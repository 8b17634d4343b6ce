"""Finding and loading a text encoder: Hugging Face dir, T5X checkpoint, ctgen Orbax dir, or "builtin".

    load_text_encoder("builtin")                       # the tiny shipped demo/test encoder
    load_text_encoder("/models/t5-v1_1-base")          # config.json + model.safetensors + spiece.model
    load_text_encoder("/models/t5_1_1_base")           # T5X: checkpoint_<step>/checkpoint + zarr arrays
    load_text_encoder("/runs/t5_ctgen")                # ctgen weights dir (save_text_encoder) + spiece.model

Hugging Face and T5X weights end in a flat `{ctgen path: array}` checked against the model's
expected names and shapes (missing, unexpected and mis-shaped tensors are all reported together);
a ctgen directory is restored by `ctgen.weights` (names and shapes checked against what it stores).
Every path can place the weights straight onto a mesh.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
from flax import nnx

from ctgen.convert import t5 as t5_maps
from ctgen.errors import UserError
from ctgen.text import hf_files, t5x_format
from ctgen.text.config import T5Config
from ctgen.text.t5 import T5Encoder, abstract_encoder
from ctgen.text.tokenizer import T5Tokenizer
from ctgen.weights import (WEIGHTS_MARKER, abstract_model, flatten_state, load_model, place, save_weights,
                           unflatten_state, weights_info)

BUILTIN = "builtin"
MODEL = "t5_encoder"  # the `model` a ctgen weights directory records for a text encoder
_LAYER = re.compile(r"target/encoder/layers_(\d+)/")


def builtin_dir() -> str:
    """Directory of the shipped tiny encoder (a Hugging Face-format model dir)."""
    import ctgen

    return os.path.join(os.path.dirname(os.path.abspath(ctgen.__file__)), "assets", "text", "builtin_t5")


def detect_format(path: str) -> tuple[str, str]:
    """`(kind, directory)` with kind one of "hf", "t5x", "ctgen"; errors say what was expected."""
    if path == BUILTIN:
        return "hf", builtin_dir()
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise UserError(f"text encoder {path!r} does not exist; give 'builtin' or a directory holding a "
                                "Hugging Face T5 model, a T5X checkpoint or a ctgen text encoder")
    if os.path.isdir(path) and weights_info(path) is not None:
        return "ctgen", path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    if t5x_format.find_t5x_checkpoint(path):
        return "t5x", path if os.path.isdir(path) else os.path.dirname(path)
    listing = sorted(os.listdir(path))[:20] if os.path.isdir(path) else [os.path.basename(path)]
    raise UserError(
        f"{path} is not a text encoder: expected a Hugging Face model dir (config.json + model.safetensors or "
        f"pytorch_model.bin + spiece.model), a T5X checkpoint (checkpoint_<step>/checkpoint), or a ctgen "
        f"text encoder weights dir ({WEIGHTS_MARKER} + weights/, written by save_text_encoder); found {listing}")


def _expected_shapes(cfg: T5Config) -> dict[str, tuple]:
    state = nnx.state(abstract_encoder(cfg), nnx.Param)
    return {k: tuple(v.shape) for k, v in flatten_state(nnx.to_pure_dict(state)).items()}


def _t5x_config(flat: Mapping[str, Any], source: str) -> T5Config:
    """Infer the encoder's sizes from a T5X checkpoint's shapes (T5X dirs carry no config file)."""
    need = {
        "embedding": "target/token_embedder/embedding",
        "relpos": "target/encoder/relpos_bias/rel_embedding",
        "query": "target/encoder/layers_0/attention/query/kernel",
        "wi_0": "target/encoder/layers_0/mlp/wi_0/kernel",
    }
    missing = [v for v in need.values() if v not in flat]
    if missing:
        raise UserError(f"{source}: not a T5 v1.1 (gated-GELU) encoder checkpoint; missing {missing}")
    shape = {k: t5x_format.shape_of(flat[v]) for k, v in need.items()}
    vocab, d_model = shape["embedding"]
    heads, buckets = shape["relpos"]
    layers = 1 + max(int(m.group(1)) for k in flat if (m := _LAYER.match(k)))
    if shape["query"][1] % heads:
        raise UserError(f"{source}: query width {shape['query'][1]} is not a multiple of {heads} heads")
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=shape["query"][1] // heads, d_ff=shape["wi_0"][1],
                    num_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets)


def _read_ctgen_meta(directory: str) -> T5Config:
    info = weights_info(directory)
    try:
        if info["model"] != MODEL:
            raise UserError(f"it holds weights of model {info['model']!r}, not a text encoder")
        return T5Config.from_dict(info["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{os.path.join(directory, WEIGHTS_MARKER)} does not describe a ctgen text encoder: "
                        f"{e}") from None


def load_text_config(path: str) -> T5Config:
    """The encoder's `T5Config` without reading its weights (e.g. to size a cross-attention)."""
    kind, directory = detect_format(path)
    if kind == "hf":
        return T5Config.from_hf_json(os.path.join(directory, "config.json"))
    if kind == "ctgen":
        return _read_ctgen_meta(directory)
    msgpack = t5x_format.find_t5x_checkpoint(directory)
    return _t5x_config(t5x_format.read_t5x_checkpoint(msgpack), msgpack)


def _build(cfg: T5Config):
    return lambda rngs: T5Encoder(cfg, rngs=rngs)


def model_from_params(cfg: T5Config, flat: Mapping[str, Any], *, mesh=None, rules=None) -> T5Encoder:
    """Build the encoder from a flat `{ctgen path: array}` dict (no random init), optionally sharded."""
    graphdef, abstract = abstract_model(_build(cfg), mesh=mesh, rules=rules)
    return nnx.merge(graphdef, place(abstract, unflatten_state(flat)))


def load_text_encoder(
    path: str = BUILTIN, *, dtype: str | None = None, mesh=None, rules=None,
) -> tuple[T5Encoder, T5Tokenizer, T5Config]:
    """Load `(model, tokenizer, config)` from "builtin" or a HF / T5X / ctgen directory.

    dtype: compute dtype override ("float32", "bfloat16", "float16").
    mesh, rules: place the parameters sharded by their logical axes (default rules if None).
    The tokenizer is `spiece.model` in the directory (for T5X also up to the model directory
    above `checkpoint_<step>/`).
    """
    kind, directory = detect_format(path)
    also, t5x_flat = (), None
    if kind == "t5x":  # read once: the sizes come from the same tensors as the weights
        msgpack = t5x_format.find_t5x_checkpoint(directory)
        t5x_flat = t5x_format.read_t5x_checkpoint(msgpack)
        cfg = _t5x_config(t5x_flat, msgpack)
        # the vocabulary usually sits in the model dir, above checkpoint_<step>[/state]
        here = os.path.dirname(os.path.abspath(msgpack))
        also = (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here)))
    else:
        cfg = load_text_config(directory)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    tokenizer = T5Tokenizer.from_dir(directory, also=also)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{tokenizer.source} has {tokenizer.vocab_size} pieces but the encoder in {directory} "
                         f"embeds only {cfg.vocab_size} ids: tokenizer and weights do not belong together")
    if kind == "ctgen":  # checked by name and shape, restored straight onto the mesh
        return load_model(directory, _build(cfg), mesh=mesh, rules=rules), tokenizer, cfg
    expected = _expected_shapes(cfg)
    if kind == "hf":
        tensors, source = hf_files.read_hf_weights(directory)
        flat = t5_maps.hf_to_ours(tensors, expected, source=source)
    else:
        flat = t5_maps.t5x_to_ours(t5x_flat, expected, source=msgpack)
    return model_from_params(cfg, flat, mesh=mesh, rules=rules), tokenizer, cfg


def save_text_encoder(model: T5Encoder, tokenizer: T5Tokenizer, out_dir: str) -> str:
    """Write ctgen's own format: a ctgen weights directory (`ctgen.weights.save_weights`, recording
    the T5 config) plus `spiece.model`. Loading restores straight onto a mesh."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if weights_info(out_dir) is not None or os.path.exists(os.path.join(out_dir, "weights")):
        raise FileExistsError(f"{out_dir} already holds weights; choose a new directory")
    os.makedirs(out_dir, exist_ok=True)
    save_weights(out_dir, nnx.to_pure_dict(nnx.state(model, nnx.Param)), model=MODEL,
                 model_config=model.config.to_dict())
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "spiece.model"), "wb") as f:
            f.write(tokenizer.serialized_model())
    return out_dir


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    """How a config names its text encoder: `path` is "builtin" or a HF / T5X / ctgen directory.

    In an ml_collections config: `config.text_encoder = "builtin"` or
    `config.text_encoder = dict(path="/models/t5-v1_1-base", max_length=256, dtype="float32")`.
    """

    path: str = BUILTIN
    max_length: int = 256
    dtype: str = "float32"

    @classmethod
    def parse(cls, value: "str | Mapping[str, Any] | TextEncoderSpec") -> "TextEncoderSpec":
        if isinstance(value, TextEncoderSpec):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(path=os.fspath(value))
        if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
            value = value.to_dict()
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise UserError(f"unknown text encoder fields {unknown}; known: path, max_length, dtype")
            return cls(**value)
        raise TypeError(f"a text encoder is named by a path string or a mapping, got {type(value).__name__}")

    def config(self) -> T5Config:
        return load_text_config(self.path).replace(dtype=self.dtype)

    def load(self, *, mesh=None, rules=None) -> tuple[T5Encoder, T5Tokenizer, T5Config]:
        return load_text_encoder(self.path, dtype=self.dtype, mesh=mesh, rules=rules)
