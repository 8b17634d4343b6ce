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
"""
from __future__ import annotations

import argparse
import os
import shutil

from ctgen.data.side import as_text, open_split, resolve_dataset_dir, write_side_dataset
from ctgen.errors import UserError

FIELD = "volume"  # the field ReconstructionLowRes reads by default


def _reconstructor(tokenizer: str, mesh, rules):
    """(image size, jitted reconstruct of a (B, D, s, s) batch in [-1, 1] sharded over the batch)."""
    import jax
    from flax import nnx

    from ctgen.convert.ctvit_store import load_ctvit
    from ctgen.parallel import axes as axes_lib

    model = load_ctvit(tokenizer, mesh=mesh, rules=rules)

    @nnx.jit
    def run(model, x):
        with axes_lib.activation_sharding(mesh, rules):
            return model.reconstruct(x)

    def call(x_np):
        x = jax.device_put(x_np, axes_lib.logical_sharding(("batch", None, None, None), x_np.shape, rules, mesh)) \
            if mesh is not None else x_np
        return jax.device_get(run(model, x))

    return model.cfg.image_size, call


def build_sr_pairs(dataset_dir: str, out_dir: str, tokenizer: str, *, lowres_size: int = 0,
                   split: str | list[str] | None = None, mesh=None, rules=None, overwrite: bool = False,
                   progress: bool = True) -> str:
    """Reconstruct every volume of the TFDS dataset at `dataset_dir` with the CT-ViT at `tokenizer`
    (a workdir, weights directory or GenerateCT file); write the side dataset to `out_dir`.

    lowres_size: the in-plane size fed to the CT-ViT (0 = its image size).
    mesh: shard volumes over it (default: every local device on the data axis). Returns `out_dir`.
    """
    import jax
    import numpy as np
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    from ctgen.data.preprocess import resize_volume
    from ctgen.parallel import axes as axes_lib
    from ctgen.parallel.mesh import batch_shards, make_mesh
    from ctgen.volume import clip_hu, hu_to_model, model_to_hu, to_int16_hu

    if jax.process_count() > 1:
        raise UserError("make SR pairs in a single process (it writes one dataset); it shards over that host's devices")
    dataset_dir, out_dir = resolve_dataset_dir(os.path.abspath(dataset_dir)), os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; remove it or pass overwrite=True (--overwrite)")
    builder = tfds.builder_from_directory(dataset_dir)
    if "volume" not in builder.info.features or "source_id" not in builder.info.features:
        raise UserError(f"{dataset_dir}: not a prepared CT dataset (needs `volume` and `source_id` features)")
    splits = list(builder.info.splits.keys()) if split is None else [split] if isinstance(split, str) else list(split)
    if mesh is None and jax.local_device_count() > 1:
        mesh = make_mesh({"data": -1})
    rules = tuple(rules or axes_lib.DEFAULT_RULES)
    image_size, reconstruct = _reconstructor(tokenizer, mesh, rules)
    size = lowres_size or image_size
    if size != image_size:
        raise UserError(f"--lowres-size {size}: the CT-ViT at {tokenizer} takes {image_size}x{image_size} slices")
    per_call = batch_shards(mesh, rules)
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
    description = (f"CT-ViT reconstructions ({size}x{size}, int16 HU) of {dataset_dir} by {tokenizer}; "
                   "built by ctgen.data.sr_pairs for super-resolution training")
    staging = out_dir + ".staging"  # moved into place when complete
    shutil.rmtree(staging, ignore_errors=True)
    write_side_dataset(staging, features, {name: split_examples(name) for name in splits}, name="ctvit_sr_pairs",
                       description=description)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    os.replace(staging, out_dir)
    return out_dir


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `--source sr-pairs` that `ctgen prepare` does not already have."""
    parser.add_argument("--tokenizer", help="sr-pairs: the frozen CT-ViT (training workdir, weights directory or "
                                            "GenerateCT file)")
    parser.add_argument("--lowres-size", type=int, default=0,
                        help="sr-pairs: in-plane size of the reconstructions (default: the CT-ViT's image size)")
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    if not getattr(args, "dataset", None) or not getattr(args, "tokenizer", None):
        raise UserError("--source sr-pairs needs --dataset DIR (a prepared dataset) and --tokenizer (a CT-ViT)")
    out = build_sr_pairs(args.dataset, args.out, args.tokenizer, lowres_size=args.lowres_size, split=args.split,
                         overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote CT-ViT reconstructions for super-resolution to {out}")
    return 0
