"""What a generated volume came from: checkpoint hashes, software and devices, time and memory.

`checkpoint_record` hashes every file of every stage's weights once per run (the run reuses the
result for all its samples); `environment` names versions, devices and processes; `peak_memory`
reads the host's peak resident set size and, where the backend reports it, each device's peak.
`ctgen.generate.outputs` writes these into each sample's provenance JSON.
"""
from __future__ import annotations

import hashlib
import os
import platform
import resource
import sys
from typing import Any, Mapping

from ctgen.generate.checkpoints import StageWeights, weights_files

FORMAT = "ctgen-generate-v1"
_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def hash_weights(weights: StageWeights) -> dict[str, Any]:
    """{"path", "kind", "model", "files": {relative path: sha256}, "sha256": digest of the list}."""
    files = weights_files(weights)
    base = weights.path if os.path.isdir(weights.path) else os.path.dirname(files[0]) if files else ""
    hashes = {os.path.relpath(f, base): sha256_file(f) for f in files}
    listing = "".join(f"{h}  {rel}\n" for rel, h in sorted(hashes.items()))
    return {"path": weights.path, "kind": weights.kind, "model": weights.model, "files": hashes,
            "sha256": hashlib.sha256(listing.encode()).hexdigest(),
            **{k: weights.info[k] for k in ("source", "packed_from") if k in weights.info}}


def checkpoint_record(stages: Mapping[str, StageWeights]) -> dict[str, dict[str, Any]]:
    """`hash_weights` of every stage (computed once; pass the result to every sample's record)."""
    return {stage: hash_weights(w) for stage, w in stages.items()}


def environment(process_index: int, process_count: int) -> dict[str, Any]:
    """ctgen / jax / jaxlib / Python versions, device kind and counts, this process's share."""
    import jax
    import jaxlib

    import ctgen

    devices = jax.devices()
    return {
        "versions": {"ctgen": ctgen.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "python": platform.python_version()},
        "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices),
                    "local_count": jax.local_device_count()},
        "process": {"index": int(process_index), "count": int(process_count), "jax_process_count": jax.process_count(),
                    "host": platform.node()},
    }


def peak_memory() -> dict[str, Any]:
    """Peak host memory of this process (bytes; `ru_maxrss`) and per-device peaks where reported
    (GPU/TPU `memory_stats()["peak_bytes_in_use"]`; the CPU backend reports none)."""
    import jax

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, Any] = {"host_peak_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    device_peaks = {}
    for d in jax.local_devices():
        stats = d.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            device_peaks[str(d.id)] = int(stats["peak_bytes_in_use"])
    out["device_peak_bytes"] = device_peaks or None
    return out
