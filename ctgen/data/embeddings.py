"""T5 embedding cache: prompt embeddings of a prepared dataset as a side dataset (`ctgen prepare --source embeddings`).

Training stages read `(source_id, embedding [length, d_model], length)` instead of running T5
every step. The side dataset has the same splits and the same example order as the source (written
in order by `ctgen.data.side.write_side_dataset`), and repeats `source_id` so a reader can check
the pairing.

    python -m ctgen.data.embeddings --dataset DIR --out DIR [--encoder builtin|PATH] [--batch-size 64]
        [--dtype bfloat16|float16] [--split train]

Reads the source with `tfds.builder_from_directory(DIR).as_data_source(split)` (no TensorFlow),
decoding only `prompt` and `source_id`; DIR is the dataset's version directory or a prepare output
directory holding exactly one dataset. Embeddings are stored unpadded (real tokens only, EOS
included), in bfloat16 or float16, as raw bytes; `length` is the number of real tokens. Padding a
batch back to its longest member with zeros reproduces GenerateCT's `padding="longest"` states.
Being a side dataset, it has `source_ids.<split>.txt` sidecars, so `KeyedSource` indexes it
without reading it.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from typing import Sequence

from ctgen.data.side import as_text, open_split, write_side_dataset
from ctgen.errors import UserError

log = logging.getLogger(__name__)

STORAGE_DTYPES = ("bfloat16", "float16")
_NEEDED = ("prompt", "source_id")


def storage_dtype(name: str):
    """The numpy dtype of a `STORAGE_DTYPES` name (imported here so that `ctgen prepare --help` stays light)."""
    import ml_dtypes
    import numpy as np

    return {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _open_source(dataset_dir: str):
    from ctgen.data.side import resolve_dataset_dir

    tfds = _tfds()
    dataset_dir = resolve_dataset_dir(dataset_dir)
    builder = tfds.builder_from_directory(dataset_dir)
    features = builder.info.features
    missing = [k for k in _NEEDED if k not in features]
    if missing:
        raise UserError(f"{dataset_dir}: examples need text features {list(_NEEDED)}; missing {missing} "
                        f"(features: {sorted(features.keys())})")
    # Decode only what we need: a CT volume per example would dominate the read time.
    skip = {k: tfds.decode.SkipDecoding() for k, f in features.items()
            if k not in _NEEDED and isinstance(f, tfds.features.Tensor)}
    return builder, skip


def build_embedding_cache(
    dataset_dir: str, out_dir: str, encoder_path: str = "builtin", *, batch_size: int = 64,
    dtype: str = "bfloat16", split: str | Sequence[str] | None = None, max_length: int = 256,
    mesh=None, overwrite: bool = False, progress: bool = True,
) -> str:
    """Encode every example's `prompt` of the TFDS dataset at `dataset_dir`; write the side dataset.

    out_dir: becomes the side dataset's directory (readable with `tfds.builder_from_directory(out_dir)`).
    encoder_path: "builtin" or a HF / T5X / ctgen text encoder directory.
    batch_size: prompts per encoder call (rounded up to a multiple of the mesh's batch shards).
    split: one split, a list, or None for all splits of the source.
    mesh: a `jax.sharding.Mesh` to shard encoding over; default: all local devices on a data axis.
    Returns `out_dir`.
    """
    import jax
    import numpy as np
    from tqdm import tqdm

    from ctgen.text.encode import encode_ids
    from ctgen.text.load import load_text_encoder

    if jax.process_count() > 1:
        raise UserError("build the embedding cache in a single process (it writes one dataset); on a multi-host "
                        "pod run it on one host, which shards encoding over that host's devices")
    if dtype not in STORAGE_DTYPES:
        raise UserError(f"embedding cache dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    dataset_dir, out_dir = os.path.abspath(dataset_dir), os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; remove it or pass overwrite=True (--overwrite)")
    source, skip = _open_source(dataset_dir)
    dataset_dir = os.fspath(source.data_dir)
    splits = list(source.info.splits.keys()) if split is None else [split] if isinstance(split, str) else list(split)
    unknown = [s for s in splits if s not in source.info.splits]
    if unknown:
        raise UserError(f"{dataset_dir} has no split(s) {unknown}; it has {sorted(source.info.splits.keys())}")
    if mesh is None and jax.local_device_count() > 1:
        from ctgen.parallel.mesh import make_mesh

        mesh = make_mesh({"data": -1})
    model, tokenizer, cfg = load_text_encoder(encoder_path, mesh=mesh)
    storage = storage_dtype(dtype)

    def encode_split(name):
        src = source.as_data_source(name, decoders=skip)
        with tqdm(total=len(src), desc=f"T5 embeddings [{name}]", unit="ex", disable=not progress) as bar:
            for start in range(0, len(src), batch_size):
                rows = [src[i] for i in range(start, min(start + batch_size, len(src)))]
                prompts = [as_text(r["prompt"]) for r in rows]
                for i, p in enumerate(prompts):
                    if not p.strip():
                        raise UserError(f"{dataset_dir} [{name}] example {start + i} (source_id "
                                        f"{as_text(rows[i]['source_id'])!r}) has an empty prompt")
                unique = sorted(set(prompts))  # studies often share one report across volumes
                ids, mask = tokenizer.batch_encode(unique, max_length=max_length)
                emb, _ = encode_ids(model, ids, mask, mesh=mesh, batch_size=batch_size)
                emb = np.asarray(emb).astype(storage)
                if not np.isfinite(emb.astype(np.float32)).all():
                    raise UserError(f"embeddings overflow {dtype} in [{name}] batch at {start}; use bfloat16")
                lengths = mask.sum(axis=1).astype(np.int32)
                where = {p: j for j, p in enumerate(unique)}
                for row, p in zip(rows, prompts):
                    j = where[p]
                    yield {"source_id": as_text(row["source_id"]), "embedding": emb[j, : lengths[j]],
                           "length": lengths[j]}
                bar.update(len(rows))

    tfds = _tfds()
    features = {
        "source_id": tfds.features.Text(),
        "embedding": tfds.features.Tensor(shape=(None, cfg.d_model), dtype=storage,
                                          encoding=tfds.features.Encoding.BYTES),
        "length": tfds.features.Scalar(dtype=np.int32),
    }
    description = (f"T5 prompt embeddings of {dataset_dir} by encoder {encoder_path!r} (d_model {cfg.d_model}, "
                   f"max_length {max_length}, {dtype}); built by ctgen.data.embeddings")
    # Written next to out_dir and moved into place when complete: with --overwrite the old output
    # is only removed once the new one exists.
    staging = out_dir + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    write_side_dataset(staging, features, {name: encode_split(name) for name in splits},
                       name="t5_embeddings", description=description)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    os.replace(staging, out_dir)
    return out_dir


def read_embeddings(cache_dir: str, split: str):
    """The side dataset's data source for `split` (items: source_id bytes, embedding [length, D], length)."""
    return open_split(cache_dir, split)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `ctgen prepare --source embeddings` (also the standalone `python -m ctgen.data.embeddings`)."""
    parser.add_argument("--dataset", required=True,
                        help="prepared TFDS dataset: its version directory, or a prepare --out holding one dataset")
    parser.add_argument("--out", required=True, help="output directory of the embedding side dataset")
    parser.add_argument("--encoder", default="builtin",
                        help="text encoder: 'builtin' or a Hugging Face / T5X / ctgen directory (default: builtin)")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per encoder call (default: 64)")
    parser.add_argument("--dtype", choices=STORAGE_DTYPES, default="bfloat16",
                        help="storage dtype of the embeddings (default: bfloat16)")
    parser.add_argument("--split", action="append", default=None,
                        help="split to encode (repeatable; default: all splits)")
    parser.add_argument("--max-length", type=int, default=256, help="token limit per prompt (default: 256)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    out = build_embedding_cache(args.dataset, args.out, args.encoder, batch_size=args.batch_size, dtype=args.dtype,
                                split=args.split, max_length=args.max_length, overwrite=args.overwrite,
                                progress=not getattr(args, "no_progress", False))
    print(f"wrote T5 embedding cache to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_prepare_arguments(argparse.ArgumentParser(
        prog="python -m ctgen.data.embeddings", description="Precompute T5 prompt embeddings of a TFDS dataset."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_prepare(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
