"""Metric writers: JSON lines (`metrics.jsonl`) and TensorBoard events, process 0 only."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax
import numpy as np

from ctgen.train.tensorboard import EventWriter


def to_python(tree):
    """Scalar metrics (a dict, or a list of dicts) to Python floats, with one `jax.device_get`
    for the whole tree (one host-device transfer, not one per metric and step)."""
    return jax.tree.map(lambda v: float(np.asarray(v)), jax.device_get(tree))


class MetricWriter:
    """Writes `{"step": s, "split": "train"|"eval", ...}` lines and TensorBoard scalars.

    Only process 0 writes; other processes get a writer that does nothing, so callers need no
    `if process_index == 0` of their own.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tb = EventWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: Mapping[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        self._tb.scalars(step, {f"{split}/{k}": v for k, v in values.items() if math.isfinite(v)})
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
