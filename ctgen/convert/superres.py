"""SR U-Net <-> GenerateCT's `Unet` / `Superres` / trainer checkpoint: name map, manifest, layouts.

Three GenerateCT layouts hold the U-Net's weights:
- `Unet.state_dict()` (`init_conv.convs.0.weight`, ...): what ctgen's `.safetensors` export holds;
- `Superres.state_dict()`: the cascade `(NullUnet, Unet)`, keys `unets.0.dummy_parameter` and
  `unets.1.<Unet key>` (448 keys at the paper size; `superres_manifest`);
- the trainer checkpoint `superres_pretrained.pt` that `SuperResolutionTrainer.save` writes and
  `inference_superres.py` loads: `{"model": Superres.state_dict(), "steps": int64 (2,),
  "time_elapsed": float, "ema": ModuleList([EMA(u) for u in unets]).state_dict(), [optimizer and
  scaler states]}`. With ema-pytorch 0.8.3 `ema` holds `{i}.initted` (0-d bool), `{i}.step`
  (0-d int64), `{i}.online_model.<key>` and `{i}.ema_model.<key>` for both U-Nets (900 keys).
  GenerateCT samples with `ema.1.ema_model.*`.

The name map pairs ctgen paths with `Unet` keys, built from the shared GenerateCT layer rules
(`ctgen.convert.generatect_layers`). Layout hooks: convolution kernels (k, k, in, out) <->
(out, in, k, k); the space-to-depth downsample's 1x1 weight (out, 4 in) with inputs in
(channel, row, column) order <-> a (2, 2, in, out) kernel; the pixel-shuffle convolution's
outputs (channel, row, column) <-> (row, column, channel); null text embeddings lose their
leading axis of 1.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ctgen.convert import generatect_layers as gl
from ctgen.convert.generatect_layers import Entry
from ctgen.convert.namemap import ConversionError, Report, Rule, convert
from ctgen.errors import UserError
from ctgen.models.unet import UNet, UNetConfig
from ctgen.weights import abstract_model, flatten_state, place, to_pure, unflatten_state

UNET_PREFIX = "unets.1."
EMA_PREFIX = "1.ema_model."
ONLINE_PREFIX = "1.online_model."


# --- layout hooks ----------------------------------------------------------------------------------
def _add_axis(x):
    return np.asarray(x)[None]


def _drop_axis(x):
    x = np.asarray(x)
    if x.shape[0] != 1:
        raise ValueError(f"expected a leading axis of size 1, got shape {x.shape}")
    return x[0]


def _downsample_to_torch(k):  # (2, 2, c, out) [row, col, c] -> (out, 4c [c, row, col], 1, 1)
    k = np.asarray(k)
    c, out = k.shape[2], k.shape[3]
    return k.transpose(3, 2, 0, 1).reshape(out, 4 * c)[:, :, None, None]


def _downsample_to_ours(w):
    w = np.asarray(w)
    out, c4 = w.shape[:2]
    return w[:, :, 0, 0].reshape(out, c4 // 4, 2, 2).transpose(2, 3, 1, 0)


def _shuffle_kernel_to_torch(k):  # (1, 1, in, 4 out [row, col, c]) -> (4 out [c, row, col], in, 1, 1)
    k = np.asarray(k)[0, 0]
    cin, c4 = k.shape
    return k.T.reshape(2, 2, c4 // 4, cin).transpose(2, 0, 1, 3).reshape(c4, cin)[:, :, None, None]


def _shuffle_kernel_to_ours(w):
    w = np.asarray(w)[:, :, 0, 0]
    c4, cin = w.shape
    return w.reshape(c4 // 4, 2, 2, cin).transpose(1, 2, 0, 3).reshape(c4, cin).T[None, None]


def _shuffle_bias_to_torch(b):
    b = np.asarray(b)
    return b.reshape(2, 2, -1).transpose(2, 0, 1).reshape(-1)


def _shuffle_bias_to_ours(b):
    b = np.asarray(b)
    return b.reshape(-1, 2, 2).transpose(1, 2, 0).reshape(-1)


def _gain(ours: str, theirs: str) -> list[Rule]:
    """Superres's gain-only LayerNorm (`g`) <-> ctgen `ScaleNorm`."""
    return [Rule(f"{ours}/scale", f"{theirs}.g")]


def _group_norm(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")]


# --- the name map ------------------------------------------------------------------------------------
def resnet_rules(ours: str, theirs: str) -> list[Rule]:
    """A ResnetBlock; rules for parts a block lacks (cross-attention, gate, residual conv) simply
    match nothing."""
    ca, their_ca = f"{ours}/cross_attn", f"{theirs}.cross_attn"
    rules = [*gl.linear(f"{ours}/time_mlp", f"{theirs}.time_mlp.1"),
             Rule(f"{ca}/null_kv", f"{their_ca}.null_kv"), *_gain(f"{ca}/norm", f"{their_ca}.norm"),
             *gl.linear(f"{ca}/to_q", f"{their_ca}.to_q", bias=False),
             *gl.linear(f"{ca}/to_kv", f"{their_ca}.to_kv", bias=False),
             *gl.linear(f"{ca}/to_out", f"{their_ca}.to_out.0", bias=False),
             *_gain(f"{ca}/out_norm", f"{their_ca}.to_out.1")]
    for b in ("block1", "block2"):
        rules += _group_norm(f"{ours}/{b}/groupnorm", f"{theirs}.{b}.groupnorm")
        rules += gl.conv2d(f"{ours}/{b}/project", f"{theirs}.{b}.project")
    return rules + [*gl.conv2d(f"{ours}/gca/to_k", f"{theirs}.gca.to_k"),
                    *gl.conv2d(f"{ours}/gca/net_in", f"{theirs}.gca.net.0"),
                    *gl.conv2d(f"{ours}/gca/net_out", f"{theirs}.gca.net.2"),
                    *gl.conv2d(f"{ours}/res_conv", f"{theirs}.res_conv")]


def _time_rules(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/sinu/weights", f"to_{theirs}_hiddens.0.weights"),
            *gl.linear(f"{ours}/to_hidden", f"to_{theirs}_hiddens.1"),
            *gl.linear(f"{ours}/to_cond", f"to_{theirs}_cond.0"),
            *gl.linear(f"{ours}/to_tokens", f"to_{theirs}_tokens.0")]


def unet_rules() -> list[Rule]:
    """ctgen `UNet` paths <-> GenerateCT `Unet` keys."""
    pool, their_pool = "text/attn_pool", "attn_pool"
    att, their_att = f"{pool}/attn/{{i}}", f"{their_pool}.layers.{{i}}.0"
    ff, their_ff = f"{pool}/ff/{{i}}", f"{their_pool}.layers.{{i}}.1"
    rules = [
        Rule("text/null_text_embed", "null_text_embed", _add_axis, _drop_axis),
        Rule("text/null_text_hidden", "null_text_hidden", _add_axis, _drop_axis),
        *gl.conv2d("init_conv/convs/{i}", "init_conv.convs.{i}"),
        *_time_rules("time", "time"), *_time_rules("lowres_time", "lowres_time"),
        *gl.layer_norm("norm_cond", "norm_cond"),
        *gl.linear("text/text_to_cond", "text_to_cond"),
        Rule(f"{pool}/latents", f"{their_pool}.latents"),
        Rule(f"{pool}/pos_emb", f"{their_pool}.pos_emb.weight"),
        *_gain(f"{pool}/mean_pooled_norm", f"{their_pool}.to_latents_from_mean_pooled_seq.0"),
        *gl.linear(f"{pool}/to_mean_pooled", f"{their_pool}.to_latents_from_mean_pooled_seq.1"),
        *gl.layer_norm(f"{att}/norm", f"{their_att}.norm"),
        *gl.layer_norm(f"{att}/norm_latents", f"{their_att}.norm_latents"),
        *gl.linear(f"{att}/to_q", f"{their_att}.to_q", bias=False),
        *gl.linear(f"{att}/to_kv", f"{their_att}.to_kv", bias=False),
        *gl.linear(f"{att}/to_out", f"{their_att}.to_out.0", bias=False),
        *gl.layer_norm(f"{att}/out_norm", f"{their_att}.to_out.1"),
        *_gain(f"{ff}/norm_in", f"{their_ff}.0"), *gl.linear(f"{ff}/w_in", f"{their_ff}.1", bias=False),
        *_gain(f"{ff}/norm_hidden", f"{their_ff}.3"), *gl.linear(f"{ff}/w_out", f"{their_ff}.4", bias=False),
        *gl.layer_norm("text/hidden_norm", "to_text_non_attn_cond.0"),
        *gl.linear("text/hidden_in", "to_text_non_attn_cond.1"),
        *gl.linear("text/hidden_out", "to_text_non_attn_cond.3"),
        *resnet_rules("init_resnet_block", "init_resnet_block"),
        Rule("downs/{k}/downsample/kernel", "downs.{k}.0.1.weight", _downsample_to_torch, _downsample_to_ours),
        Rule("downs/{k}/downsample/bias", "downs.{k}.0.1.bias"),
        *resnet_rules("downs/{k}/init_block", "downs.{k}.1"),
        *resnet_rules("downs/{k}/blocks/{i}", "downs.{k}.2.{i}"),
        *resnet_rules("mid_block1", "mid_block1"), *resnet_rules("mid_block2", "mid_block2"),
        *resnet_rules("ups/{k}/init_block", "ups.{k}.0"),
        *resnet_rules("ups/{k}/blocks/{i}", "ups.{k}.1.{i}"),
        Rule("ups/{k}/upsample/conv/kernel", "ups.{k}.3.net.0.weight", _shuffle_kernel_to_torch,
             _shuffle_kernel_to_ours),
        Rule("ups/{k}/upsample/conv/bias", "ups.{k}.3.net.0.bias", _shuffle_bias_to_torch, _shuffle_bias_to_ours),
        *resnet_rules("final_res_block", "final_res_block"),
        *gl.conv2d("final_conv", "final_conv"),
    ]
    return rules


# --- the GenerateCT manifest -------------------------------------------------------------------------
def _gain_entries(prefix: str, dim: int) -> list[Entry]:
    return [Entry(f"{prefix}.g", (dim,), "param")]


def _group_norm_entries(prefix: str, dim: int) -> list[Entry]:
    return gl.layer_norm_entries(prefix, dim)


def resnet_entries(prefix: str, c_in: int, c_out: int, cfg: UNetConfig, *, cross: bool = False,
                   gca: bool = False) -> list[Entry]:
    e = gl.linear_entries(f"{prefix}.time_mlp.1", 2 * c_out, cfg.time_cond_dim)
    if cross:
        inner = cfg.attn_heads * cfg.attn_dim_head
        ca = f"{prefix}.cross_attn"
        e += [Entry(f"{ca}.null_kv", (2, cfg.attn_dim_head), "param"), *_gain_entries(f"{ca}.norm", c_out),
              *gl.linear_entries(f"{ca}.to_q", inner, c_out, bias=False),
              *gl.linear_entries(f"{ca}.to_kv", 2 * inner, cfg.cond_dim, bias=False),
              *gl.linear_entries(f"{ca}.to_out.0", c_out, inner, bias=False), *_gain_entries(f"{ca}.to_out.1", c_out)]
    e += _group_norm_entries(f"{prefix}.block1.groupnorm", c_in) + gl.conv2d_entries(f"{prefix}.block1.project",
                                                                                     c_out, c_in, 3)
    e += _group_norm_entries(f"{prefix}.block2.groupnorm", c_out) + gl.conv2d_entries(f"{prefix}.block2.project",
                                                                                      c_out, c_out, 3)
    if gca:
        hidden = max(3, c_out // 2)
        e += [*gl.conv2d_entries(f"{prefix}.gca.to_k", 1, c_out, 1),
              *gl.conv2d_entries(f"{prefix}.gca.net.0", hidden, c_out, 1),
              *gl.conv2d_entries(f"{prefix}.gca.net.2", c_out, hidden, 1)]
    if c_in != c_out:
        e += gl.conv2d_entries(f"{prefix}.res_conv", c_out, c_in, 1)
    return e


def unet_manifest(cfg: UNetConfig) -> list[Entry]:
    """Every key of GenerateCT's `Unet.state_dict()` (as `Superres` builds it) for `cfg`, in order."""
    d, cd, t = cfg.dim, cfg.cond_dim, cfg.time_cond_dim
    inner = cfg.attn_heads * cfg.attn_dim_head
    e = [Entry("null_text_embed", (1, cfg.max_text_len, cd), "param"), Entry("null_text_hidden", (1, t), "param")]
    kernels = sorted(cfg.init_cross_embed_kernel_sizes)
    widths = [int(d / 2 ** i) for i in range(1, len(kernels))]
    widths.append(d - sum(widths))
    for i, (k, w) in enumerate(zip(kernels, widths)):
        e += gl.conv2d_entries(f"init_conv.convs.{i}", w, 2 * cfg.channels, k)
    for name in ("time", "lowres_time"):
        e += [Entry(f"to_{name}_hiddens.0.weights", (cfg.learned_sinu_dim // 2,), "param"),
              *gl.linear_entries(f"to_{name}_hiddens.1", t, cfg.learned_sinu_dim + 1),
              *gl.linear_entries(f"to_{name}_cond.0", t, t),
              *gl.linear_entries(f"to_{name}_tokens.0", cd * cfg.num_time_tokens, t)]
    e += gl.layer_norm_entries("norm_cond", cd) + gl.linear_entries("text_to_cond", cd, cfg.text_embed_dim)
    e += [Entry("attn_pool.latents", (cfg.attn_pool_num_latents, cd), "param"),
          Entry("attn_pool.pos_emb.weight", (cfg.attn_pool_max_seq_len, cd), "param"),
          *_gain_entries("attn_pool.to_latents_from_mean_pooled_seq.0", cd),
          *gl.linear_entries("attn_pool.to_latents_from_mean_pooled_seq.1", cd * cfg.attn_pool_num_mean_pooled, cd)]
    hidden = int(cd * cfg.attn_pool_ff_mult)
    for i in range(cfg.attn_pool_depth):
        p = f"attn_pool.layers.{i}"
        e += [*gl.layer_norm_entries(f"{p}.0.norm", cd), *gl.layer_norm_entries(f"{p}.0.norm_latents", cd),
              *gl.linear_entries(f"{p}.0.to_q", inner, cd, bias=False),
              *gl.linear_entries(f"{p}.0.to_kv", 2 * inner, cd, bias=False),
              *gl.linear_entries(f"{p}.0.to_out.0", cd, inner, bias=False), *gl.layer_norm_entries(f"{p}.0.to_out.1", cd),
              *_gain_entries(f"{p}.1.0", cd), *gl.linear_entries(f"{p}.1.1", hidden, cd, bias=False),
              *_gain_entries(f"{p}.1.3", hidden), *gl.linear_entries(f"{p}.1.4", cd, hidden, bias=False)]
    e += [*gl.layer_norm_entries("to_text_non_attn_cond.0", cd), *gl.linear_entries("to_text_non_attn_cond.1", t, cd),
          *gl.linear_entries("to_text_non_attn_cond.3", t, t)]
    gca = cfg.use_global_context_attn
    e += resnet_entries("init_resnet_block", d, d, cfg, gca=gca)
    dims = [d] + [d * m for m in cfg.dim_mults]
    in_out = list(zip(dims[:-1], dims[1:]))
    for k, ((a, b), cross) in enumerate(zip(in_out, cfg.layer_cross_attns)):
        e += gl.conv2d_entries(f"downs.{k}.0.1", b, 4 * a, 1) + resnet_entries(f"downs.{k}.1", b, b, cfg, cross=cross)
        for i in range(cfg.num_resnet_blocks):
            e += resnet_entries(f"downs.{k}.2.{i}", b, b, cfg, gca=gca)
    for k, ((a, b), cross) in enumerate(zip(reversed(in_out), reversed(cfg.layer_cross_attns))):
        e += resnet_entries(f"ups.{k}.0", 2 * b, b, cfg, cross=cross)
        for i in range(cfg.num_resnet_blocks):
            e += resnet_entries(f"ups.{k}.1.{i}", 2 * b, b, cfg, gca=gca)
        e += gl.conv2d_entries(f"ups.{k}.3.net.0", 4 * a, b, 1)
    mid = dims[-1]
    e += resnet_entries("mid_block1", mid, mid, cfg, cross=True) + resnet_entries("mid_block2", mid, mid, cfg, cross=True)
    e += resnet_entries("final_res_block", d, d, cfg, gca=True)
    return e + gl.conv2d_entries("final_conv", cfg.channels, d + cfg.channels, cfg.final_conv_kernel_size)


def superres_manifest(cfg: UNetConfig) -> list[Entry]:
    """`Superres((NullUnet(), Unet)).state_dict()` keys: 448 at the paper size."""
    return [Entry("unets.0.dummy_parameter", (1,), "param", 0.0)] + [
        dataclasses.replace(e, key=UNET_PREFIX + e.key) for e in unet_manifest(cfg)]


# --- export --------------------------------------------------------------------------------------
def _flat(model_or_state: Any) -> dict[str, np.ndarray]:
    tree = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    flat = flatten_state(to_pure(tree))
    return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def to_generatect(model_or_state: Any, cfg: UNetConfig) -> "OrderedDict[str, np.ndarray]":
    """GenerateCT `Unet.state_dict()` (float32 numpy, manifest order) of a ctgen UNet or its params."""
    manifest = unet_manifest(cfg)
    converted, _ = convert(_flat(model_or_state), unet_rules(), direction="to_foreign",
                           expected_shapes={e.key: e.shape for e in manifest})
    return OrderedDict((e.key, np.ascontiguousarray(converted[e.key], np.float32)) for e in manifest)


def superres_state_dict(unet_sd: Mapping[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
    """A `Unet` state_dict as `Superres((NullUnet(), unet)).state_dict()`."""
    out = OrderedDict([("unets.0.dummy_parameter", np.zeros((1,), np.float32))])
    out.update((UNET_PREFIX + k, v) for k, v in unet_sd.items())
    return out


def trainer_checkpoint(model_sd: Mapping[str, np.ndarray], ema_sd: Mapping[str, np.ndarray], *, steps: int,
                       time_elapsed: float = 0.0) -> dict[str, Any]:
    """GenerateCT's trainer checkpoint (see module docstring) from the live (`model_sd`) and the
    averaged (`ema_sd`) `Unet` state_dicts: `model` holds the live weights, `ema.1.ema_model` the
    averaged ones that GenerateCT samples with. No optimizer state (GenerateCT's loader then
    starts a fresh optimizer)."""
    dummy = np.zeros((1,), np.float32)
    ema: OrderedDict[str, np.ndarray] = OrderedDict([
        ("0.initted", np.array(False)), ("0.step", np.array(0, np.int64)),
        ("0.online_model.dummy_parameter", dummy), ("0.ema_model.dummy_parameter", dummy),
        ("1.initted", np.array(True)), ("1.step", np.array(steps, np.int64))])
    ema.update((ONLINE_PREFIX + k, v) for k, v in model_sd.items())
    ema.update((EMA_PREFIX + k, v) for k, v in ema_sd.items())
    return {"model": superres_state_dict(model_sd), "steps": np.array([0, steps], np.int64),
            "time_elapsed": float(time_elapsed), "ema": ema}


# --- import --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Selected:
    """The `Unet` weights found in a file, and which of its copies they are."""

    state_dict: dict[str, Any]
    which: str  # "ema" | "model" | "unet"
    steps: int | None = None


def select_unet_weights(obj: Mapping[str, Any], source: str = "checkpoint", *, prefer_ema: bool = True) -> Selected:
    """The U-Net's state_dict out of any of the layouts in the module docstring: the trainer
    checkpoint's EMA weights (unless `prefer_ema` is False or it has none), else its live ones."""
    steps = None
    if isinstance(obj.get("model"), Mapping):  # a trainer checkpoint
        if "steps" in obj:
            steps = int(np.sum(np.asarray(obj["steps"])))
        ema = obj.get("ema")
        if prefer_ema and isinstance(ema, Mapping) and any(str(k).startswith(EMA_PREFIX) for k in ema):
            return Selected({k[len(EMA_PREFIX):]: v for k, v in ema.items() if k.startswith(EMA_PREFIX)}, "ema", steps)
        obj = obj["model"]
        which = "model"
    else:
        which = "unet"
    if any(str(k).startswith(EMA_PREFIX) for k in obj):  # an EMA ModuleList state_dict on its own
        return Selected({k[len(EMA_PREFIX):]: v for k, v in obj.items() if k.startswith(EMA_PREFIX)}, "ema", steps)
    if any(str(k).startswith(UNET_PREFIX) for k in obj):
        return Selected({k[len(UNET_PREFIX):]: v for k, v in obj.items() if k.startswith(UNET_PREFIX)},
                        "model" if which == "model" else "superres", steps)
    if "init_conv.convs.0.weight" in obj:
        return Selected(dict(obj), which, steps)
    raise UserError(f"{source}: no GenerateCT SR U-Net weights found (neither a trainer checkpoint, `unets.1.*`, "
                    f"`1.ema_model.*` nor `Unet` keys; first keys: {list(obj)[:5]})")


def infer_config(sd: Mapping[str, Any], **overrides: Any) -> UNetConfig:
    """The architecture from `Unet` state_dict shapes. GroupNorm's group count is not in the
    weights: 8 (GenerateCT's) unless overridden."""
    def shape(key):
        try:
            return tuple(sd[key].shape)
        except KeyError:
            raise UserError(f"not a GenerateCT SR U-Net state_dict: missing {key}") from None

    convs = sorted({int(k.split(".")[2]) for k in sd if k.startswith("init_conv.convs.")})
    kernels = tuple(shape(f"init_conv.convs.{i}.weight")[-1] for i in convs)
    dim = sum(shape(f"init_conv.convs.{i}.weight")[0] for i in convs)
    stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("downs.")})
    widths = [shape(f"downs.{k}.0.1.weight")[0] for k in stages]
    cond_dim = shape("norm_cond.weight")[0]
    dim_head = shape("mid_block1.cross_attn.null_kv")[1]
    heads = shape("mid_block1.cross_attn.to_q.weight")[0] // dim_head
    blocks = len({k.split(".")[3] for k in sd if k.startswith("downs.0.2.")})
    layers = len({k.split(".")[2] for k in sd if k.startswith("attn_pool.layers.")})
    cfg = UNetConfig(
        dim=dim, dim_mults=tuple(w // dim for w in widths), channels=shape("final_conv.weight")[0],
        num_resnet_blocks=blocks, layer_cross_attns=tuple(f"downs.{k}.1.cross_attn.null_kv" in sd for k in stages),
        cond_dim=cond_dim, text_embed_dim=shape("text_to_cond.weight")[1], max_text_len=shape("null_text_embed")[1],
        num_time_tokens=shape("to_time_tokens.0.weight")[0] // cond_dim,
        learned_sinu_dim=2 * shape("to_time_hiddens.0.weights")[0], attn_heads=heads, attn_dim_head=dim_head,
        init_cross_embed_kernel_sizes=kernels, attn_pool_num_latents=shape("attn_pool.latents")[0],
        attn_pool_num_mean_pooled=shape("attn_pool.to_latents_from_mean_pooled_seq.1.weight")[0] // cond_dim,
        attn_pool_depth=layers, attn_pool_max_seq_len=shape("attn_pool.pos_emb.weight")[0],
        attn_pool_ff_mult=shape("attn_pool.layers.0.1.1.weight")[0] / cond_dim,
        use_global_context_attn="downs.0.2.0.gca.to_k.weight" in sd or blocks == 0,
        final_conv_kernel_size=shape("final_conv.weight")[-1])
    return dataclasses.replace(cfg, **overrides)


@dataclasses.dataclass
class ImportResult:
    config: UNetConfig
    params: nnx.State
    report: Report
    which: str  # which copy of the weights was read: "ema", "model", "superres" or "unet"
    steps: int | None
    graphdef: nnx.GraphDef = dataclasses.field(repr=False, compare=False)

    def model(self) -> UNet:
        return nnx.merge(self.graphdef, self.params)


def from_generatect(sd: Mapping[str, Any], cfg: UNetConfig | None = None, *, source: str = "state_dict",
                    mesh: Mesh | None = None, rules=None, which: str = "unet",
                    steps: int | None = None) -> ImportResult:
    """ctgen UNet parameters from a GenerateCT `Unet` state_dict (see `select_unet_weights` for the
    other layouts), placed on `mesh` by their logical axes if given."""
    cfg = cfg or infer_config(sd)
    graphdef, abstract = abstract_model(lambda r: UNet(cfg, rngs=r), mesh=mesh, rules=rules)
    expected = {k: tuple(v.shape) for k, v in flatten_state(to_pure(abstract)).items()}
    try:
        flat, report = convert(sd, unet_rules(), direction="to_ours", expected_shapes=expected)
    except ConversionError as err:
        raise UserError(f"{source} does not match a SR U-Net with {cfg}:\n{err}") from err
    return ImportResult(cfg, place(abstract, unflatten_state(flat)), report, which, steps, graphdef)
