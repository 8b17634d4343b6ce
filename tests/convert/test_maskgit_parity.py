"""Numeric parity with GenerateCT's PyTorch `MaskGit` / `MaskGITTransformer` (runs only with a local checkout).

    CTGEN_GENERATECT_DIR=/path/to/GenerateCT pytest -s tests/convert/test_maskgit_parity.py

Paper-size models with random weights (1-D parameters moved off their init), random ids including
[MASK], random 768-d text states with padding, at 3, 17 and 33 slices: conditioned logits, and the
guided logits at scale 5 (GenerateCT's `forward_with_cond_scale`, our sampler callback's batched
cond + null forward). Then the other direction: a ctgen export loaded by GenerateCT's strict
`MaskGITTransformer.load` gives the same logits. See tests/reference/generatect_runtime.py for the
runtime CPU adaptations.
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
import generatect_runtime as rt  # noqa: E402

from ctgen.convert import maskgit as mc  # noqa: E402
from ctgen.models.attention_core import choose  # noqa: E402
from ctgen.models.ctvit import CTViT, CTViTConfig  # noqa: E402
from ctgen.models.maskgit import MaskGIT, MaskGITConfig  # noqa: E402
from ctgen.sampling.maskgit import maskgit_tokens_to_logits  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.skipif(rt.skip_reason() is not None, reason=str(rt.skip_reason()))]

SLICES = (3, 17, 33)
TOL = 1e-4
SCALE = 5.0
CFG = MaskGITConfig.paper()


def _grid(slices: int) -> tuple[int, int, int]:
    return (1 + (slices - 1) // 2, 8, 8)


def _perturb_reference(ref, seed: int) -> None:
    torch = rt.load().torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1 and not name.endswith(".1.context_norm.gamma"):  # unused by self-attention
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _inputs(slices: int, seed: int = 0):
    """ids (2, N) with ~30% [MASK]; text states (2, 24, 768) zero beyond each prompt's length
    (GenerateCT's padding) and the matching mask."""
    rng = np.random.default_rng([slices, seed])
    n = int(np.prod(_grid(slices)))
    ids = rng.integers(0, CFG.num_tokens, (2, n))
    ids[rng.uniform(size=ids.shape) < 0.3] = CFG.mask_id
    lengths = (9, 24)
    mask = np.arange(24)[None, :] < np.array(lengths)[:, None]
    ctx = (rng.normal(size=(2, 24, 768)) * mask[..., None]).astype(np.float32)
    return ids, ctx, mask


def _reference_logits(ref, slices: int, ids, ctx, mask):
    torch = rt.load().torch
    kw = dict(video_patch_shape=_grid(slices), context=torch.from_numpy(ctx), text_mask=torch.from_numpy(mask))
    with torch.no_grad():
        x = torch.from_numpy(ids)
        cond = ref(x, **kw).numpy()
        guided = ref.forward_with_cond_scale(x, cond_scale=SCALE, **kw).numpy()
    return cond, guided


_forward = nnx.jit(lambda m, ids, grid, ctx, mask: m(ids, grid, ctx, mask), static_argnums=2)


@nnx.jit(static_argnums=2)
def _guided(model, ids, grid, ctx, mask):
    """What the sampler computes: one batched forward of cond + null rows, then null + s (cond - null)."""
    fn = maskgit_tokens_to_logits(model, grid, ctx, mask)
    b = ids.shape[0]
    logits = fn(jnp.concatenate([ids, ids]), jnp.arange(2 * b) < b)
    return logits[b:] + (logits[:b] - logits[b:]) * SCALE


@pytest.fixture(scope="module")
def from_reference():
    ref = rt.build_maskgit_reference(CFG, seed=0)
    _perturb_reference(ref, 1)
    ref.eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert len(sd) == 168
    result = mc.from_generatect(sd, source="reference MaskGit state_dict")
    assert result.config == CFG and result.report.ok and not result.notes
    return ref, result.model()


@pytest.mark.parametrize("slices", SLICES)
def test_generatect_to_ctgen_logits_and_guided_logits(from_reference, slices):
    ref, model = from_reference
    ids, ctx, mask = _inputs(slices)
    cond_ref, guided_ref = _reference_logits(ref, slices, ids, ctx, mask)
    args = (jnp.asarray(ids), _grid(slices), jnp.asarray(ctx), jnp.asarray(mask))
    cond = np.asarray(_forward(model, *args))
    guided = np.asarray(_guided(model, *args))
    err, err_g = float(np.abs(cond - cond_ref).max()), float(np.abs(guided - guided_ref).max())
    print(f"\n[parity MaskGit] slices={slices:2d} tokens={ids.shape[1]} attention={choose(model.cfg.attention, ids.shape[1], ids.shape[1])} "
          f"logits max|diff|={err:.2e} (max|logit| {np.abs(cond_ref).max():.1f}); guided (scale {SCALE:g}) "
          f"max|diff|={err_g:.2e} (max|logit| {np.abs(guided_ref).max():.1f})")
    assert err <= TOL
    assert err_g <= TOL
    assert np.array_equal(np.argmax(guided, -1), np.argmax(guided_ref, -1))


def test_ctgen_export_loads_strictly_into_generatect_with_the_same_logits(tmp_path):
    ref_mod = rt.load_maskgit()
    model = MaskGIT(CFG, rngs=nnx.Rngs(5))
    rng = np.random.default_rng(6)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and var.ndim == 1:
            var[...] = var[...] + jnp.asarray(0.1 * rng.standard_normal(var.shape), jnp.float32)
    ctvit_cfg = CTViTConfig.paper()
    ctvit = CTViT(ctvit_cfg, rngs=nnx.Rngs(7))
    path = str(tmp_path / "transformer_from_ctgen.pt")
    assert mc.export_maskgit(model, CFG, ctvit, ctvit_cfg, path) == 457
    ref_ctvit = rt.build_reference(ctvit_cfg, seed=8)
    ref = ref_mod.MaskGITTransformer(ctvit=ref_ctvit, maskgit=rt.build_maskgit_reference(CFG, seed=9))
    ref.load(path)  # GenerateCT's own loader: load_state_dict(strict=True)
    ref.eval()
    slices = 17
    ids, ctx, mask = _inputs(slices, seed=1)
    cond_ref, guided_ref = _reference_logits(ref.maskgit, slices, ids, ctx, mask)
    args = (jnp.asarray(ids), _grid(slices), jnp.asarray(ctx), jnp.asarray(mask))
    err = float(np.abs(np.asarray(_forward(model, *args)) - cond_ref).max())
    err_g = float(np.abs(np.asarray(_guided(model, *args)) - guided_ref).max())
    torch = ref_mod.torch
    err_cb = float(np.abs(ref.ctvit.vq._codebook.embed.detach().numpy()[0] - np.asarray(ctvit.vq.embed[...])).max())
    print(f"\n[parity export] ctgen -> GenerateCT strict load: slices={slices} logits max|diff|={err:.2e}, guided "
          f"max|diff|={err_g:.2e}, codebook max|diff|={err_cb:.1e} (torch {torch.__version__})")
    assert err <= TOL and err_g <= TOL and err_cb == 0.0
