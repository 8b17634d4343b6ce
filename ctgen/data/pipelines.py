"""grain input pipelines for the three training stages, over prepared TFDS datasets.

Every pipeline reads `tfds.builder_from_directory(dir).as_data_source(split)` (no TensorFlow),
takes this host's shard (`records[process_index::process_count]`, disjoint across hosts), and
returns a `grain.DatasetIterator` whose `get_state()` / `set_state()` the training loop
checkpoints: a restored iterator yields exactly the batches the original would have. Batches are
dicts of numpy arrays with a leading axis of `global_batch_size // process_count`.

train=True: shuffled with `seed`, reshuffled every epoch, repeating forever, full batches only.
train=False: one pass in record order; every host yields the same number of batches (the last one
padded by repeating a record) and a boolean `valid` marks the real examples.

* `volume_pipeline` (CT-ViT): `volume` float32 (b, D, H, W) in [-1, 1], `prompt`, `source_id`.
* `sr_pipeline` (super-resolution): slice pairs `lowres` (n, h, w) and `hires` (n, H, W) in [0, 1],
  optionally with each slice's `text_embedding` / `text_mask` from a T5 embedding cache.
* `token_pipeline` (MaskGIT): `tokens` int32 (b, T, h, w) with `text_embedding` / `text_mask`
  from a T5 embedding cache, both side datasets joined by `source_id`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from ctgen.data.preprocess import resize_volume
from ctgen.data.side import KeyedSource, as_text, open_split
from ctgen.errors import UserError
from ctgen.volume import clip_hu, hu_to_model, hu_to_sr, model_to_sr

LowResFn = Callable[[Mapping[str, Any], np.ndarray], np.ndarray]
"""(decoded example with `volume` int16 HU (D,H,W) and `source_id`, slice indices (k,)) -> float32 (k, h, w) in [0, 1]."""


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """worker_count: grain worker processes (0: threads of this process); read_threads: threads
    reading batches; prefetch_batches: batches buffered ahead (each holds a full batch of volumes)."""

    worker_count: int = 0
    read_threads: int = 2
    prefetch_batches: int = 2

    @classmethod
    def from_config(cls, data_config) -> "LoaderOptions":
        """From a stage config's `data` section (its worker_count, read_threads, prefetch_batches)."""
        return cls(worker_count=data_config.worker_count, read_threads=data_config.read_threads,
                   prefetch_batches=data_config.prefetch_batches)


def host_batch_size(global_batch_size: int, process_count: int, multiple: int = 1) -> int:
    if global_batch_size < 1 or global_batch_size % (process_count * multiple):
        raise UserError(f"global batch size {global_batch_size} must be a positive multiple of "
                        f"{process_count} processes x {multiple}")
    return global_batch_size // process_count


def _with_valid(ex):
    return ex, True


class _EvalFetch:
    """Index k of this host's padded eval shard -> (record, valid)."""

    def __init__(self, src, process_index: int, process_count: int):
        self.src, self.pi, self.pc = src, process_index, process_count

    def __call__(self, k: int):
        i = self.pi + k * self.pc
        valid = i < len(self.src)
        return self.src[i if valid else self.pi % len(self.src)], valid


def _records(src, *, process_index: int, process_count: int, seed: int, train: bool, batch: int):
    """MapDataset of (record, valid) for this host."""
    import grain

    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    if train:
        if len(src) < process_count:
            raise UserError(f"{len(src)} records cannot be sharded over {process_count} processes")
        ds = grain.MapDataset.source(src)[process_index::process_count]
        return ds.shuffle(seed).repeat(None).map(_with_valid)
    return eval_records(src, process_index=process_index, process_count=process_count, batch=batch)


def eval_records(src, *, process_index: int, process_count: int, batch: int):
    """MapDataset of (record, valid) for one pass over `src` (anything with len and indexing):
    this host's records `process_index::process_count` in order, padded with repeats marked
    invalid to a multiple of the host batch `batch`, so every host yields the same batches."""
    import grain

    n = len(src)
    if n < process_count:
        raise UserError(f"{n} records cannot be sharded over {process_count} processes")
    per_host = math.ceil(n / process_count)
    per_host = math.ceil(per_host / batch) * batch
    return grain.MapDataset.range(per_host).map(_EvalFetch(src, process_index, process_count))


def _absl_flags_parsed(*_args) -> None:
    """grain reads absl flags (parent and spawned workers); outside absl.app they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _finish(ds, batch: int, options: LoaderOptions, post: Callable | None = None):
    import grain

    ds = ds.batch(batch, drop_remainder=True)
    if post is not None:
        ds = ds.map(post)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=options.read_threads,
                                              prefetch_buffer_size=options.prefetch_batches))
    if options.worker_count > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.worker_count, per_worker_buffer_size=1),
                            worker_init_fn=_absl_flags_parsed)
    return iter(it)


def select_slices(vol_DxHxW: np.ndarray, num_slices: int | None, sampling: str, rng: np.random.Generator | None,
                  fill: float = -1000) -> np.ndarray:
    """A `num_slices` window along D: "random" start, or "center"; pads with `fill` (air) if too short."""
    if num_slices is None or vol_DxHxW.shape[0] == num_slices:
        return vol_DxHxW
    D = vol_DxHxW.shape[0]
    if D < num_slices:
        before = (num_slices - D) // 2
        return np.pad(vol_DxHxW, ((before, num_slices - D - before), (0, 0), (0, 0)), constant_values=fill)
    if sampling == "random" and rng is not None:
        start = int(rng.integers(0, D - num_slices + 1))
    elif sampling in ("center", "random"):
        start = (D - num_slices) // 2
    else:
        raise UserError(f"slice sampling must be 'random' or 'center', got {sampling!r}")
    return vol_DxHxW[start:start + num_slices]


class _VolumeElement:
    def __init__(self, num_slices, sampling):
        self.num_slices, self.sampling = num_slices, sampling

    def __call__(self, item, rng):
        ex, valid = item
        vol = select_slices(ex["volume"], self.num_slices, self.sampling, rng)
        return {"volume": hu_to_model(vol), "prompt": as_text(ex["prompt"]), "source_id": as_text(ex["source_id"]),
                "valid": np.bool_(valid)}


def volume_pipeline(data_dir: str, split: str, *, global_batch_size: int, process_index: int = 0,
                    process_count: int = 1, seed: int = 0, num_slices: int | None = None,
                    slice_sampling: str = "random", train: bool = True, options: LoaderOptions = LoaderOptions()):
    """CT-ViT batches: `volume` float32 (b, D, H, W) in [-1, 1], `prompt`, `source_id`, `valid`.

    num_slices: crop / pad every volume to this many slices (must be 1 + 2k for CT-ViT); None
      keeps the prepared count. slice_sampling: "random" window (train) or "center" (always
      centre in eval).
    """
    if num_slices is not None and (num_slices < 1 or num_slices % 2 == 0):
        raise UserError(f"num_slices must be 1 + 2k (CT-ViT: first frame + pairs), got {num_slices}")
    b = host_batch_size(global_batch_size, process_count)
    src = open_split(data_dir, split)
    ds = _records(src, process_index=process_index, process_count=process_count, seed=seed, train=train, batch=b)
    ds = ds.random_map(_VolumeElement(num_slices, slice_sampling if train else "center"), seed=seed)
    return _finish(ds, b, options)


def _text_fields(emb_ex, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A T5 embedding cache entry as (embedding float32 (max_len, E) zero-padded, mask bool (max_len,))."""
    emb = np.asarray(emb_ex["embedding"]).astype(np.float32)
    length = min(int(emb_ex.get("length", emb.shape[0])), emb.shape[0], max_len)
    out_emb = np.zeros((max_len, emb.shape[1]), np.float32)
    out_emb[:length] = emb[:length]
    mask = np.zeros((max_len,), bool)
    mask[:length] = True
    return out_emb, mask


# ----------------------------------------------------------------------------- super-resolution
def downsample_lowres(size_hw: tuple[int, int]) -> LowResFn:
    """The fallback low-res input: the same slices linearly downsampled (anti-aliased) to `size_hw`.

    The paper trains SR on CT-ViT *reconstructions* of the low-res volume; use
    `ReconstructionLowRes` (or your own LowResFn) for that. This default is a plain downsample.
    """
    return _Downsample(tuple(int(s) for s in size_hw))


class _Downsample:
    def __init__(self, size_hw):
        self.size_hw = size_hw

    def __call__(self, ex, idx):
        hu = clip_hu(ex["volume"][idx].astype(np.float32))
        return hu_to_sr(resize_volume(hu, (len(idx),) + self.size_hw))


class ReconstructionLowRes:
    """Low-res slices from a side dataset of CT-ViT reconstructions keyed by `source_id`.

    The side dataset's `field` holds (D, h, w) per volume with the same D as the prepared
    volumes: int16 HU, or float in the model range [-1, 1].
    """

    def __init__(self, side_dir: str, split: str, field: str = "volume"):
        self.side, self.field = KeyedSource(side_dir, split), field

    def __call__(self, ex, idx):
        rec = np.asarray(self.side[as_text(ex["source_id"])][self.field])
        if rec.shape[0] != ex["volume"].shape[0]:
            raise UserError(f"reconstruction of {as_text(ex['source_id'])!r} has {rec.shape[0]} slices, the volume "
                            f"{ex['volume'].shape[0]}")
        sl = rec[idx]
        return hu_to_sr(sl) if np.issubdtype(sl.dtype, np.integer) else model_to_sr(sl)


class _SrElement:
    def __init__(self, k, lowres_fn, train, embeddings: KeyedSource | None = None, max_text_length: int = 256):
        self.k, self.lowres_fn, self.train = k, lowres_fn, train
        self.embeddings, self.max_len = embeddings, max_text_length

    def __call__(self, item, rng):
        ex, valid = item
        D = ex["volume"].shape[0]
        if self.train:
            idx = np.sort(rng.choice(D, size=self.k, replace=D < self.k))
        else:
            idx = np.rint(np.linspace(0, D - 1, self.k)).astype(np.int64)
        sid = as_text(ex["source_id"])
        out = {"hires": hu_to_sr(ex["volume"][idx]), "lowres": np.asarray(self.lowres_fn(ex, idx), np.float32),
               "prompt": np.asarray([as_text(ex["prompt"])] * self.k), "source_id": np.asarray([sid] * self.k),
               "slice_index": idx.astype(np.int32), "valid": np.full((self.k,), bool(valid))}
        if self.embeddings is not None:
            emb, mask = _text_fields(self.embeddings[sid], self.max_len)
            out["text_embedding"] = np.broadcast_to(emb, (self.k, *emb.shape))
            out["text_mask"] = np.broadcast_to(mask, (self.k, *mask.shape))
        return out


def _flatten_slices(batch: dict) -> dict:
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def sr_pipeline(data_dir: str, split: str, *, global_batch_size: int, process_index: int = 0,
                process_count: int = 1, seed: int = 0, slices_per_volume: int = 8,
                lowres_fn: LowResFn | None = None, lowres_size: tuple[int, int] = (128, 128), train: bool = True,
                embeddings_dir: str | None = None, max_text_length: int = 256,
                options: LoaderOptions = LoaderOptions()):
    """SR slice pairs: `hires` float32 (n, H, W), `lowres` float32 (n, h, w), both in [0, 1], plus
    `prompt`, `source_id`, `slice_index`, `valid`; n = global_batch_size // process_count slices,
    `slices_per_volume` from each volume (random in training, evenly spaced in eval).

    lowres_fn: where the low-res input comes from (picklable when options.worker_count > 0).
      Default: `downsample_lowres(lowres_size)`, a plain downsample, not the paper's CT-ViT
      reconstruction (see `ReconstructionLowRes`).
    embeddings_dir: a T5 embedding cache (`ctgen.data.embeddings`) looked up by source_id: adds
      every slice's `text_embedding` float32 (n, L, E) zero-padded to `max_text_length` and
      `text_mask` bool (n, L).
    """
    n = host_batch_size(global_batch_size, process_count, slices_per_volume)
    vols = n // slices_per_volume
    src = open_split(data_dir, split)
    ds = _records(src, process_index=process_index, process_count=process_count, seed=seed, train=train, batch=vols)
    fn = lowres_fn if lowres_fn is not None else downsample_lowres(lowres_size)
    emb = KeyedSource(embeddings_dir, split) if embeddings_dir else None
    ds = ds.random_map(_SrElement(slices_per_volume, fn, train, emb, max_text_length), seed=seed)
    return _finish(ds, vols, options, post=_flatten_slices)


# ----------------------------------------------------------------------------- MaskGIT tokens
class _TokenElement:
    def __init__(self, embeddings: KeyedSource | None, max_text_length: int):
        self.embeddings, self.max_len = embeddings, max_text_length

    def __call__(self, item):
        ex, valid = item
        sid = as_text(ex["source_id"])
        emb_ex = ex if "embedding" in ex else (self.embeddings[sid] if self.embeddings is not None else None)
        if emb_ex is None:
            raise UserError("token dataset has no `embedding` feature; pass embeddings_dir (a T5 embedding cache)")
        out_emb, mask = _text_fields(emb_ex, self.max_len)
        out = {"tokens": np.asarray(ex["tokens"]).astype(np.int32), "text_embedding": out_emb, "text_mask": mask,
               "source_id": sid, "valid": np.bool_(valid)}
        if "spacing" in ex:
            out["spacing"] = np.asarray(ex["spacing"], np.float32)
        if "prompt" in ex:
            out["prompt"] = as_text(ex["prompt"])
        return out


def token_pipeline(tokens_dir: str, split: str, *, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1, seed: int = 0, embeddings_dir: str | None = None,
                   max_text_length: int = 256, train: bool = True, options: LoaderOptions = LoaderOptions()):
    """MaskGIT batches: `tokens` int32 (b, T, h, w), `text_embedding` float32 (b, L, E) zero-padded to
    `max_text_length`, `text_mask` bool (b, L), `source_id`, `valid`; plus `spacing` float32 (b, 3) and
    `prompt` when the token dataset has them (`ctgen prepare --source tokens` writes both).

    tokens_dir: side dataset with `source_id` and `tokens` (int16/int32 (T, h, w)), e.g. written
      by `ctgen.data.tokens` or `side.write_side_dataset`; it may carry `embedding` (+ `length`) itself.
    embeddings_dir: T5 embedding cache (`ctgen.data.embeddings`: `source_id`, `embedding` (length, E),
      `length`), looked up by source_id.
    """
    b = host_batch_size(global_batch_size, process_count)
    src = open_split(tokens_dir, split)
    emb = KeyedSource(embeddings_dir, split) if embeddings_dir else None
    ds = _records(src, process_index=process_index, process_count=process_count, seed=seed, train=train, batch=b)
    ds = ds.map(_TokenElement(emb, max_text_length))
    return _finish(ds, b, options)
