"""GenerateCT's whole cascade (T5 -> MaskGITTransformer.sample -> CT-ViT decode -> Superres.sample per
slice) from a user's local checkout, on the CPU with random weights: for benchmarks only.

Nothing of GenerateCT is copied here; its own modules and sampling loops run. On top of the CPU
adaptations of `generatect_runtime` and `generatect_superres_runtime` (imported, unchanged):
- its real text modules `transformer_maskgit.t5` and `super_resolution.t5` are imported (the
  parity runtimes replace them by stand-ins that refuse text), and the encoder and tokenizer they
  would download from the hub are put into their own cache (`T5_CONFIGS[name]`) under a local name
  first: a `transformers.T5EncoderModel` of the wanted shape (ctgen's built-in T5 read from its
  Hugging Face-format directory, or T5 v1.1 base with random weights) and the SentencePiece
  tokenizer of ctgen's built-in T5. So `MaskGITTransformer.sample(texts=...)` encodes the prompt,
  and `Superres.sample(texts=...)` encodes it again for every slice, as GenerateCT's scripts do;
- `Unet`'s default argument `text_embed_dim=get_encoded_dim('google/t5-v1_1-base')`, evaluated when
  superres_pytorch is imported, would read that model's config from the hub: the cache answers it
  with 768, T5 v1.1 base's width (as the parity runtime's stand-in does);
- transformers 5 removed `batch_encode_plus`, which GenerateCT's t5.py calls: the cached
  tokenizer answers it with `__call__` (what transformers 4 did for a list of texts).

    casc = build_cascade(ctvit_cfg, maskgit_cfg, unet_cfg, text=text_model("builtin"), steps=18, sr_steps=25)
    video = casc.transformer.sample(texts=prompt, num_frames=17, cond_scale=5.0)     # (1, 1, F, h, w)
    slice = casc.superres.sample(texts=[prompt], start_image_or_video=x, start_at_unet_number=2,
                                 cond_scale=1.0, use_tqdm=False)                      # (1, 1, H, W)
"""
from __future__ import annotations

import importlib
import os
import sys
import types

import generatect_runtime as ctvit_rt
import generatect_superres_runtime as sr_rt

ENV = ctvit_rt.ENV
NEEDS = ("transformers", "sentencepiece")


def skip_reason() -> str | None:
    """Why GenerateCT's cascade cannot run here (None if it can)."""
    for reason in (ctvit_rt.skip_reason(), sr_rt.skip_reason()):
        if reason:
            return reason
    for mod in NEEDS:
        try:
            importlib.import_module(mod)
        except ImportError:
            return f"GenerateCT's text encoding needs `{mod}` (pip install transformers sentencepiece)"
    return None


class _Tokenizer:
    """A transformers tokenizer that also answers GenerateCT's `batch_encode_plus` (removed in transformers 5)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def batch_encode_plus(self, texts, **kwargs):
        return self._tokenizer(list(texts), **kwargs)


def _import_text_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """GenerateCT's own `transformer_maskgit.t5` and `super_resolution.t5` (before the parity
    runtimes would register their stand-ins)."""
    ctvit_rt.load()  # the transformer_maskgit namespace package (no __init__)
    mg_t5 = sys.modules.get("transformer_maskgit.t5")
    if mg_t5 is None or not hasattr(mg_t5, "T5_CONFIGS"):
        sys.modules.pop("transformer_maskgit.t5", None)
        mg_t5 = importlib.import_module("transformer_maskgit.t5")
    if "super_resolution" not in sys.modules:
        stub = types.ModuleType("super_resolution")
        stub.__path__ = [os.path.join(ctvit_rt.checkout_dir(), "super_resolution", "super_resolution")]
        sys.modules["super_resolution"] = stub
    sr_t5 = sys.modules.get("super_resolution.t5")
    if sr_t5 is None or not hasattr(sr_t5, "T5_CONFIGS"):
        if "super_resolution.superres_pytorch" in sys.modules:
            raise RuntimeError("GenerateCT's superres_pytorch was imported with the parity T5 stand-in; "
                               "build the cascade in a fresh process")
        sys.modules.pop("super_resolution.t5", None)
        sr_t5 = importlib.import_module("super_resolution.t5")
    for mod in (mg_t5, sr_t5):  # the import-time default of Unet(text_embed_dim=...): no hub access
        mod.T5_CONFIGS.setdefault(mod.DEFAULT_T5_NAME, {"config": types.SimpleNamespace(d_model=768)})
    return mg_t5, sr_t5


def text_model(kind: str, builtin_dir: str, seed: int = 0):
    """(local name, transformers T5EncoderModel, tokenizer): `kind` "builtin" reads ctgen's built-in
    T5 (a Hugging Face-format directory, the same weights ctgen's demo uses); "base" is T5 v1.1
    base's shape with random weights. The tokenizer is the built-in SentencePiece model either way."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(builtin_dir)
    if kind == "builtin":
        return builtin_dir, T5EncoderModel.from_pretrained(builtin_dir).eval(), tokenizer
    if kind != "base":
        raise ValueError(f"unknown text model {kind!r}; use 'builtin' or 'base'")
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, dropout_rate=0.0,
                   tie_word_embeddings=False)
    return "ctgen-random-t5-v1_1-base", T5EncoderModel(cfg).eval(), tokenizer


def install_text_model(name: str, model, tokenizer) -> None:
    """Put the encoder into both of GenerateCT's T5 caches under `name` (no hub access)."""
    for mod in _import_text_modules():
        mod.T5_CONFIGS[name] = {"model": model, "tokenizer": _Tokenizer(tokenizer), "config": model.config}


def unet_kwargs(cfg) -> tuple[dict, list[str]]:
    """GenerateCT `Unet` arguments for a ctgen `UNetConfig` (superres.yaml's fixed choices for the
    rest), and the differences GenerateCT's Unet cannot express (it hard-codes them)."""
    kw = dict(dim=cfg.dim, dim_mults=tuple(cfg.dim_mults), channels=cfg.channels,
              num_resnet_blocks=cfg.num_resnet_blocks,
              layer_cross_attns=tuple(cfg.layer_cross_attns), cond_dim=cfg.cond_dim, text_embed_dim=cfg.text_embed_dim,
              max_text_len=cfg.max_text_len, num_time_tokens=cfg.num_time_tokens,
              learned_sinu_pos_emb_dim=cfg.learned_sinu_dim, attn_heads=cfg.attn_heads, attn_dim_head=cfg.attn_dim_head,
              resnet_groups=cfg.resnet_groups, init_cross_embed_kernel_sizes=tuple(cfg.init_cross_embed_kernel_sizes),
              attn_pool_num_latents=cfg.attn_pool_num_latents, use_global_context_attn=cfg.use_global_context_attn,
              scale_skip_connection=cfg.scale_skip_connection, final_conv_kernel_size=cfg.final_conv_kernel_size,
              use_linear_attn=False, layer_attns=False, attend_at_middle=False, use_linear_cross_attn=False,
              memory_efficient=True)
    fixed = {"attn_pool_num_mean_pooled": 4, "attn_pool_depth": 2, "attn_pool_max_seq_len": 512,
             "attn_pool_ff_mult": 4.0, "residual": False, "dtype": "float32"}
    notes = [f"{k}={getattr(cfg, k)} (GenerateCT: {v})" for k, v in fixed.items() if getattr(cfg, k) != v]
    return kw, notes


def build_cascade(ctvit_cfg, maskgit_cfg, unet_cfg, *, text_name: str, lowres: int, size: int, steps: int,
                  sr_steps: int, seed: int = 0) -> types.SimpleNamespace:
    """GenerateCT's `MaskGITTransformer(ctvit, maskgit, steps)` and `Superres((NullUnet(), Unet), ...)`
    as inference_transformer.py / inference_superres.py + superres_inference.yaml build them, with
    the architectures of ctgen configs, `steps` MaskGIT and `sr_steps` SR steps, random weights.
    Call `install_text_model` first (the text width is read from its cache)."""
    _import_text_modules()
    mg = ctvit_rt.load_maskgit()
    ctvit = ctvit_rt.build_reference(ctvit_cfg, seed=seed)
    maskgit = ctvit_rt.build_maskgit_reference(maskgit_cfg, seed=seed + 1)
    transformer = mg.MaskGITTransformer(ctvit=ctvit, maskgit=maskgit, steps=steps, t5_name=text_name).eval()
    ref = sr_rt.load()
    ref.torch.manual_seed(seed + 2)
    kw, notes = unet_kwargs(unet_cfg)
    unet = ref.sr.Unet(**kw, lowres_cond=False)  # Superres recasts the second U-Net with lowres_cond=True
    superres = ref.sr.Superres(unets=(ref.sr.NullUnet(), unet), image_sizes=[lowres, size], channels=1,
                               timesteps=[sr_steps, sr_steps], condition_on_text=True, random_crop_sizes=[None, None],
                               pred_objectives="v", lowres_sample_noise_level=0.1, text_encoder_name=text_name,
                               text_embed_dim=unet_cfg.text_embed_dim).eval()
    return types.SimpleNamespace(transformer=transformer, superres=superres, torch=ref.torch, unet_notes=notes)


def _timed_attribute(obj, name: str, totals: dict, key: str) -> None:
    """Replace `obj.name` (a bound method or a callable attribute) by a wrapper adding its seconds to `totals[key]`."""
    import time

    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def timed_run(casc: types.SimpleNamespace, prompt: str, *, slices: int, cond_scale: float = 5.0,
              sr: bool = True, seed: int = 0) -> dict:
    """One pass of GenerateCT's cascade over `prompt`: its `MaskGITTransformer.sample` (text encoding,
    guided decode, CT-ViT decode), then `Superres.sample` one slice at a time, as inference_superres.py
    calls it (the low-res slice in [0, 1] as its data loader reads the saved volume: (x + 1) / 2;
    the prompt encoded again per slice; guidance 1). Seconds per stage; the MaskGIT sampling is
    `sample` minus its text encoding and CT-ViT decode, which are timed by wrapping them."""
    import time

    torch = casc.torch
    torch.manual_seed(seed)
    t = casc.transformer
    totals = {"text": 0.0, "ctvit_decode": 0.0, "superres_text": 0.0}
    _timed_attribute(t, "encode_texts", totals, "text")
    _timed_attribute(t.ctvit, "decode_from_codebook_indices", totals, "ctvit_decode")
    _timed_attribute(casc.superres, "encode_text", totals, "superres_text")
    start = time.perf_counter()
    video = t.sample(texts=prompt, num_frames=slices, cond_scale=cond_scale)  # (1, 1, F, h, w)
    total = time.perf_counter() - start
    seconds = {"text": totals["text"], "maskgit": total - totals["text"] - totals["ctvit_decode"],
               "ctvit_decode": totals["ctvit_decode"]}
    shape = list(video.shape[2:])
    if sr:
        lowres = (video[0].permute(1, 0, 2, 3) + 1) / 2  # (F, 1, h, w)
        start = time.perf_counter()
        out = [casc.superres.sample(texts=[prompt], start_image_or_video=lowres[k:k + 1], start_at_unet_number=2,
                                    cond_scale=1.0, use_tqdm=False) for k in range(lowres.shape[0])]
        seconds["superres"] = time.perf_counter() - start
        shape = [len(out), *out[0].shape[2:]]
    return {"seconds": seconds, "superres_text_seconds": totals["superres_text"], "shape": shape}
