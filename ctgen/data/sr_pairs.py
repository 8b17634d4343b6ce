"""CT-ViT reconstructions of a prepared dataset for super-resolution training (`ctgen prepare --source sr-pairs`).

GenerateCT trains its SR U-Net on the CT-ViT's reconstruction of each volume (at the CT-ViT's
128 x 128 input size) as the low-res input, not on a plain downsample. This makes those
reconstructions once, with the frozen CT-ViT, as a side dataset keyed by `source_id`, which
`ctgen.data.pipelines.ReconstructionLowRes` (the SR stage's `data.pairs_dir`) reads.

    ctgen prepare --source sr-pairs --dataset data/ctgen_ct/NAME/1.0.0 --tokenizer runs/ctvit --out data/sr_pairs

Each volume (D, H, W) in HU is clipped, resized to (D, s, s) (s = the CT-ViT's image size, or
--lowres-size), mapped to [-1, 1] and reconstructed; the result is stored as int16 HU, (D, s, s),
with the source's splits and example order. One volume per device per call: the volumes of a
call are split over all local devices (a data-parallel mesh); a call holds volumes of one slice
count (a dataset with variable D reconstructs them in consecutive groups).

The data layer does not load models: `ctgen.stages.superres_pairs` loads the CT-ViT and passes its
sharded reconstruction in (`ctgen prepare --source sr-pairs` runs that).
"""
from __future__ import annotations

import argparse
import os
from typing import Callable

import numpy as np

from ctgen.data.side import as_text, open_split, publish_side_dataset, resolve_dataset_dir
from ctgen.errors import UserError

FIELD = "volume"  # the field ReconstructionLowRes reads by default

Reconstruct = Callable[[np.ndarray], np.ndarray]
"""(B, D, s, s) float32 volumes in [-1, 1] -> their reconstructions, same shape and range."""


def build_sr_pairs(dataset_dir: str, out_dir: str, reconstruct: Reconstruct, size: int, *, per_call: int = 1,
                   split: str | list[str] | None = None, overwrite: bool = False, progress: bool = True,
                   model_name: str = "the CT-ViT") -> str:
    """Reconstruct every volume of the TFDS dataset at `dataset_dir` at `size` x `size` in-plane
    with `reconstruct` (`per_call` volumes per call, the last call padded); write the side dataset
    to `out_dir` and return it. `model_name` goes into the dataset description."""
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    from ctgen.data.preprocess import resize_volume
    from ctgen.volume import clip_hu, hu_to_model, model_to_hu, to_int16_hu

    dataset_dir, out_dir = resolve_dataset_dir(os.path.abspath(dataset_dir)), os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; remove it or pass overwrite=True (--overwrite)")
    builder = tfds.builder_from_directory(dataset_dir)
    if "volume" not in builder.info.features or "source_id" not in builder.info.features:
        raise UserError(f"{dataset_dir}: not a prepared CT dataset (needs `volume` and `source_id` features)")
    splits = list(builder.info.splits.keys()) if split is None else [split] if isinstance(split, str) else list(split)
    # only what is needed: skip decoding the prompt and label maps
    skip = {k: tfds.decode.SkipDecoding() for k in builder.info.features if k not in ("volume", "source_id")}

    def run_group(rows):
        vols = [hu_to_model(resize_volume(clip_hu(np.asarray(r["volume"], np.float32)),
                                          (r["volume"].shape[0], size, size))) for r in rows]
        pad = per_call - len(vols)
        batch = np.stack(vols + [vols[-1]] * pad).astype(np.float32)
        rec = np.asarray(reconstruct(batch))[: len(rows)]
        for r, v in zip(rows, rec):
            yield {"source_id": as_text(r["source_id"]), FIELD: to_int16_hu(model_to_hu(v))}

    def split_examples(name):
        src = open_split(dataset_dir, name, decoders=skip)
        group = []
        with tqdm(total=len(src), desc=f"CT-ViT reconstructions [{name}]", unit="vol", disable=not progress) as bar:
            for i in range(len(src)):
                row = src[i]
                if group and (len(group) == per_call or row["volume"].shape != group[0]["volume"].shape):
                    yield from run_group(group)
                    bar.update(len(group))
                    group = []
                group.append(row)
            if group:
                yield from run_group(group)
                bar.update(len(group))

    features = {"source_id": tfds.features.Text(),
                FIELD: tfds.features.Tensor(shape=(None, size, size), dtype=np.int16,
                                            encoding=tfds.features.Encoding.BYTES)}
    description = (f"CT-ViT reconstructions ({size}x{size}, int16 HU) of {dataset_dir} by {model_name}; "
                   "built by ctgen.data.sr_pairs for super-resolution training")
    return publish_side_dataset(out_dir, features, {name: split_examples(name) for name in splits}, name="ctvit_sr_pairs",
                                description=description)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `--source sr-pairs` that `ctgen prepare` does not already have."""
    parser.add_argument("--lowres-size", type=int, default=0,
                        help="sr-pairs: in-plane size of the reconstructions (default: the CT-ViT's image size)")
    return parser
