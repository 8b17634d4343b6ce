"""Token datasets for MaskGIT: CT-ViT codebook ids of a prepared dataset (`ctgen prepare --source tokens`).

    ctgen prepare --source tokens --dataset data/ctgen_ct/NAME/1.0.0 --tokenizer runs/ctvit --out data/tokens

The frozen CT-ViT encoder runs once over every volume, so stage-2 training runs neither the CT-ViT
nor T5 per step (GenerateCT runs both in every step). Encoding is sharded over all local devices
(each encoder call takes a batch split over a data mesh, the tokenizer replicated). The output is a
side dataset (`ctgen.data.side`) with the source's splits and order, keyed by `source_id` like the
volumes: `source_id`, `tokens` int16 (T, h, w), `spacing` float32 (3,) (mm, D/H/W, of the encoded
volume), `prompt`. `ctgen.data.pipelines.token_pipeline` joins it with a T5 embedding cache by key.

--tokenizer takes a CT-ViT weights directory, a `ctvit` training workdir or a GenerateCT file
(`ctvit_pretrained.pt`, `transformer_pretrained.pt`). Volumes must have the tokenizer's in-plane
size; `--slices N` encodes a centred window of N = 1 + 2k slices (default: all of them).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Protocol

import numpy as np

from ctgen.data.side import as_text, publish_side_dataset, resolve_dataset_dir
from ctgen.errors import UserError
from ctgen.volume import hu_to_model

log = logging.getLogger(__name__)
_NEEDED = ("volume", "spacing", "prompt", "source_id")


class TokenEncoder(Protocol):
    """The frozen CT-ViT encoder as the data layer sees it: `cfg` (its CTViTConfig), `batch_size`
    (volumes per call) and a call (B, F, H, W) in [-1, 1] -> codebook ids (B, T, h, w)."""

    cfg: Any
    batch_size: int

    def __call__(self, volumes_BxFxHxW: np.ndarray) -> np.ndarray: ...


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `ctgen prepare --source tokens` (--dataset, --out, --overwrite and --split are shared
    with `--source embeddings`)."""
    group = parser.add_argument_group("--source tokens (CT-ViT codebook ids of a prepared dataset)")
    group.add_argument("--token-slices", type=int, default=0,
                       help="encode a centred window of this many slices (1 + 2k; default 0: all slices)")
    group.add_argument("--token-batch-size", type=int, default=8,
                       help="volumes per encoder call, rounded up to a multiple of the devices (default 8)")
    return parser


def _slice_window(volume_DxHxW: np.ndarray, num_slices: int) -> np.ndarray:
    from ctgen.data.pipelines import select_slices

    return select_slices(volume_DxHxW, num_slices or None, "center", None)


def build_token_dataset(dataset_dir: str, out_dir: str, encoder: TokenEncoder, *, split=None, num_slices: int = 0,
                        overwrite: bool = False, tokenizer_name: str = "", progress: bool = True) -> str:
    """Encode every volume of the TFDS dataset at `dataset_dir` with `encoder` (the frozen CT-ViT,
    loaded above the data layer: `ctgen.stages.maskgit_tokens`) and write the token side dataset to
    `out_dir` (see the module docstring); returns `out_dir`."""
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    dataset_dir, out_dir = resolve_dataset_dir(dataset_dir), os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; remove it or pass --overwrite")
    builder = tfds.builder_from_directory(dataset_dir)
    missing = [k for k in _NEEDED if k not in builder.info.features]
    if missing:
        raise UserError(f"{dataset_dir}: examples need {list(_NEEDED)}; missing {missing}")
    splits = list(builder.info.splits.keys()) if split is None else [split] if isinstance(split, str) else list(split)
    unknown = [s for s in splits if s not in builder.info.splits]
    if unknown:
        raise UserError(f"{dataset_dir} has no split(s) {unknown}; it has {sorted(builder.info.splits.keys())}")
    cfg = encoder.cfg
    d, h, w = builder.info.features["volume"].shape
    if (h, w) != (cfg.image_size, cfg.image_size):
        raise UserError(f"{dataset_dir} holds {h}x{w} slices but the tokenizer {tokenizer_name} was built for "
                        f"{cfg.image_size}x{cfg.image_size}; prepare the dataset with --resolution {cfg.image_size}")
    if num_slices and (num_slices % 2 == 0 or num_slices > cfg.max_slices):
        raise UserError(f"--token-slices {num_slices}: must be 1 + 2k and at most the tokenizer's max_slices "
                        f"{cfg.max_slices}")
    chunk = encoder.batch_size

    def encode_split(name):
        skip = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
                if k not in _NEEDED and isinstance(f, tfds.features.Tensor)}  # e.g. phantom label maps
        src = builder.as_data_source(name, decoders=skip)
        with tqdm(total=len(src), desc=f"CT-ViT tokens [{name}]", unit="vol", disable=not progress) as bar:
            for start in range(0, len(src), chunk):
                rows = [src[i] for i in range(start, min(start + chunk, len(src)))]
                vols = [hu_to_model(_slice_window(np.asarray(r["volume"]), num_slices)) for r in rows]
                if len({v.shape for v in vols}) != 1:
                    raise UserError(f"{dataset_dir} [{name}]: volumes of different slice counts near example {start}; "
                                    "pass --token-slices N to encode a fixed window")
                try:
                    cfg.check_volume_shape((1, *vols[0].shape))
                except ValueError as e:
                    raise UserError(f"{dataset_dir} [{name}] example {start}: {e} (see --token-slices)") from None
                ids = encoder(np.stack(vols + [vols[-1]] * (chunk - len(vols))))
                for r, vol, tok in zip(rows, vols, ids):
                    spacing = np.asarray(r["spacing"], np.float32)
                    yield {"source_id": as_text(r["source_id"]), "tokens": tok.astype(np.int16), "spacing": spacing,
                           "prompt": as_text(r["prompt"])}
                bar.update(len(rows))

    t = cfg.num_groups(num_slices or d)
    gh, gw = cfg.grid_hw
    features = {
        "source_id": tfds.features.Text(),
        "tokens": tfds.features.Tensor(shape=(t, gh, gw), dtype=np.int16),
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "prompt": tfds.features.Text(),
    }
    description = (f"CT-ViT codebook ids of {dataset_dir} by tokenizer {tokenizer_name!r} (grid {t}x{gh}x{gw}, codebook "
                   f"{cfg.codebook_size}); built by ctgen.data.tokens")
    return publish_side_dataset(out_dir, features, {name: encode_split(name) for name in splits}, name="ctvit_tokens",
                                description=description)
