"""Side datasets keyed by `source_id` (MaskGIT token ids, CT-ViT reconstructions, T5 embeddings).

A side dataset is a TFDS array_record dataset with a `source_id` text feature that names the
prepared example it belongs to. `write_side_dataset` writes one (plus a `source_ids.<split>.txt`
sidecar so readers can index it without reading every record); `KeyedSource` looks examples up
by source id in any such dataset, including ones written elsewhere (e.g. `ctgen.data.embeddings`).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Iterable, Mapping

from ctgen.errors import UserError


def resolve_dataset_dir(path: str) -> str:
    """The directory holding `dataset_info.json`: `path` itself or the single `*/*/*/` version dir below it."""
    import glob

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", "*", "*", "dataset_info.json")))
    found = [f for f in found if not f.endswith(".incomplete")]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"{path}: no prepared TFDS dataset here (no dataset_info.json in it or in */*/*/)")
    raise UserError(f"{path} holds several datasets; pass one of: {', '.join(found)}")


def open_split(path: str, split: str, decoders: Mapping | None = None):
    """`tfds.builder_from_directory(...).as_data_source(split)` with a clear error for a missing split."""
    import tensorflow_datasets as tfds

    d = resolve_dataset_dir(path)
    builder = tfds.builder_from_directory(d)
    if split not in builder.info.splits:
        raise UserError(f"{d} has no split {split!r}; it has {sorted(builder.info.splits.keys())}")
    return builder.as_data_source(split, decoders=decoders)


def publish_side_dataset(out_dir: str, features: Mapping[str, Any], splits: Mapping[str, Iterable[dict]], *,
                         name: str, description: str) -> str:
    """`write_side_dataset` into `out_dir + ".staging"`, then moved to `out_dir` (replacing what was
    there) only once complete: an interrupted build never leaves a dataset that looks finished."""
    staging = out_dir + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    write_side_dataset(staging, features, splits, name=name, description=description)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    os.replace(staging, out_dir)
    return out_dir


def write_side_dataset(path: str, features: Mapping[str, Any], splits: Mapping[str, Iterable[dict]], *,
                       name: str = "ctgen_side", examples_per_shard: int = 1024, description: str = "") -> str:
    """Write `{split: examples}` (iterables, streamed) as a TFDS array_record dataset in `path`; return `path`.

    features: `{name: tfds.features.FeatureConnector}`; must include `source_id` (Text).
    """
    import tensorflow_datasets as tfds
    from array_record.python import array_record_module as arm

    if "source_id" not in features:
        raise UserError("a side dataset needs a `source_id` feature")
    fd = tfds.features.FeaturesDict(dict(features))
    os.makedirs(path, exist_ok=True)
    tmpl = tfds.core.ShardedFileTemplate(data_dir=path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                         dataset_name=name, filetype_suffix="array_record")
    infos = []
    for split, examples in splits.items():
        ids, lengths, nbytes, writer = [], [], 0, None
        for ex in examples:  # streamed: shards are written as they fill, renamed once the count is known
            if writer is None:
                writer = arm.ArrayRecordWriter(os.path.join(path, f".{split}-{len(lengths):05d}.tmp"), "group_size:1")
                lengths.append(0)
            blob = fd.serialize_example(ex)
            writer.write(blob)
            nbytes += len(blob)
            lengths[-1] += 1
            ids.append(as_text(ex["source_id"]))
            if lengths[-1] == examples_per_shard:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()
        if not ids:
            continue
        for i in range(len(lengths)):
            fname = tmpl.replace(split=split).sharded_filepath(shard_index=i, num_shards=len(lengths))
            os.replace(os.path.join(path, f".{split}-{i:05d}.tmp"), os.fspath(fname))
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=nbytes,
                                         filename_template=tmpl.replace(split=split)))
        with open(os.path.join(path, f"source_ids.{split}.txt"), "w", encoding="utf-8") as f:
            f.writelines(i + "\n" for i in ids)
    if not infos:
        raise UserError(f"{path}: no examples to write")
    tfds.folder_dataset.write_metadata(data_dir=path, features=fd, split_infos=infos, filename_template=tmpl,
                                       check_data=False, description=description or "ctgen side dataset")
    return path


def as_text(v) -> str:
    """A TFDS Text feature's value (bytes from a data source, or str) as str."""
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def source_id_index(path: str, split: str) -> dict[str, int]:
    """source_id -> record index of a side dataset (from the sidecar if present, else one read pass)."""
    import tensorflow_datasets as tfds

    d = resolve_dataset_dir(path)
    side = os.path.join(d, f"source_ids.{split}.txt")
    if os.path.isfile(side):
        with open(side, encoding="utf-8") as f:
            ids = [line.rstrip("\n") for line in f]
    else:
        builder = tfds.builder_from_directory(d)
        skip = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
                if k != "source_id" and isinstance(f, tfds.features.Tensor)}
        src = open_split(d, split, decoders=skip)
        ids = [as_text(src[i]["source_id"]) for i in range(len(src))]
    index: dict[str, int] = {}
    for i, sid in enumerate(ids):
        index.setdefault(sid, i)
    return index


class KeyedSource:
    """Examples of a side dataset by `source_id`; picklable (opens its data source lazily per process)."""

    def __init__(self, path: str, split: str):
        self.path, self.split = resolve_dataset_dir(path), split
        self.index = source_id_index(self.path, split)
        self._src = None

    def __getstate__(self):
        return {"path": self.path, "split": self.split, "index": self.index, "_src": None}

    def __contains__(self, source_id: str) -> bool:
        return source_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, source_id: str) -> dict:
        if self._src is None:
            self._src = open_split(self.path, self.split)
        try:
            i = self.index[source_id]
        except KeyError:
            raise UserError(f"{self.path} [{self.split}] has no example with source_id {source_id!r}") from None
        ex = self._src[i]
        if as_text(ex["source_id"]) != source_id:
            raise UserError(f"{self.path}: record {i} has source_id {as_text(ex['source_id'])!r}, expected "
                            f"{source_id!r}; the source_ids sidecar is stale")
        return ex
