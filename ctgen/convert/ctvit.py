"""CT-ViT <-> GenerateCT `CTViT` state_dict: declarative name map, export (.pt/.safetensors), import.

The map is a list of `namemap.Rule`s (ctgen path <-> GenerateCT key, with layout hooks):
Dense kernels are transposed torch Linear weights; 2-D conv kernels are (k, k, in, out) vs torch's
(out, in, k, k); PEG kernels are (3, 3, 3, D) vs (D, 1, 3, 3, 3); the codebook buffers lose their
leading codebook axis of 1. Keys that hold constants in GenerateCT are not ctgen state: the zero
`beta` buffers of its gamma-only LayerNorms, self-attention's unused `context_norm` (gamma 1,
beta 0) and zero-size `null_kv`. Export writes them; import checks them.

`generatect_manifest(cfg)` lists every key GenerateCT's `CTViT` has for a config, in its
`state_dict()` order, with shape and kind (param/buffer); for the paper config it equals
shared/reference/state_dicts/generatect_ctvit.txt (379 keys).
"""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctgen.convert.namemap import ConversionError, Report, Rule, convert, flatten_state, unflatten_state
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.discriminator import DiscriminatorConfig
from ctgen.models.vgg import VGG16, VGG16_STAGES, VGGConfig

TRANSFORMERS = ("enc_spatial", "enc_temporal", "dec_spatial", "dec_temporal")
VGG_FEATURE_INDEX = tuple(i for stage in VGG16_STAGES for i in stage)


# --- layout hooks (views; writers make arrays contiguous) ---------------------------------------
def _t(x):
    return np.asarray(x).T


def _conv_to_torch(x):  # (k, k, in, out) -> (out, in, k, k)
    return np.asarray(x).transpose(3, 2, 0, 1)


def _conv_to_ours(x):
    return np.asarray(x).transpose(2, 3, 1, 0)


def _peg_to_torch(x):  # (3, 3, 3, D) -> (D, 1, 3, 3, 3)
    return np.asarray(x).transpose(3, 0, 1, 2)[:, None]


def _peg_to_ours(x):
    return np.asarray(x)[:, 0].transpose(1, 2, 3, 0)


def _add_axis(x):
    return np.asarray(x)[None]


def _drop_axis(x):
    x = np.asarray(x)
    if x.shape[0] != 1:
        raise ValueError(f"expected a leading codebook axis of size 1 (one codebook), got shape {x.shape}")
    return x[0]


def _linear(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{ours}/kernel", f"{theirs}.weight", _t, _t)]
    if bias:
        rules.append(Rule(f"{ours}/bias", f"{theirs}.bias"))
    return rules


def _conv(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/kernel", f"{theirs}.weight", _conv_to_torch, _conv_to_ours),
            Rule(f"{ours}/bias", f"{theirs}.bias")]


def _layer_norm(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")]


def _attention(ours: str, theirs: str) -> list[Rule]:
    return [
        Rule(f"{ours}/q_scale", f"{theirs}.q_scale"),
        Rule(f"{ours}/k_scale", f"{theirs}.k_scale"),
        Rule(f"{ours}/norm/scale", f"{theirs}.norm.gamma"),
        *_linear(f"{ours}/to_q", f"{theirs}.to_q", bias=False),
        *_linear(f"{ours}/to_kv", f"{theirs}.to_kv", bias=False),
        *_linear(f"{ours}/to_out", f"{theirs}.to_out", bias=False),
    ]


def ctvit_rules(cfg: CTViTConfig) -> list[Rule]:
    """Name map for a CT-ViT config (placeholders carry layer indices across)."""
    layers = "{tr}/layers/{i}"
    theirs = "{tr}_transformer.layers.{i}"
    rules = [
        *_linear("pos_bias/hidden/{n}", "spatial_rel_pos_bias.net.{n}.0"),
        *_linear("pos_bias/to_heads", "spatial_rel_pos_bias.net.2"),
        *_layer_norm("first_embed/norm_in", "to_patch_emb_first_frame.1"),
        *_linear("first_embed/proj", "to_patch_emb_first_frame.2"),
        *_layer_norm("first_embed/norm_out", "to_patch_emb_first_frame.3"),
        *_layer_norm("rest_embed/norm_in", "to_patch_emb.1"),
        *_linear("rest_embed/proj", "to_patch_emb.2"),
        *_layer_norm("rest_embed/norm_out", "to_patch_emb.3"),
        Rule(f"{layers}/peg/kernel", f"{theirs}.0.dsconv.weight", _peg_to_torch, _peg_to_ours),
        Rule(f"{layers}/peg/bias", f"{theirs}.0.dsconv.bias"),
        *_attention(f"{layers}/attn", f"{theirs}.1"),
        *_layer_norm(f"{layers}/ff/norm", f"{theirs}.3.0"),
        *_linear(f"{layers}/ff/w_in", f"{theirs}.3.1", bias=False),
        *_linear(f"{layers}/ff/w_out", f"{theirs}.3.4", bias=False),
        Rule("{tr}/norm_out/scale", "{tr}_transformer.norm_out.gamma"),
        Rule("vq/initted", "vq._codebook.initted"),
        Rule("vq/cluster_size", "vq._codebook.cluster_size", _add_axis, _drop_axis),
        Rule("vq/embed", "vq._codebook.embed", _add_axis, _drop_axis),
        *_linear("first_to_pixels", "to_pixels_first_frame.0"),
        *_linear("rest_to_pixels", "to_pixels.0"),
    ]
    if cfg.use_vgg_and_gan:
        for j, idx in enumerate(VGG_FEATURE_INDEX[: _num_vgg_convs(cfg.vgg)]):
            rules += _conv(f"vgg/convs/{j}", f"vgg.features.{idx}")
        rules += _linear("vgg/fc6", "vgg.classifier.0") + _linear("vgg/fc7", "vgg.classifier.3")
        rules += [*_conv("discr/blocks/{b}/conv_res", "discr.blocks.{b}.conv_res"),
                  *_conv("discr/blocks/{b}/conv1", "discr.blocks.{b}.net.0"),
                  *_conv("discr/blocks/{b}/conv2", "discr.blocks.{b}.net.2"),
                  *_conv("discr/blocks/{b}/downsample", "discr.blocks.{b}.downsample.1")]
        for j, idx in enumerate(cfg.discr.attn_block_indices):
            rules += _attention(f"discr/attn/{j}", f"discr.attn_blocks.{idx}")
        rules += _conv("discr/to_logits_conv", "discr.to_logits.0") + _linear("discr/to_logits", "discr.to_logits.3")
    # Transformer names: ctgen `enc_spatial` <-> GenerateCT `enc_spatial_transformer`.
    return [r for r in rules if not r.ours.startswith("{tr}")] + [
        Rule(r.ours.replace("{tr}", tr), r.foreign.replace("{tr}", tr), r.to_foreign, r.to_ours)
        for r in rules if r.ours.startswith("{tr}") for tr in TRANSFORMERS]


def _num_vgg_convs(vgg: VGGConfig) -> int:
    return sum(len(s) for s in VGG16_STAGES[: len(vgg.widths)])


# --- the GenerateCT manifest ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    kind: str  # "param" | "buffer"
    constant: float | None = None  # value of keys that are constants (not ctgen state)


def _attention_entries(prefix: str, dim: int, heads: int, dim_head: int) -> list[Entry]:
    inner = heads * dim_head
    return [
        Entry(f"{prefix}.null_kv", (heads, 0, dim_head), "param", 0.0),
        Entry(f"{prefix}.q_scale", (dim_head,), "param"),
        Entry(f"{prefix}.k_scale", (dim_head,), "param"),
        Entry(f"{prefix}.norm.gamma", (dim,), "param"),
        Entry(f"{prefix}.norm.beta", (dim,), "buffer", 0.0),
        Entry(f"{prefix}.context_norm.gamma", (dim,), "param", 1.0),
        Entry(f"{prefix}.context_norm.beta", (dim,), "buffer", 0.0),
        Entry(f"{prefix}.to_q.weight", (inner, dim), "param"),
        Entry(f"{prefix}.to_kv.weight", (2 * inner, dim), "param"),
        Entry(f"{prefix}.to_out.weight", (dim, inner), "param"),
    ]


def _w(prefix: str, out: int, inp: int, bias: bool = True) -> list[Entry]:
    e = [Entry(f"{prefix}.weight", (out, inp), "param")]
    return e + ([Entry(f"{prefix}.bias", (out,), "param")] if bias else [])


def _c(prefix: str, out: int, inp: int, k: int) -> list[Entry]:
    return [Entry(f"{prefix}.weight", (out, inp, k, k), "param"), Entry(f"{prefix}.bias", (out,), "param")]


def generatect_manifest(cfg: CTViTConfig) -> list[Entry]:
    """Every key of GenerateCT's `CTViT.state_dict()` for `cfg`, in order."""
    d, p, pt, h, dh = cfg.dim, cfg.patch_size, cfg.temporal_patch_size, cfg.heads, cfg.dim_head
    inner_ff = int(cfg.ff_mult * (2 / 3) * d)
    e = [*_w("spatial_rel_pos_bias.net.0.0", d, 2), *_w("spatial_rel_pos_bias.net.1.0", d, d),
         *_w("spatial_rel_pos_bias.net.2", h, d)]
    for name, n in (("to_patch_emb_first_frame", p * p), ("to_patch_emb", pt * p * p)):
        e += [Entry(f"{name}.1.weight", (n,), "param"), Entry(f"{name}.1.bias", (n,), "param"),
              *_w(f"{name}.2", d, n), Entry(f"{name}.3.weight", (d,), "param"), Entry(f"{name}.3.bias", (d,), "param")]

    def transformer(tr, depth):
        out = []
        for i in range(depth):
            pre = f"{tr}_transformer.layers.{i}"
            out += [Entry(f"{pre}.0.dsconv.weight", (d, 1, 3, 3, 3), "param"),
                    Entry(f"{pre}.0.dsconv.bias", (d,), "param")]
            out += _attention_entries(f"{pre}.1", d, h, dh)
            out += [Entry(f"{pre}.3.0.weight", (d,), "param"), Entry(f"{pre}.3.0.bias", (d,), "param"),
                    *_w(f"{pre}.3.1", 2 * inner_ff, d, bias=False), *_w(f"{pre}.3.4", d, inner_ff, bias=False)]
        return out + [Entry(f"{tr}_transformer.norm_out.gamma", (d,), "param"),
                      Entry(f"{tr}_transformer.norm_out.beta", (d,), "buffer", 0.0)]

    e += transformer("enc_spatial", cfg.spatial_depth) + transformer("enc_temporal", cfg.temporal_depth)
    e += [Entry("vq._codebook.initted", (1,), "buffer"),
          Entry("vq._codebook.cluster_size", (1, cfg.codebook_size), "buffer"),
          Entry("vq._codebook.embed", (1, cfg.codebook_size, d), "buffer")]
    e += transformer("dec_spatial", cfg.spatial_depth) + transformer("dec_temporal", cfg.temporal_depth)
    e += [*_w("to_pixels_first_frame.0", p * p, d), *_w("to_pixels.0", pt * p * p, d)]
    if cfg.use_vgg_and_gan:
        c_in, j = cfg.vgg.in_channels, 0
        for width, stage in zip(cfg.vgg.widths, VGG16_STAGES):
            for idx in stage:
                e += _c(f"vgg.features.{idx}", width, c_in, 3)
                c_in = width
        e += _w("vgg.classifier.0", cfg.vgg.fc_dim, c_in * cfg.vgg.pool_size ** 2)
        e += _w("vgg.classifier.3", cfg.vgg.fc_dim, cfg.vgg.fc_dim)
        dc = cfg.discr
        dims = dc.layer_dims
        for b in range(len(dims) - 1):
            ci, co = dims[b], dims[b + 1]
            e += _c(f"discr.blocks.{b}.conv_res", co, ci, 1) + _c(f"discr.blocks.{b}.net.0", co, ci, 3)
            e += _c(f"discr.blocks.{b}.net.2", co, co, 3)
            if b != len(dims) - 2:
                e += _c(f"discr.blocks.{b}.downsample.1", co, 4 * co, 1)
        for idx in dc.attn_block_indices:
            e += _attention_entries(f"discr.attn_blocks.{idx}", dims[idx + 1], dc.attn_heads, dc.attn_dim_head)
        fmap = dc.image_size // 2 ** dc.num_layers
        e += _c("discr.to_logits.0", dims[-1], dims[-1], 3) + _w("discr.to_logits.3", 1, fmap * fmap * dims[-1])
    return e


# --- export --------------------------------------------------------------------------------------
def _ours_flat(model_or_state: Any) -> dict[str, np.ndarray]:
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    if isinstance(state, nnx.State):
        state = state.to_pure_dict()
    is_flat = all(isinstance(k, str) and not isinstance(v, Mapping) for k, v in state.items())
    flat = state if is_flat else flatten_state(state)
    return {k: v if isinstance(v, np.ndarray) else np.asarray(jax.device_get(v)) for k, v in flat.items()}


def to_generatect(model_or_state: Any, cfg: CTViTConfig, *, materialize: bool = True) -> "OrderedDict[str, np.ndarray]":
    """GenerateCT `CTViT` state_dict (numpy float32, manifest order) of a ctgen CT-ViT.

    `model_or_state`: a CTViT, its nnx.State, or a flat {ctgen path: array} dict.
    materialize=False keeps layout changes as numpy views (for shape checks of huge models).
    """
    manifest = generatect_manifest(cfg)
    expected = {e.key: e.shape for e in manifest if e.constant is None}
    converted, _ = convert(_ours_flat(model_or_state), ctvit_rules(cfg), direction="to_foreign",
                           expected_shapes=expected)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for e in manifest:
        value = np.full(e.shape, e.constant, np.float32) if e.constant is not None else converted[e.key]
        out[e.key] = np.ascontiguousarray(value, dtype=np.float32) if materialize else value
    return out


def _require_torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise UserError("writing/reading .pt files needs PyTorch: pip install 'ctgen[torch]'") from err
    return torch


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Write a state_dict as `.pt` (torch.save of a plain dict of tensors) or `.safetensors`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
    elif path.endswith((".pt", ".pth", ".bin")):
        torch = _require_torch()
        torch.save(OrderedDict((k, torch.from_numpy(np.require(v, None, ["C_CONTIGUOUS", "WRITEABLE"])))
                               for k, v in state_dict.items()), path)
    else:
        raise UserError(f"{path}: unknown output format; use a .pt or .safetensors file name")


def export_ctvit(model_or_state: Any, path: str, cfg: CTViTConfig | None = None) -> int:
    """Export a ctgen CT-ViT (module or state) to GenerateCT's format; returns the key count."""
    if cfg is None:
        if not isinstance(model_or_state, CTViT):
            raise ValueError("export_ctvit needs `cfg` when given a state rather than a CTViT module")
        cfg = model_or_state.cfg
    sd = to_generatect(model_or_state, cfg)
    save_state_dict(sd, path)
    return len(sd)


# --- import --------------------------------------------------------------------------------------
def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a `.pt` (weights_only, never unpickling objects) or `.safetensors` file."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    torch = _require_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: not a loadable PyTorch state_dict ({type(err).__name__}: {err})") from err
    if not isinstance(obj, Mapping) or not all(hasattr(v, "numpy") for v in obj.values()):
        kinds = sorted({type(v).__name__ for v in obj.values()}) if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{path}: expected a flat state_dict of tensors, found {kinds}")
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in obj.items()}


def select_ctvit_keys(sd: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The CT-ViT part of a state_dict: as is, or the `ctvit.*` block of `transformer_pretrained.pt`."""
    if "vq._codebook.embed" in sd:
        return dict(sd)
    if "ctvit.vq._codebook.embed" in sd:
        return {k[len("ctvit."):]: v for k, v in sd.items() if k.startswith("ctvit.")}
    raise UserError(f"{source}: no CT-ViT weights found (neither `vq._codebook.embed` nor "
                    f"`ctvit.vq._codebook.embed`; first keys: {list(sd)[:5]})")


def infer_config(sd: Mapping[str, np.ndarray], image_size: int | None = None, **overrides: Any) -> CTViTConfig:
    """Architecture from state_dict shapes. The image size follows from the discriminator's depth
    when it is present; otherwise it is `image_size` (default 128, GenerateCT's)."""
    try:
        d = sd["to_patch_emb.2.weight"].shape[0]
        p = int(round(np.sqrt(sd["to_patch_emb_first_frame.1.weight"].shape[0])))
        pt = sd["to_patch_emb.1.weight"].shape[0] // (p * p)
        dh = sd["enc_spatial_transformer.layers.0.1.q_scale"].shape[0]
        heads = sd["enc_spatial_transformer.layers.0.1.to_q.weight"].shape[0] // dh
        ff_inner = sd["enc_spatial_transformer.layers.0.3.4.weight"].shape[1]
        k = sd["vq._codebook.embed"].shape[1]
    except KeyError as err:
        raise UserError(f"not a GenerateCT CT-ViT state_dict: missing {err}") from err

    def depth(tr):
        return len({key.split(".")[2] for key in sd if key.startswith(f"{tr}_transformer.layers.")})

    ff_mult = ff_inner / (2 / 3 * d)
    has_gan = any(key.startswith("vgg.") for key in sd)
    if has_gan:
        n_blocks = len({key.split(".")[2] for key in sd if key.startswith("discr.blocks.")})
        discr_size = 2 ** (n_blocks + 1)
        if image_size is not None and image_size != discr_size:
            raise UserError(f"image_size={image_size} does not match the discriminator's {n_blocks} blocks "
                            f"(built for {discr_size}x{discr_size} slices)")
        image_size = discr_size
    image_size = image_size or 128
    kwargs: dict[str, Any] = dict(
        dim=d, codebook_size=k, image_size=image_size, patch_size=p, temporal_patch_size=pt,
        spatial_depth=depth("enc_spatial"), temporal_depth=depth("enc_temporal"), dim_head=dh, heads=heads,
        ff_mult=4.0 if int(4.0 * 2 / 3 * d) == ff_inner else ff_mult, use_vgg_and_gan=has_gan)
    if has_gan:
        widths, fc = [], sd["vgg.classifier.3.weight"].shape[0]
        for stage in VGG16_STAGES:
            if f"vgg.features.{stage[0]}.weight" in sd:
                widths.append(sd[f"vgg.features.{stage[0]}.weight"].shape[0])
        base = sd["discr.blocks.0.conv_res.weight"].shape[0] // 4
        attn = sorted(int(key.split(".")[2]) for key in sd if key.startswith("discr.attn_blocks.")
                      and key.endswith(".q_scale"))
        dh_d = sd[f"discr.attn_blocks.{attn[0]}.q_scale"].shape[0] if attn else 64
        heads_d = sd[f"discr.attn_blocks.{attn[0]}.to_q.weight"].shape[0] // dh_d if attn else 8
        res = tuple(image_size // 2 ** i for i in attn)
        max_dim = max(v.shape[0] for key, v in sd.items()
                      if key.startswith("discr.blocks.") and key.endswith("conv_res.weight"))
        kwargs["vgg"] = VGGConfig(widths=tuple(widths), fc_dim=fc)
        kwargs["discr"] = DiscriminatorConfig(base_dim=base, image_size=image_size, channels=1, attn_res_layers=res,
                                              max_dim=max_dim, attn_heads=heads_d, attn_dim_head=dh_d)
    kwargs.update(overrides)
    return CTViTConfig(**kwargs)


def _check_constants(sd: Mapping[str, np.ndarray], manifest: list[Entry], source: str) -> list[str]:
    """Validate keys that are constants in GenerateCT; return notes for harmless deviations."""
    notes, bad = [], []
    for e in manifest:
        if e.constant is None or e.key not in sd:
            continue
        v = np.asarray(sd[e.key])
        if tuple(v.shape) != e.shape:
            bad.append(f"{e.key}: shape {tuple(v.shape)}, expected {e.shape}")
        elif not np.all(v == e.constant):
            # context_norm of self-attention is never used by GenerateCT's forward: only a note.
            (notes if ".context_norm." in e.key else bad).append(
                f"{e.key}: not the constant {e.constant} GenerateCT keeps there")
    if bad:
        raise UserError(f"{source}: these keys must hold GenerateCT's constants:\n  " + "\n  ".join(bad))
    if "vq._codebook.initted" in sd and not np.all(np.asarray(sd["vq._codebook.initted"]) == 1):
        raise UserError(f"{source}: vq._codebook.initted is 0 (a k-means codebook that was never initialised)")
    return notes


def abstract_ctvit(cfg: CTViTConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of shape/dtype structs) of a CT-ViT, without computing any weights."""
    return nnx.split(nnx.eval_shape(lambda: CTViT(cfg, rngs=nnx.Rngs(0))))


@dataclasses.dataclass
class ImportResult:
    config: CTViTConfig
    state: nnx.State  # full model state (params and VQ buffers)
    report: Report
    notes: list[str]
    graphdef: nnx.GraphDef = dataclasses.field(repr=False, compare=False)

    def model(self) -> CTViT:
        return nnx.merge(self.graphdef, self.state)


def from_generatect(sd: Mapping[str, np.ndarray], cfg: CTViTConfig | None = None, *,
                    source: str = "state_dict") -> ImportResult:
    """ctgen state from a GenerateCT CT-ViT state_dict (379 keys, or 289 without vgg/discr)."""
    sd = select_ctvit_keys(sd, source)
    cfg = cfg or infer_config(sd)
    manifest = generatect_manifest(cfg)
    notes = _check_constants(sd, manifest, source)
    constants = {e.key for e in manifest if e.constant is not None}
    graphdef, abstract_state = abstract_ctvit(cfg)
    expected = {k: tuple(v.shape) for k, v in flatten_state(abstract_state.to_pure_dict()).items()}
    try:
        flat, report = convert(sd, ctvit_rules(cfg), direction="to_ours", expected_shapes=expected,
                               ignore_source=lambda k: k in constants)
    except ConversionError as err:
        raise UserError(f"{source} does not match a CT-ViT with {cfg}:\n{err}") from err
    missing_constants = sorted(constants - set(sd))
    if missing_constants:
        report.missing.extend(missing_constants)
        raise UserError(f"{source}: GenerateCT's strict loading needs these keys too:\n" + "\n".join(missing_constants))
    state = abstract_state
    nnx.replace_by_pure_dict(state, unflatten_state({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}))
    return ImportResult(cfg, state, report, notes, graphdef)


def import_generatect_ctvit(path: str, cfg: CTViTConfig | None = None, **config_overrides: Any) -> ImportResult:
    """Import `ctvit_pretrained.pt`, the `ctvit.*` block of `transformer_pretrained.pt`, or an export."""
    sd = select_ctvit_keys(load_state_dict(path), path)
    if cfg is None:
        cfg = infer_config(sd, **config_overrides)
    return from_generatect(sd, cfg, source=path)


# --- torchvision VGG16 (perceptual-loss weights) -----------------------------------------------------
def torchvision_vgg16_rules(vgg: VGGConfig) -> list[Rule]:
    """ctgen VGG16 paths (relative to the `vgg` module) <-> torchvision `vgg16().state_dict()` keys."""
    rules: list[Rule] = []
    for j, idx in enumerate(VGG_FEATURE_INDEX[: _num_vgg_convs(vgg)]):
        rules += _conv(f"convs/{j}", f"features.{idx}")
    return rules + _linear("fc6", "classifier.0") + _linear("fc7", "classifier.3")


def load_torchvision_vgg16(path: str, vgg: VGGConfig = VGGConfig()) -> dict[str, np.ndarray]:
    """VGG16 weights for the perceptual loss from a torchvision state_dict (`vgg16-397923af.pth`, its
    safetensors form, or any file whose keys carry a `vgg.` prefix such as a GenerateCT checkpoint).
    Returns {path relative to the `vgg` module: array}; the ImageNet head (classifier.6) is ignored."""
    sd = load_state_dict(path)
    if any(k.startswith("vgg.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("vgg.")}
    expected = {k: tuple(v.shape) for k, v in flatten_state(nnx.state(nnx.eval_shape(
        lambda: VGG16(vgg, rngs=nnx.Rngs(0)))).to_pure_dict()).items()}
    try:
        flat, _ = convert(sd, torchvision_vgg16_rules(vgg), direction="to_ours", expected_shapes=expected,
                          ignore_source=lambda k: k.startswith("classifier.6."))
    except ConversionError as err:
        raise UserError(f"{path} is not a torchvision VGG16 state_dict for {vgg}:\n{err}") from err
    return {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}


def vgg_to_torchvision(vgg_module: VGG16) -> "OrderedDict[str, np.ndarray]":
    """torchvision-layout state_dict (without the ImageNet head) of a ctgen VGG16."""
    rules = torchvision_vgg16_rules(vgg_module.cfg)
    out, _ = convert(_ours_flat(vgg_module), rules, direction="to_foreign")
    return OrderedDict((r.foreign, np.ascontiguousarray(out[r.foreign], np.float32)) for r in rules)
