"""MaskGIT <-> GenerateCT `MaskGITTransformer` state_dict: name map, export (.pt/.safetensors), import.

GenerateCT's `MaskGITTransformer` holds the frozen CT-ViT autoencoder (`ctvit.*`, 289 keys: its
`copy_for_eval()` drops the VGG16 and the discriminator) and the transformer (`maskgit.*`, 168 keys),
and its `load` is strict: an export carries both. On the ctgen side these are two weights: the
MaskGIT stage's model (`ctgen.models.maskgit.MaskGIT`, its state at the root) and the CT-ViT it
uses as its frozen tokenizer. The name map is built from the shared GenerateCT layer rules
(`ctgen.convert.generatect_layers`); the CT-ViT part is `ctgen.convert.ctvit`'s.

`generatect_manifest(cfg, ctvit_cfg)` lists every key of `MaskGITTransformer.state_dict()` in order
with shape and kind; for the paper configs it equals shared/reference/state_dicts/generatect_maskgit.txt
(457 keys). ctgen's optional spacing tokens have no GenerateCT counterpart: such a model cannot be
exported.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ctgen.convert import ctvit as cv
from ctgen.convert import generatect_layers as gl
from ctgen.convert.generatect_layers import Entry
from ctgen.convert.namemap import ConversionError, Report, Rule, convert
from ctgen.convert.torch_files import read_state_dict, write_state_dict
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViTConfig
from ctgen.models.maskgit import MaskGIT, MaskGITConfig
from ctgen.weights import abstract_model, flatten_state, place, to_pure, unflatten_state

PREFIX = "maskgit."


def maskgit_rules(theirs: str = PREFIX) -> list[Rule]:
    """ctgen `MaskGIT` paths <-> GenerateCT `MaskGit` keys (prefixed by `theirs`)."""
    return [
        Rule("token_emb", f"{theirs}token_emb.weight"),
        Rule("pos_emb", f"{theirs}pos_emb.weight"),
        *gl.continuous_position_bias("pos_bias", f"{theirs}continuous_pos_bias"),
        *gl.transformer("transformer", f"{theirs}transformer", cross=True),
        *gl.linear("to_logits", f"{theirs}to_logits"),
    ]


def maskgit_entries(cfg: MaskGITConfig, prefix: str = PREFIX) -> list[Entry]:
    """Every key of GenerateCT's `MaskGit.state_dict()` for `cfg`, in order."""
    d = cfg.dim
    return [
        Entry(f"{prefix}token_emb.weight", (cfg.num_tokens + 1, d), "param"),
        Entry(f"{prefix}pos_emb.weight", (cfg.max_seq_len, d), "param"),
        *gl.continuous_position_bias_entries(f"{prefix}continuous_pos_bias", cfg.dim_head, cfg.heads, num_dims=3),
        *gl.transformer_entries(f"{prefix}transformer", depth=cfg.depth, dim=d, heads=cfg.heads,
                                dim_head=cfg.dim_head, ff_mult=cfg.ff_mult, dim_context=cfg.dim_context,
                                cross_num_null_kv=cfg.cross_num_null_kv),
        *gl.linear_entries(f"{prefix}to_logits", cfg.num_tokens, d),
    ]


def generatect_manifest(cfg: MaskGITConfig, ctvit_cfg: CTViTConfig) -> list[Entry]:
    """Every key of `MaskGITTransformer(ctvit=..., maskgit=...).state_dict()`: `ctvit.*` then `maskgit.*`."""
    tokenizer = [dataclasses.replace(e, key=f"ctvit.{e.key}") for e in cv.generatect_manifest(ctvit_cfg)]
    return tokenizer + maskgit_entries(cfg)


def _check_exportable(cfg: MaskGITConfig) -> None:
    if cfg.spacing_tokens:
        raise UserError(f"this MaskGIT has {cfg.spacing_tokens} spacing tokens, which GenerateCT's MaskGit does not "
                        "have; only models trained with model.spacing_tokens=0 can be exported")


def _flat(model_or_state: Any) -> dict[str, np.ndarray]:
    tree = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    flat = flatten_state(to_pure(tree))
    return {k: v if isinstance(v, np.ndarray) else np.asarray(jax.device_get(v)) for k, v in flat.items()}


def to_generatect(maskgit: Any, cfg: MaskGITConfig, ctvit: Any,
                  ctvit_cfg: CTViTConfig) -> "OrderedDict[str, np.ndarray]":
    """GenerateCT `MaskGITTransformer` state_dict (numpy float32, manifest order) of a ctgen MaskGIT
    (module or state) and its tokenizer (a CTViT module or state)."""
    _check_exportable(cfg)
    entries = maskgit_entries(cfg)
    expected = {e.key: e.shape for e in entries if e.constant is None}
    converted, _ = convert(_flat(maskgit), maskgit_rules(), direction="to_foreign", expected_shapes=expected)
    out: OrderedDict[str, np.ndarray] = OrderedDict(
        (f"ctvit.{k}", v) for k, v in cv.to_generatect(ctvit, ctvit_cfg).items())
    for e in entries:
        value = np.full(e.shape, e.constant, np.float32) if e.constant is not None else converted[e.key]
        out[e.key] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def export_maskgit(maskgit: Any, cfg: MaskGITConfig, ctvit: Any, ctvit_cfg: CTViTConfig, path: str) -> int:
    """Write `to_generatect(...)` to `path` (.pt or .safetensors); returns the key count (457 at paper size)."""
    sd = to_generatect(maskgit, cfg, ctvit, ctvit_cfg)
    write_state_dict(sd, path)
    return len(sd)


# --- import --------------------------------------------------------------------------------------
def select_maskgit_keys(sd: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """The `maskgit.*` block of a `MaskGITTransformer` state_dict (prefix removed), or a bare
    `MaskGit` state_dict as is."""
    if f"{PREFIX}to_logits.weight" in sd:
        return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    if "to_logits.weight" in sd and "token_emb.weight" in sd:
        return dict(sd)
    raise UserError(f"{source}: no MaskGIT weights found (neither `maskgit.to_logits.weight` nor `to_logits.weight`; "
                    f"first keys: {list(sd)[:5]})")


def infer_config(sd: Mapping[str, Any], **overrides: Any) -> MaskGITConfig:
    """The architecture of a (prefix-free) `MaskGit` state_dict from its shapes."""
    try:
        vocab, dim = sd["token_emb.weight"].shape
        max_seq_len = sd["pos_emb.weight"].shape[0]
        dh = sd["transformer.layers.0.1.q_scale"].shape[0]
        heads = sd["transformer.layers.0.1.to_q.weight"].shape[0] // dh
        dim_context = sd["transformer.layers.0.2.to_kv.weight"].shape[1]
        null = sd["transformer.layers.0.2.null_kv"].shape[1] // 2
        ff_inner = sd["transformer.layers.0.3.4.weight"].shape[1]
        cpb_dim = sd["continuous_pos_bias.net.0.0.weight"].shape[0]
    except KeyError as err:
        raise UserError(f"not a GenerateCT MaskGit state_dict: missing {err}") from err
    if cpb_dim != dh:
        raise UserError(f"position-bias MLP width {cpb_dim} differs from the head width {dh}; GenerateCT's MaskGit "
                        "ties them")
    depth = len({k.split(".")[2] for k in sd if k.startswith("transformer.layers.")})
    ff_mult = 4.0 if int(4.0 * 2 / 3 * dim) == ff_inner else ff_inner / (2 / 3 * dim)
    cfg = MaskGITConfig(num_tokens=vocab - 1, max_seq_len=max_seq_len, dim=dim, dim_context=dim_context, depth=depth,
                        heads=heads, dim_head=dh, ff_mult=ff_mult, cross_num_null_kv=null)
    return dataclasses.replace(cfg, **overrides)


@dataclasses.dataclass
class ImportResult:
    config: MaskGITConfig
    state: nnx.State  # the MaskGIT's parameters
    report: Report
    notes: list[str]
    tokenizer: cv.ImportResult | None  # the `ctvit.*` block, if the file had one
    graphdef: nnx.GraphDef = dataclasses.field(repr=False, compare=False)

    def model(self) -> MaskGIT:
        return nnx.merge(self.graphdef, self.state)


def from_generatect(sd: Mapping[str, Any], cfg: MaskGITConfig | None = None, *, source: str = "state_dict",
                    tokenizer: bool = True, mesh: Mesh | None = None, rules=None, **overrides: Any) -> ImportResult:
    """ctgen states from a GenerateCT `MaskGITTransformer` state_dict (or a bare `MaskGit` one).

    cfg: the architecture (inferred from the shapes when None; `overrides` replace inferred fields,
      e.g. `attention`). tokenizer: also import the `ctvit.*` block (the frozen CT-ViT) when present.
    mesh, rules: place the weights sharded by their logical axes.
    """
    msd = select_maskgit_keys(sd, source)
    cfg = cfg or infer_config(msd, **overrides)
    _check_exportable(cfg)  # a GenerateCT file never has spacing tokens
    entries = maskgit_entries(cfg, prefix="")
    notes = gl.check_constants(msd, entries, source)
    constants = {e.key for e in entries if e.constant is not None}
    graphdef, abstract = abstract_model(lambda r: MaskGIT(cfg, rngs=r), mesh=mesh, rules=rules)
    expected = {k: tuple(v.shape) for k, v in flatten_state(to_pure(abstract)).items()}
    try:
        flat, report = convert(msd, maskgit_rules(""), direction="to_ours", expected_shapes=expected,
                               ignore_source=lambda k: k in constants)
    except ConversionError as err:
        raise UserError(f"{source} does not match a MaskGIT with {cfg}:\n{err}") from err
    missing = sorted(constants - set(msd))
    if missing:
        raise UserError(f"{source}: GenerateCT's strict loading needs these keys too:\n" + "\n".join(missing))
    state = place(abstract, unflatten_state(flat))
    ctvit = None
    if tokenizer and any(k.startswith("ctvit.") for k in sd):
        ctvit = cv.from_generatect(sd, source=source, loss_networks=False, mesh=mesh, rules=rules)
    return ImportResult(cfg, state, report, notes, ctvit, graphdef)


def import_generatect_maskgit(path: str, cfg: MaskGITConfig | None = None, *, tokenizer: bool = True,
                              mesh: Mesh | None = None, rules=None, **overrides: Any) -> ImportResult:
    """Import `transformer_pretrained.pt` (or a ctgen export) from `.pt` (weights_only) or `.safetensors`."""
    return from_generatect(read_state_dict(path), cfg, source=path, tokenizer=tokenizer, mesh=mesh, rules=rules,
                           **overrides)
