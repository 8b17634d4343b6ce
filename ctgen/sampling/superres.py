"""Super-resolution of slices and whole volumes with the SR U-Net (GenerateCT's stage 3 sampling).

    model, info = ctgen.convert.superres_store.load_superres("runs/superres")   # EMA weights if kept
    hires_DxHxW = upsample_volume(model, lowres_DxHxW, text_LxE, text_mask_L, mesh=mesh, rng=0)
    hu = ctgen.volume.sr_to_hu(hires_DxHxW)

Conditioning as in GenerateCT's `Superres.sample`: the low-res slice (values in [0, 1]) is
upsampled by nearest neighbour to the output size, mapped to [-1, 1] and noised to the
augmentation level `noise_level` (0.1) of the linear schedule; the sampler starts from noise and
returns the slice in [0, 1]. A U-Net with `cfg.residual` generates the residual over the bicubic
upsampling of the clean low-res slice instead, and the sampler adds that upsampling back
(`UNetConfig.residual`). Every slice draws its noise (start, steps, low-res augmentation) from
its own key, fold_in(fold_in(rng, volume index), slice index), so the result does not depend on
how slices are batched. Slices of all volumes are batched together, split over the mesh's batch
axes; the sampling loop is compiled once per batch shape (the last batch is padded).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ctgen.errors import UserError
from ctgen.models.unet import UNet
from ctgen.parallel import axes as axes_lib
from ctgen.parallel.mesh import batch_shards
from ctgen.sampling import diffusion as df
from ctgen.volume import model_to_sr, sr_to_hu

log = logging.getLogger(__name__)

SAMPLERS = ("ancestral", "ddim")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """sampler: "ancestral" (GenerateCT's: 25 steps) or "ddim" (deterministic, fewer steps).
    noise_level: low-res augmentation time at sampling (GenerateCT: 0.1).
    cond_scale: classifier-free guidance scale (GenerateCT samples with 1: no guidance).
    threshold: dynamic-thresholding percentile (GenerateCT: 0.95); 0 clips x0 to [-1, 1].
    average: independent samples drawn per slice and averaged (beyond GenerateCT; 1 = one sample).
      The mean of K samples approaches the conditional mean of the slice: flatter tissue (the
      sampler's blotches average out) at K times the compute and memory of a batch."""

    sampler: str = "ancestral"
    steps: int = 25
    noise_level: float = 0.1
    cond_scale: float = 1.0
    threshold: float = 0.95
    average: int = 1

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise UserError(f"sampler steps must be >= 1, got {self.steps}")
        if self.average < 1:
            raise UserError(f"average (samples per slice) must be >= 1, got {self.average}")


def nearest_upsample(x_BxhxwxC: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode="nearest"): output pixel i reads input pixel floor(i * in / out)."""
    _, h, w, _ = x_BxhxwxC.shape
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return x_BxhxwxC[:, rows][:, :, cols]


def bicubic_upsample(lowres_Bxhxw: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bicubic (Keys, a = -0.5) upsampling of slices in [0, 1], clipped to [0, 1]: the baseline the
    SR is measured against, and the base a residual U-Net (`UNetConfig.residual`) adds to."""
    out = jax.image.resize(lowres_Bxhxw.astype(jnp.float32), (lowres_Bxhxw.shape[0], *size), method="cubic")
    return jnp.clip(out, 0.0, 1.0)


def diffusion_x0(hires_BxHxW: jax.Array, lowres_Bxhxw: jax.Array, residual: bool) -> jax.Array:
    """What the diffusion generates, (B, H, W, 1) within [-1, 1], from slices in [0, 1]: the slice
    mapped to [-1, 1] (GenerateCT), or with `residual` the slice minus the bicubic upsampling of the
    clean low-res slice, in [0, 1] units."""
    hires = hires_BxHxW.astype(jnp.float32)
    if residual:
        base = bicubic_upsample(jnp.clip(lowres_Bxhxw.astype(jnp.float32), 0.0, 1.0), hires.shape[1:])
        return (hires - base)[..., None]
    return (hires * 2.0 - 1.0)[..., None]


def slices_from_x0(x0_BxHxWx1: jax.Array, lowres_Bxhxw: jax.Array, residual: bool) -> jax.Array:
    """Inverse of `diffusion_x0`: slices (B, H, W) in [0, 1]."""
    if residual:
        base = bicubic_upsample(jnp.clip(lowres_Bxhxw.astype(jnp.float32), 0.0, 1.0), x0_BxHxWx1.shape[1:3])
        return jnp.clip(base + x0_BxHxWx1[..., 0], 0.0, 1.0)
    return (x0_BxHxWx1[..., 0] + 1.0) * 0.5


def lowres_condition(lowres_Bxhxw: jax.Array, size: tuple[int, int], noise_BxHxWx1: jax.Array,
                     level_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(noised upsampled low-res image (B, H, W, 1) in [-1, 1] space, its log-SNR (B,)) from
    low-res slices in [0, 1] at augmentation times `level_B` of the linear schedule."""
    up = nearest_upsample(lowres_Bxhxw[..., None].astype(jnp.float32), size) * 2.0 - 1.0
    log_snr = df.linear_log_snr(level_B)
    return df.q_sample(up, log_snr, noise_BxHxWx1), log_snr


def sample_slices(model: UNet, lowres_Bxhxw: jax.Array, text_BxLxE: jax.Array, text_mask_BxL: jax.Array,
                  keys_B: jax.Array, size: tuple[int, int], cfg: SamplerConfig = SamplerConfig()) -> jax.Array:
    """Super-resolved slices (B, H, W) in [0, 1] (jit-able); see the module docstring. With
    `cfg.average` K > 1, slice b is the mean of K samples drawn with keys fold_in(keys_B[b], k)."""
    k = cfg.average
    if k > 1:
        keys_BK = jax.vmap(lambda key: jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(k)))(keys_B)
        # rows b0 k0, b0 k1, ..., b1 k0, ...: each input repeated K times in place, as the keys
        lowres_K, text_K, mask_K = (jnp.repeat(x, k, axis=0) for x in (lowres_Bxhxw, text_BxLxE, text_mask_BxL))
        out = sample_slices(model, lowres_K, text_K, mask_K, keys_BK.reshape(-1, keys_BK.shape[-1]), size,
                            dataclasses.replace(cfg, average=1))
        return out.reshape(lowres_Bxhxw.shape[0], k, *size).mean(axis=1)
    b = lowres_Bxhxw.shape[0]
    shape = (*size, model.cfg.channels)
    low_keys, sample_keys = jax.vmap(lambda k: jax.random.split(k))(keys_B).transpose(1, 0, 2)
    low_noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(low_keys)
    lowres, lowres_log_snr = lowres_condition(lowres_Bxhxw, size, low_noise, jnp.full((b,), cfg.noise_level))
    text_mask = text_mask_BxL.astype(bool)

    def denoise(keep):
        def fn(x, log_snr):
            return model(x, log_snr, lowres, lowres_log_snr, text_BxLxE, text_mask, jnp.full((b,), keep))
        return fn

    den = df.guided(denoise(True), denoise(False), cfg.cond_scale)
    x_T, step_noise = df.per_sample_noise(sample_keys, shape)
    threshold = cfg.threshold or None
    if cfg.sampler == "ancestral":
        x0 = df.sample_ancestral(den, x_T, step_noise, steps=cfg.steps, threshold=threshold)
    else:
        x0 = df.sample_ddim(den, x_T, steps=cfg.steps, threshold=threshold)
    return slices_from_x0(x0, lowres_Bxhxw, model.cfg.residual)


def slice_keys(rng: jax.Array, volume_indices: np.ndarray, slice_indices: np.ndarray) -> jax.Array:
    """Per-slice keys fold_in(fold_in(rng, volume index), slice index), (n, 2) uint32."""
    def one(v, s):
        return jax.random.fold_in(jax.random.fold_in(rng, v), s)

    return jax.vmap(one)(jnp.asarray(volume_indices, jnp.uint32), jnp.asarray(slice_indices, jnp.uint32))


class SliceSampler:
    """The sampling loop of a U-Net jitted for a SamplerConfig, an output size and a mesh. Build it
    once and pass it to `upsample_volumes(..., slice_sampler=...)` for many volumes: it compiles once
    per batch shape and measures its memory once per shape."""

    def __init__(self, model: UNet, cfg: SamplerConfig, size: tuple[int, int], mesh: Mesh | None, rules):
        self.graphdef, state = nnx.split(model)
        self.mesh, self.rules, self.size, self.cfg = mesh, tuple(rules or axes_lib.DEFAULT_RULES), size, cfg
        if mesh is not None:  # 22 M parameters: replicated, the batch is what is split
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        self.state = state
        self.shards = batch_shards(mesh, self.rules)
        self._bytes: dict[tuple, int | None] = {}
        self._compiled: dict[tuple, Any] = {}
        self.compile_seconds = 0.0  # ahead-of-time compilation, apart from sampling

        def run(state, lowres, text, mask, keys):
            with axes_lib.activation_sharding(mesh, self.rules):
                return sample_slices(nnx.merge(self.graphdef, state), lowres, text, mask, keys, size, cfg)

        self.fn = jax.jit(run)

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        names = ("batch",) + (None,) * (x.ndim - 1)
        return jax.device_put(x, axes_lib.logical_sharding(names, x.shape, self.rules, self.mesh))

    def _spec(self, shape, dtype) -> jax.ShapeDtypeStruct:
        sharding = None
        if self.mesh is not None:
            names = ("batch",) + (None,) * (len(shape) - 1)
            sharding = axes_lib.logical_sharding(names, shape, self.rules, self.mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def compiled(self, specs: Sequence[jax.ShapeDtypeStruct]):
        """The executable for arguments of these shapes (compiled once per shape, ahead of time, its
        time added to `compile_seconds`)."""
        key = tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in specs)
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = self.fn.lower(self.state, *specs).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]

    def __call__(self, lowres, text, mask, keys) -> np.ndarray:
        args = [self._put(np.asarray(a)) for a in (lowres, text, mask, jax.device_get(keys))]
        run = self.compiled([self._spec(a.shape, a.dtype) for a in args])
        return np.asarray(jax.device_get(run(self.state, *args)))

    def bytes_per_batch(self, batch: int, lowres_hw, text_le) -> int | None:
        """XLA's temporary memory of one call at `batch` (per device), or None if unknown."""
        key = (batch, tuple(lowres_hw), tuple(text_le))
        if key not in self._bytes:
            self._bytes[key] = self._measure(batch, lowres_hw, text_le)
        return self._bytes[key]

    def _measure(self, batch: int, lowres_hw, text_le) -> int | None:
        shapes = [self._spec((batch, *lowres_hw), jnp.float32), self._spec((batch, *text_le), jnp.float32),
                  self._spec((batch, text_le[0]), jnp.bool_), self._spec((batch, 2), jnp.uint32)]
        try:
            stats = self.compiled(shapes).memory_analysis()
        except Exception:  # memory analysis is not available on every backend
            return None
        return None if stats is None else int(stats.temp_size_in_bytes + stats.argument_size_in_bytes)


def _available_bytes() -> int:
    """Free memory of the first local device (accelerators), or of the host (CPU devices share it)."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free // max(jax.local_device_count(), 1))


def choose_batch(sampler: SliceSampler, total: int, lowres_hw, text_le, fraction: float = 0.6) -> int:
    """The largest batch (a multiple of the batch shards, at most the rounded-up slice count) whose
    sampling loop fits `fraction` of the free memory, measured by compiling it at one slice per
    device."""
    shards = sampler.shards
    cap = math.ceil(total / shards) * shards
    per_device = sampler.bytes_per_batch(shards, lowres_hw, text_le)
    if not per_device:
        return min(cap, shards)
    fit = int(_available_bytes() * fraction // per_device)
    batch = max(1, fit) * shards
    log.info("SR sampling: %.2f GB per slice per device, batch %d", per_device / 1e9, min(batch, cap))
    return min(batch, cap)


def upsample_volumes(model: UNet, volumes: Sequence[np.ndarray], texts: Sequence[np.ndarray],
                     text_masks: Sequence[np.ndarray], *, mesh: Mesh | None = None, rules=None, rng: int | jax.Array = 0,
                     sampler: SamplerConfig = SamplerConfig(), batch: int = 0, scale: int = 4,
                     input_range: str = "sr", output_range: str = "sr", progress: bool = True,
                     slice_sampler: SliceSampler | None = None) -> list[np.ndarray]:
    """Super-resolve every slice of several volumes; returns one (D, scale h, scale w) array each.

    volumes: (D, h, w) low-res volumes; input_range "sr" = values in [0, 1], "model" = [-1, 1]
      (the CT-ViT's output, converted with `ctgen.volume.model_to_sr`).
    texts, text_masks: each volume's text embedding (L, E) and mask (L,) (True at real tokens).
    batch: slices per sampling call over all devices (a multiple of the mesh's batch shards);
      0 chooses the largest that fits the free memory.
    output_range: "sr" ([0, 1]) or "hu" (`ctgen.volume.sr_to_hu`).
    slice_sampler: a `SliceSampler` of `model` built earlier for the same sampler settings, output
      size and mesh (reused across calls: no recompilation); default: a new one.
    """
    if input_range not in ("sr", "model") or output_range not in ("sr", "hu"):
        raise UserError(f"input_range must be sr|model and output_range sr|hu, got {input_range}, {output_range}")
    if not (len(volumes) == len(texts) == len(text_masks)):
        raise UserError(f"{len(volumes)} volumes but {len(texts)} texts and {len(text_masks)} masks")
    vols = [model_to_sr(v) if input_range == "model" else np.asarray(v, np.float32) for v in volumes]
    hw = {v.shape[1:] for v in vols}
    lengths = {t.shape for t in texts}
    if len(hw) != 1 or len(lengths) != 1 or any(v.ndim != 3 for v in vols):
        raise UserError(f"volumes must be (D, h, w) with one slice size and texts of one shape; got slice sizes "
                        f"{sorted(hw)}, text shapes {sorted(lengths)}")
    (h, w), (length, width) = hw.pop(), lengths.pop()
    size = (h * scale, w * scale)
    if size[0] % model.cfg.downsample_factor or size[1] % model.cfg.downsample_factor:
        raise UserError(f"output size {size} must be divisible by {model.cfg.downsample_factor}")
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    run = slice_sampler or SliceSampler(model, sampler, size, mesh, rules)
    if run.size != size or run.cfg != sampler or run.mesh is not mesh:
        raise ValueError(f"slice_sampler was built for size {run.size}, {run.cfg}, another mesh; this call needs "
                         f"size {size}, {sampler}")
    # (volume, slice) of every slice, in order
    index = np.array([(v, s) for v, vol in enumerate(vols) for s in range(vol.shape[0])], np.int64).reshape(-1, 2)
    total = len(index)
    if batch <= 0:
        batch = choose_batch(run, total, (h, w), (length, width))
    if batch % run.shards:
        raise UserError(f"batch {batch} must be a multiple of the {run.shards} batch shards of the mesh")
    outs = [np.empty((v.shape[0], *size), np.float32) for v in vols]
    from tqdm import tqdm

    bar = tqdm(total=total, desc="super-resolution", unit="slice", disable=not progress or jax.process_index() != 0)
    for start in range(0, total, batch):
        rows = index[start:start + batch]
        pad = batch - len(rows)
        rows_padded = np.concatenate([rows, np.repeat(rows[-1:], pad, axis=0)]) if pad else rows
        lowres = np.stack([vols[v][s] for v, s in rows_padded])
        text = np.stack([np.asarray(texts[v], np.float32) for v, _ in rows_padded])
        mask = np.stack([np.asarray(text_masks[v], bool) for v, _ in rows_padded])
        keys = slice_keys(key, rows_padded[:, 0], rows_padded[:, 1])
        out = run(lowres, text, mask, keys)
        for (v, s), img in zip(rows, out[: len(rows)]):
            outs[v][s] = img
        bar.update(len(rows))
    bar.close()
    return [sr_to_hu(o) for o in outs] if output_range == "hu" else outs


def upsample_volume(model: UNet, lowres_DxHxW: np.ndarray, text_LxE: np.ndarray, text_mask_L: np.ndarray,
                    **kwargs) -> np.ndarray:
    """`upsample_volumes` for one volume: (D, h, w) -> (D, scale h, scale w)."""
    return upsample_volumes(model, [lowres_DxHxW], [text_LxE], [text_mask_L], **kwargs)[0]
