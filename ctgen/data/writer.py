"""Write a source into a TFDS array_record dataset: parallel conversion, manifest, resume.

Layout: `<out>/ctgen_ct/<config name>/1.0.0/` holds the TFDS files (`dataset_info.json`,
`features.json`, `ctgen_ct-<split>.array_record-<shard>-of-<count>`), `manifest.jsonl` (one line per
input: written / warning / skipped, with the file and the problem) and `prepare.json` (the
request and counts). While running, work goes to `1.0.0.incomplete/` in chunks of
`examples_per_shard` records; each finished chunk is a finished shard, so an interrupted run
resumes where it stopped. A run whose request (source, inputs, options) differs from what the
directory holds is refused, never mixed in.

Written with TFDS's own serializer and `write_metadata`, not `GeneratorBasedBuilder`, because
that builder cannot resume, funnels every example through one process and re-shuffles through a
temporary copy of the whole dataset; the result is an ordinary TFDS dataset
(`tfds.builder_from_directory`, `tfds.data_source("ctgen_ct/<name>", data_dir=out)`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from typing import Any, Callable, Iterable, Protocol, Sequence

from ctgen.data.features import DATASET_NAME, VERSION, DatasetConfig, assemble, features
from ctgen.errors import UserError
from ctgen.volume import VolumeError

SPLITS = ("train", "validation")


class PrepareError(UserError):
    """Preparation refused or failed; the message says why and what to do."""


@dataclasses.dataclass
class Record:
    """One input volume. `payload` is whatever the source needs to load it (picklable)."""

    source_id: str
    patient_id: str
    file: str
    payload: Any = None
    split: str | None = None


@dataclasses.dataclass
class Issue:
    """A problem found while scanning inputs (before any volume is read)."""

    file: str
    problem: str
    source_id: str = ""
    status: str = "skipped"  # or "warning": the record is still written

    def entry(self) -> dict:
        return {"source_id": self.source_id, "file": self.file, "status": self.status, "problem": self.problem}


class Source(Protocol):
    kind: str

    def scan(self) -> tuple[list[Record], list[Issue]]:
        """All records to convert (sorted, deterministic) and problems found in the listings."""

    def fingerprint(self) -> dict:
        """JSON description of inputs and options (for resume / refuse)."""

    def load(self, record: Record) -> dict:
        """Load one record for `features.assemble`; raise VolumeError for a bad volume."""


def assign_splits(records: Sequence[Record], validation_fraction: float, seed: int) -> None:
    """Give records without a split one by patient: a seeded, patient-disjoint validation share."""
    free = sorted({r.patient_id for r in records if r.split is None})
    if not free:
        return
    key = lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()  # noqa: E731
    n_val = int(round(validation_fraction * len(free)))
    if validation_fraction > 0 and len(free) >= 2:
        n_val = min(max(n_val, 1), len(free) - 1)
    val = set(sorted(free, key=key)[:n_val])
    for r in records:
        if r.split is None:
            r.split = "validation" if r.patient_id in val else "train"


# ----------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(source: Source, config: DatasetConfig) -> None:
    _WORKER["source"], _WORKER["config"] = source, config
    _WORKER["features"] = features(config)


def _convert(record: Record) -> tuple[bytes | None, dict]:
    """Load, preprocess and serialize one record; never raises for bad input."""
    src, cfg = _WORKER["source"], _WORKER["config"]
    entry = {"source_id": record.source_id, "file": record.file, "split": record.split}
    try:
        loaded = src.load(record)
        ex, warnings = assemble(loaded, cfg, source_id=record.source_id, patient_id=record.patient_id,
                                name=record.file)
        data = _WORKER["features"].serialize_example(ex)
    except VolumeError as e:
        return None, {**entry, "status": "skipped", "problem": str(e)}
    except MemoryError:
        raise
    except Exception as e:  # a reader bug or an unexpected file: report it, keep going
        return None, {**entry, "status": "skipped", "problem": f"{record.file}: {type(e).__name__}: {e}"}
    notes = loaded.get("notes", {})
    warnings = list(loaded.get("warnings", [])) + warnings
    out = {**entry, "status": "warning" if warnings else "written", **notes,
           "shape": list(ex["volume"].shape), "spacing": [round(float(s), 4) for s in ex["spacing"]],
           "orientation": ex["orientation"]}
    if warnings:
        out["problem"] = f"{record.file}: " + "; ".join(warnings)
    return data, out


# ----------------------------------------------------------------------------- build
def _dataset_dir(out_dir: str, config: DatasetConfig) -> str:
    return os.path.join(out_dir, DATASET_NAME, config.name, VERSION)


def _chunks(records: Sequence[Record], per_shard: int) -> list[tuple[str, list[Record]]]:
    out = []
    for split in SPLITS:
        rs = [r for r in records if r.split == split]
        for i in range(0, len(rs), per_shard):
            out.append((f"{split}-{i // per_shard:05d}", rs[i:i + per_shard]))
    return out


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {str(va)[:80]} -> {str(vb)[:80]}")
    return out


def build(source: Source, config: DatasetConfig, out_dir: str, *, validation_fraction: float = 0.05,
          split_seed: int = 0, num_workers: int = 0, strict: bool = False, overwrite: bool = False,
          examples_per_shard: int = 64, progress: bool = True,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Convert `source` into the dataset `config` under `out_dir`; return the summary dict.

    num_workers: 0 converts in this process; N >= 1 uses N spawned conversion processes with one
      BLAS thread each (multi-threaded OpenBLAS slowed resampling 10-40x on a busy shared machine;
      processes scale better) while this process writes shards.
    strict: any skipped or warned input fails the run (PrepareError) instead of a manifest line.
    overwrite: replace a different or unfinished dataset in the same place instead of refusing.
    """
    records, issues = source.scan()
    ids = [r.source_id for r in records]
    if len(set(ids)) != len(ids):
        raise PrepareError(f"{source.kind} source produced duplicate source ids; this is a bug in the source")
    assign_splits(records, validation_fraction, split_seed)
    if strict and issues:
        raise PrepareError("--strict: " + issues[0].problem + (f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""))
    request = {
        "dataset": config.to_json(), "source": source.fingerprint(), "split_seed": split_seed,
        "validation_fraction": validation_fraction, "examples_per_shard": examples_per_shard,
        "records": hashlib.sha256("\n".join(f"{r.split}:{r.source_id}" for r in records).encode()).hexdigest(),
    }
    request = json.loads(json.dumps(request))  # tuples -> lists, as it reads back
    final = _dataset_dir(out_dir, config)
    staging = final + ".incomplete"
    done = _read_json(os.path.join(final, "prepare.json"))
    if done is not None:
        if done.get("request") == request:
            log(f"{final} already holds this dataset ({done['counts']}); nothing to do")
            return done
        if not overwrite:
            raise PrepareError(
                f"{final} already holds a different dataset ({'; '.join(_diff(done.get('request', {}), request)[:5])}). "
                "Choose another --out or --name, or pass --overwrite to replace it.")
        shutil.rmtree(final)
    elif os.path.isdir(final):
        if not overwrite:
            raise PrepareError(f"{final} exists but was not written by a finished `ctgen prepare`; "
                               "pass --overwrite to replace it")
        shutil.rmtree(final)
    if os.path.isdir(staging):
        prev = _read_json(os.path.join(staging, "request.json"))
        if prev != request:
            if not overwrite:
                why = "; ".join(_diff(prev or {}, request)[:5]) or "unreadable request.json"
                raise PrepareError(f"{staging} holds an unfinished run with a different request ({why}). "
                                   "Re-run with the original options to resume, or pass --overwrite to discard it.")
            shutil.rmtree(staging)
    os.makedirs(staging, exist_ok=True)
    _write_json(os.path.join(staging, "request.json"), request)

    chunks = _chunks(records, examples_per_shard)
    pending = [(cid, rs) for cid, rs in chunks if not os.path.exists(os.path.join(staging, cid + ".json"))]
    if len(pending) < len(chunks):
        log(f"resuming {staging}: {len(chunks) - len(pending)} of {len(chunks)} shards already written")
    _run_chunks(source, config, staging, pending, num_workers, strict, progress, len(records))
    return _finalize(config, staging, final, chunks, issues, request, log)


def _run_chunks(source, config, staging, pending, num_workers, strict, progress, total) -> None:
    from array_record.python import array_record_module as arm
    from tqdm import tqdm

    flat = [r for _, rs in pending for r in rs]
    if not flat:
        return
    if num_workers >= 1:
        # One BLAS thread per worker: spinning OpenBLAS threads collapse when cores are contended.
        threads = "1"
        keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: threads for k in keys})
        try:
            pool = multiprocessing.get_context("spawn").Pool(num_workers, _init_worker, (source, config))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        results: Iterable = pool.imap(_convert, flat, chunksize=1)
    else:
        pool = None
        _init_worker(source, config)
        results = map(_convert, flat)
    bar = tqdm(total=total, initial=total - len(flat), unit="vol", disable=not progress, file=sys.stderr)
    try:
        it = iter(results)
        for cid, rs in pending:
            path = os.path.join(staging, cid + ".array_record")
            writer = arm.ArrayRecordWriter(path + ".tmp", "group_size:1")
            entries, n, nbytes = [], 0, 0
            for _ in rs:
                data, entry = next(it)
                if strict and entry["status"] != "written":
                    raise PrepareError(f"--strict: {entry['problem']}")
                if data is not None:
                    writer.write(data)
                    n += 1
                    nbytes += len(data)
                entries.append(entry)
                bar.update(1)
            writer.close()
            os.replace(path + ".tmp", path)
            _write_json(os.path.join(staging, cid + ".json"), {"entries": entries, "n": n, "bytes": nbytes})
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def _finalize(config, staging, final, chunks, issues, request, log) -> dict:
    import tensorflow_datasets as tfds

    entries = [i.entry() for i in issues]
    split_infos, counts = [], {}
    tmpl = tfds.core.ShardedFileTemplate(data_dir=staging, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                         dataset_name=DATASET_NAME, filetype_suffix="array_record")
    for split in SPLITS:
        metas = [(cid, _read_json(os.path.join(staging, cid + ".json"))) for cid, _ in chunks if cid.startswith(split + "-")]
        for _, m in metas:
            entries += m["entries"]
        full = [(cid, m) for cid, m in metas if m["n"] > 0]
        for cid, m in metas:
            if m["n"] == 0:
                os.remove(os.path.join(staging, cid + ".array_record"))
        for i, (cid, _) in enumerate(full):
            name = tmpl.replace(split=split).sharded_filepath(shard_index=i, num_shards=len(full)).name
            os.replace(os.path.join(staging, cid + ".array_record"), os.path.join(staging, name))
        for cid, _ in metas:
            os.remove(os.path.join(staging, cid + ".json"))
        counts[split] = sum(m["n"] for _, m in full)
        if full:
            split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[m["n"] for _, m in full],
                                                   num_bytes=sum(m["bytes"] for _, m in full),
                                                   filename_template=tmpl.replace(split=split)))
    counts["skipped"] = sum(e["status"] == "skipped" for e in entries)
    counts["warnings"] = sum(e["status"] == "warning" for e in entries)
    with open(os.path.join(staging, "manifest.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in entries)
    if not split_infos:
        raise PrepareError(f"no volume could be written; see {staging}/manifest.jsonl")
    tfds.folder_dataset.write_metadata(
        data_dir=staging, features=features(config), split_infos=split_infos, filename_template=tmpl,
        check_data=False, description=f"ctgen prepared CT dataset ({request['source'].get('kind')}): {config.name}")
    summary = {"request": request, "counts": counts, "path": final}
    _write_json(os.path.join(staging, "prepare.json"), summary)
    os.remove(os.path.join(staging, "request.json"))
    os.replace(staging, final)
    for e in entries:
        if e["status"] != "written":
            log(f"{e['status']}: {e['problem']}")
    log(f"wrote {final}: {counts}")
    return summary
