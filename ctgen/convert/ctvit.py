"""CT-ViT <-> GenerateCT `CTViT` state_dict: declarative name map, export (.pt/.safetensors), import.

GenerateCT's `CTViT` holds the autoencoder and, with `use_vgg_and_gan`, the VGG16 and the
discriminator its losses use. On the ctgen side these are three modules, laid out as the CT-ViT
stage holds them: `ctvit/...` (the autoencoder), `vgg/...`, `discr/...` (`LossNetworksConfig`
gives their sizes; None = without them). The name map pairs those paths with GenerateCT's keys
(top-level `vgg.*` / `discr.*` for the loss networks); it is built from the shared layer rules
of `ctgen.convert.generatect_layers`, plus the codebook buffers, which lose their leading
codebook axis of 1.

`generatect_manifest(cfg, nets)` lists every key GenerateCT's `CTViT` has, in its `state_dict()`
order, with shape and kind; for the paper config with loss networks it equals
shared/reference/state_dicts/generatect_ctvit.txt (379 keys; 289 without them).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ctgen.convert import generatect_layers as gl
from ctgen.convert.generatect_layers import Entry
from ctgen.convert.namemap import ConversionError, Report, Rule, convert
from ctgen.convert.torch_files import read_state_dict, write_state_dict
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.ctvit_losses import LossNetworksConfig
from ctgen.models.discriminator import Discriminator, DiscriminatorConfig
from ctgen.models.vgg import VGG16, VGG16_STAGES, VGGConfig
from ctgen.weights import abstract_model, flatten_state, place, to_pure, unflatten_state

TRANSFORMERS = ("enc_spatial", "enc_temporal", "dec_spatial", "dec_temporal")
VGG_FEATURE_INDEX = tuple(i for stage in VGG16_STAGES for i in stage)
LOSS_NETWORKS = ("vgg", "discr")  # their top-level names on both sides


def _add_axis(x):
    return np.asarray(x)[None]


def _drop_axis(x):
    x = np.asarray(x)
    if x.shape[0] != 1:
        raise ValueError(f"expected a leading codebook axis of size 1 (one codebook), got shape {x.shape}")
    return x[0]


# --- the name map ------------------------------------------------------------------------------------
def autoencoder_rules(ours: str = "ctvit/", theirs: str = "") -> list[Rule]:
    """The autoencoder's map; `ours`/`theirs` prefix the paths (MaskGIT's checkpoint nests it
    under `ctvit.`)."""
    rules = [
        *gl.continuous_position_bias(f"{ours}pos_bias", f"{theirs}spatial_rel_pos_bias"),
        *gl.layer_norm(f"{ours}first_embed/norm_in", f"{theirs}to_patch_emb_first_frame.1"),
        *gl.linear(f"{ours}first_embed/proj", f"{theirs}to_patch_emb_first_frame.2"),
        *gl.layer_norm(f"{ours}first_embed/norm_out", f"{theirs}to_patch_emb_first_frame.3"),
        *gl.layer_norm(f"{ours}rest_embed/norm_in", f"{theirs}to_patch_emb.1"),
        *gl.linear(f"{ours}rest_embed/proj", f"{theirs}to_patch_emb.2"),
        *gl.layer_norm(f"{ours}rest_embed/norm_out", f"{theirs}to_patch_emb.3"),
    ]
    for tr in TRANSFORMERS:
        rules += gl.transformer(f"{ours}{tr}", f"{theirs}{tr}_transformer")
    return rules + [
        Rule(f"{ours}vq/initted", f"{theirs}vq._codebook.initted"),
        Rule(f"{ours}vq/cluster_size", f"{theirs}vq._codebook.cluster_size", _add_axis, _drop_axis),
        Rule(f"{ours}vq/embed", f"{theirs}vq._codebook.embed", _add_axis, _drop_axis),
        *gl.linear(f"{ours}first_to_pixels", f"{theirs}to_pixels_first_frame.0"),
        *gl.linear(f"{ours}rest_to_pixels", f"{theirs}to_pixels.0"),
    ]


def vgg_rules(vgg: VGGConfig, ours: str = "vgg/", theirs: str = "vgg.") -> list[Rule]:
    """ctgen VGG16 <-> torchvision `vgg16()` layout (the ImageNet head `classifier.6` excluded)."""
    rules: list[Rule] = []
    for j, idx in enumerate(VGG_FEATURE_INDEX[: _num_vgg_convs(vgg)]):
        rules += gl.conv2d(f"{ours}convs/{j}", f"{theirs}features.{idx}")
    return rules + gl.linear(f"{ours}fc6", f"{theirs}classifier.0") + gl.linear(f"{ours}fc7", f"{theirs}classifier.3")


def discriminator_rules(discr: DiscriminatorConfig) -> list[Rule]:
    rules = [*gl.conv2d("discr/blocks/{b}/conv_res", "discr.blocks.{b}.conv_res"),
             *gl.conv2d("discr/blocks/{b}/conv1", "discr.blocks.{b}.net.0"),
             *gl.conv2d("discr/blocks/{b}/conv2", "discr.blocks.{b}.net.2"),
             *gl.conv2d("discr/blocks/{b}/downsample", "discr.blocks.{b}.downsample.1")]
    for j, idx in enumerate(discr.attn_block_indices):
        rules += gl.attention(f"discr/attn/{j}", f"discr.attn_blocks.{idx}")
    return rules + gl.conv2d("discr/to_logits_conv", "discr.to_logits.0") + gl.linear("discr/to_logits",
                                                                                      "discr.to_logits.3")


def ctvit_rules(cfg: CTViTConfig, nets: LossNetworksConfig | None = None) -> list[Rule]:
    """The whole map: autoencoder, and the loss networks when `nets` is given."""
    rules = autoencoder_rules()
    if nets is not None:
        rules += vgg_rules(nets.vgg) + discriminator_rules(nets.discr)
    return rules


def _num_vgg_convs(vgg: VGGConfig) -> int:
    return sum(len(s) for s in VGG16_STAGES[: len(vgg.widths)])


# --- the GenerateCT manifest -------------------------------------------------------------------------
def generatect_manifest(cfg: CTViTConfig, nets: LossNetworksConfig | None = None) -> list[Entry]:
    """Every key of GenerateCT's `CTViT.state_dict()` for `cfg` (and `nets`), in order."""
    d, p, pt = cfg.dim, cfg.patch_size, cfg.temporal_patch_size
    e = gl.continuous_position_bias_entries("spatial_rel_pos_bias", d, cfg.heads, num_dims=2)
    for name, n in (("to_patch_emb_first_frame", p * p), ("to_patch_emb", pt * p * p)):
        e += [*gl.layer_norm_entries(f"{name}.1", n), *gl.linear_entries(f"{name}.2", d, n),
              *gl.layer_norm_entries(f"{name}.3", d)]

    def transformer(tr, depth):
        return gl.transformer_entries(f"{tr}_transformer", depth=depth, dim=d, heads=cfg.heads,
                                      dim_head=cfg.dim_head, ff_mult=cfg.ff_mult)

    e += transformer("enc_spatial", cfg.spatial_depth) + transformer("enc_temporal", cfg.temporal_depth)
    e += [Entry("vq._codebook.initted", (1,), "buffer"),
          Entry("vq._codebook.cluster_size", (1, cfg.codebook_size), "buffer"),
          Entry("vq._codebook.embed", (1, cfg.codebook_size, d), "buffer")]
    e += transformer("dec_spatial", cfg.spatial_depth) + transformer("dec_temporal", cfg.temporal_depth)
    e += [*gl.linear_entries("to_pixels_first_frame.0", p * p, d), *gl.linear_entries("to_pixels.0", pt * p * p, d)]
    if nets is not None:
        e += _vgg_entries(nets.vgg) + _discriminator_entries(nets.discr)
    return e


def _vgg_entries(vgg: VGGConfig) -> list[Entry]:
    e, c_in = [], vgg.in_channels
    for width, stage in zip(vgg.widths, VGG16_STAGES):
        for idx in stage:
            e += gl.conv2d_entries(f"vgg.features.{idx}", width, c_in, 3)
            c_in = width
    return (e + gl.linear_entries("vgg.classifier.0", vgg.fc_dim, c_in * vgg.pool_size ** 2)
            + gl.linear_entries("vgg.classifier.3", vgg.fc_dim, vgg.fc_dim))


def _discriminator_entries(dc: DiscriminatorConfig) -> list[Entry]:
    e, dims = [], dc.layer_dims
    for b in range(len(dims) - 1):
        ci, co = dims[b], dims[b + 1]
        e += gl.conv2d_entries(f"discr.blocks.{b}.conv_res", co, ci, 1) + gl.conv2d_entries(f"discr.blocks.{b}.net.0",
                                                                                             co, ci, 3)
        e += gl.conv2d_entries(f"discr.blocks.{b}.net.2", co, co, 3)
        if b != len(dims) - 2:
            e += gl.conv2d_entries(f"discr.blocks.{b}.downsample.1", co, 4 * co, 1)
    for idx in dc.attn_block_indices:
        e += gl.attention_entries(f"discr.attn_blocks.{idx}", dims[idx + 1], dc.attn_heads, dc.attn_dim_head)
    fmap = dc.image_size // 2 ** dc.num_layers
    return e + gl.conv2d_entries("discr.to_logits.0", dims[-1], dims[-1], 3) + gl.linear_entries(
        "discr.to_logits.3", 1, fmap * fmap * dims[-1])


# --- export --------------------------------------------------------------------------------------
def _ours_flat(model_or_state: Any) -> dict[str, np.ndarray]:
    """{ctgen path: array} in the stage layout; an autoencoder on its own goes under `ctvit/`."""
    tree = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    tree = to_pure(tree)
    is_flat = all(isinstance(k, str) and not isinstance(v, Mapping) for k, v in tree.items())
    flat = tree if is_flat else flatten_state(tree)
    if not any(k.startswith("ctvit/") for k in flat):
        flat = {f"ctvit/{k}": v for k, v in flat.items()}
    return {k: v if isinstance(v, np.ndarray) else np.asarray(jax.device_get(v)) for k, v in flat.items()}


def to_generatect(model_or_state: Any, cfg: CTViTConfig, nets: LossNetworksConfig | None = None, *,
                  materialize: bool = True) -> "OrderedDict[str, np.ndarray]":
    """GenerateCT `CTViT` state_dict (numpy float32, manifest order) of a ctgen CT-ViT.

    `model_or_state`: a CTViT (or its state), the CT-ViT stage's model or its state
    ({"ctvit", "vgg", "discr"}), or a flat {ctgen path: array} dict. With `nets` the loss
    networks are exported too (379 keys at the paper size), without them 289 keys.
    materialize=False keeps layout changes as numpy views (for shape checks of huge models).
    """
    manifest = generatect_manifest(cfg, nets)
    expected = {e.key: e.shape for e in manifest if e.constant is None}
    converted, _ = convert(_ours_flat(model_or_state), ctvit_rules(cfg, nets), direction="to_foreign",
                           expected_shapes=expected)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for e in manifest:
        value = np.full(e.shape, e.constant, np.float32) if e.constant is not None else converted[e.key]
        out[e.key] = np.ascontiguousarray(value, dtype=np.float32) if materialize else value
    return out


def _configs_of(model: nnx.Module) -> tuple[CTViTConfig, LossNetworksConfig | None]:
    """The architecture of a CTViT, or of a module holding `ctvit` (and `vgg`, `discr`) as the
    CT-ViT stage's model does."""
    if isinstance(model, CTViT):
        return model.cfg, None
    if isinstance(getattr(model, "ctvit", None), CTViT):
        nets = None if getattr(model, "vgg", None) is None else LossNetworksConfig(model.vgg.cfg, model.discr.cfg)
        return model.ctvit.cfg, nets
    raise ValueError(f"cannot tell the CT-ViT architecture of a {type(model).__name__}; pass cfg (and nets)")


def export_ctvit(model_or_state: Any, path: str, cfg: CTViTConfig | None = None,
                 nets: LossNetworksConfig | None = None) -> int:
    """Export a ctgen CT-ViT (module or state, see `to_generatect`) to GenerateCT's format
    (.pt or .safetensors); returns the key count. A module tells its own architecture."""
    if cfg is None:
        if not isinstance(model_or_state, nnx.Module):
            raise ValueError("export_ctvit needs `cfg` (and `nets`) when given a state rather than a module")
        cfg, nets = _configs_of(model_or_state)
    sd = to_generatect(model_or_state, cfg, nets)
    write_state_dict(sd, path)
    return len(sd)


# --- import --------------------------------------------------------------------------------------
def select_ctvit_keys(sd: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """The CT-ViT part of a state_dict: as is, or the `ctvit.*` block of `transformer_pretrained.pt`."""
    if "vq._codebook.embed" in sd:
        return dict(sd)
    if "ctvit.vq._codebook.embed" in sd:
        return {k[len("ctvit."):]: v for k, v in sd.items() if k.startswith("ctvit.")}
    raise UserError(f"{source}: no CT-ViT weights found (neither `vq._codebook.embed` nor "
                    f"`ctvit.vq._codebook.embed`; first keys: {list(sd)[:5]})")


def infer_config(sd: Mapping[str, Any], image_size: int | None = None,
                 **overrides: Any) -> tuple[CTViTConfig, LossNetworksConfig | None]:
    """Architecture from state_dict shapes: (autoencoder, loss networks or None). The image size
    follows from the discriminator's depth when it is present; otherwise it is `image_size`
    (default 128, GenerateCT's). `overrides` replace autoencoder fields."""
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
    has_nets = any(key.startswith("vgg.") for key in sd)
    if has_nets:
        n_blocks = len({key.split(".")[2] for key in sd if key.startswith("discr.blocks.")})
        discr_size = 2 ** (n_blocks + 1)
        if image_size is not None and image_size != discr_size:
            raise UserError(f"image_size={image_size} does not match the discriminator's {n_blocks} blocks "
                            f"(built for {discr_size}x{discr_size} slices)")
        image_size = discr_size
    image_size = image_size or 128
    cfg = CTViTConfig(
        dim=d, codebook_size=k, image_size=image_size, patch_size=p, temporal_patch_size=pt,
        spatial_depth=depth("enc_spatial"), temporal_depth=depth("enc_temporal"), dim_head=dh, heads=heads,
        ff_mult=4.0 if int(4.0 * 2 / 3 * d) == ff_inner else ff_mult)
    cfg = dataclasses.replace(cfg, **overrides)
    if not has_nets:
        return cfg, None
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
    return cfg, LossNetworksConfig(
        vgg=VGGConfig(widths=tuple(widths), fc_dim=fc),
        discr=DiscriminatorConfig(base_dim=base, image_size=image_size, channels=1, attn_res_layers=res,
                                  max_dim=max_dim, attn_heads=heads_d, attn_dim_head=dh_d))


def abstract_ctvit(cfg: CTViTConfig, nets: LossNetworksConfig | None = None, *, mesh: Mesh | None = None,
                   rules=None) -> tuple[nnx.GraphDef, dict[str, nnx.State]]:
    """(the autoencoder's graphdef, {"ctvit", and with `nets` "vgg", "discr": abstract state}),
    without computing any weights (`ctgen.weights.abstract_model`, sharded over `mesh`)."""
    dtype = jnp.dtype(cfg.dtype)
    graphdef, state = abstract_model(lambda r: CTViT(cfg, rngs=r), mesh=mesh, rules=rules)
    states = {"ctvit": state}
    if nets is not None:
        states["vgg"] = abstract_model(lambda r: VGG16(nets.vgg, dtype=dtype, rngs=r), mesh=mesh, rules=rules)[1]
        states["discr"] = abstract_model(lambda r: Discriminator(nets.discr, dtype=dtype, rngs=r), mesh=mesh,
                                         rules=rules)[1]
    return graphdef, states


@dataclasses.dataclass
class ImportResult:
    config: CTViTConfig
    nets: LossNetworksConfig | None  # the loss networks' sizes, if they were imported
    states: dict[str, nnx.State]  # {"ctvit": autoencoder (params and VQ buffers), "vgg", "discr"}
    report: Report
    notes: list[str]
    graphdef: nnx.GraphDef = dataclasses.field(repr=False, compare=False)  # the autoencoder's

    @property
    def state(self) -> nnx.State:
        """The autoencoder's state."""
        return self.states["ctvit"]

    def model(self) -> CTViT:
        return nnx.merge(self.graphdef, self.state)


def from_generatect(sd: Mapping[str, Any], cfg: CTViTConfig | None = None, nets: LossNetworksConfig | None = None,
                    *, source: str = "state_dict", loss_networks: bool = True, mesh: Mesh | None = None,
                    rules=None) -> ImportResult:
    """ctgen states from a GenerateCT CT-ViT state_dict (379 keys, or 289 without vgg/discr).

    cfg, nets: the architecture (inferred from the shapes when `cfg` is None; given a `cfg`,
      `nets` None means a state_dict without loss networks).
    loss_networks=False: import only the autoencoder (a tokenizer for later stages): the VGG16
      and discriminator keys are skipped, never converted or allocated.
    mesh, rules: place the weights sharded by their logical axes.
    """
    sd = select_ctvit_keys(sd, source)
    if cfg is None:
        cfg, nets = infer_config(sd)
    if not loss_networks:
        nets = None
        sd = {k: v for k, v in sd.items() if k.split(".")[0] not in LOSS_NETWORKS}
    manifest = generatect_manifest(cfg, nets)
    notes = gl.check_constants(sd, manifest, source)
    if "vq._codebook.initted" in sd and not np.all(np.asarray(sd["vq._codebook.initted"]) == 1):
        raise UserError(f"{source}: vq._codebook.initted is 0 (a k-means codebook that was never initialised)")
    constants = {e.key for e in manifest if e.constant is not None}
    graphdef, abstract = abstract_ctvit(cfg, nets, mesh=mesh, rules=rules)
    expected = {k: tuple(v.shape) for k, v in flatten_state(to_pure(abstract)).items()}
    try:
        flat, report = convert(sd, ctvit_rules(cfg, nets), direction="to_ours", expected_shapes=expected,
                               ignore_source=lambda k: k in constants)
    except ConversionError as err:
        raise UserError(f"{source} does not match a CT-ViT with {cfg} and loss networks {nets}:\n{err}") from err
    missing_constants = sorted(constants - set(sd))
    if missing_constants:
        report.missing.extend(missing_constants)
        raise UserError(f"{source}: GenerateCT's strict loading needs these keys too:\n" + "\n".join(missing_constants))
    values = unflatten_state(flat)
    states = {name: place(state, values[name]) for name, state in abstract.items()}
    return ImportResult(cfg, nets, states, report, notes, graphdef)


def import_generatect_ctvit(path: str, cfg: CTViTConfig | None = None, *, loss_networks: bool = True,
                            mesh: Mesh | None = None, rules=None, **config_overrides: Any) -> ImportResult:
    """Import `ctvit_pretrained.pt`, the `ctvit.*` block of `transformer_pretrained.pt`, or an export.
    `config_overrides` replace inferred autoencoder fields (`image_size` when there is no
    discriminator to infer it from, `max_slices`, ...)."""
    sd = select_ctvit_keys(read_state_dict(path), path)
    nets = None
    if cfg is None:
        cfg, nets = infer_config(sd, **config_overrides)
    return from_generatect(sd, cfg, nets, source=path, loss_networks=loss_networks, mesh=mesh, rules=rules)


# --- torchvision VGG16 (perceptual-loss weights) -----------------------------------------------------
def load_torchvision_vgg16(path: str, vgg: VGGConfig = VGGConfig()) -> dict[str, np.ndarray]:
    """VGG16 weights for the perceptual loss from a torchvision state_dict (`vgg16-397923af.pth`, its
    safetensors form, or any file whose keys carry a `vgg.` prefix such as a GenerateCT checkpoint).
    Returns {path relative to the `vgg` module: array}; the ImageNet head (classifier.6) is ignored."""
    sd = read_state_dict(path)
    if any(k.startswith("vgg.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("vgg.")}
    abstract = abstract_model(lambda r: VGG16(vgg, rngs=r))[1]
    expected = {k: tuple(v.shape) for k, v in flatten_state(to_pure(abstract)).items()}
    try:
        flat, _ = convert(sd, vgg_rules(vgg, "", ""), direction="to_ours", expected_shapes=expected,
                          ignore_source=lambda k: k.startswith("classifier.6."))
    except ConversionError as err:
        raise UserError(f"{path} is not a torchvision VGG16 state_dict for {vgg}:\n{err}") from err
    return {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}


def vgg_to_torchvision(vgg_module: VGG16) -> "OrderedDict[str, np.ndarray]":
    """torchvision-layout state_dict (without the ImageNet head) of a ctgen VGG16."""
    rules = vgg_rules(vgg_module.cfg, "", "")
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_state(to_pure(nnx.state(vgg_module))).items()}
    out, _ = convert(flat, rules, direction="to_foreign")
    return OrderedDict((r.foreign, np.ascontiguousarray(out[r.foreign], np.float32)) for r in rules)
