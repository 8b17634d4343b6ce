"""The cascade itself: prompts -> T5 -> MaskGIT -> CT-ViT decode -> super-resolution -> HU volumes.

`ctgen.generate.command` does everything around it (prompts, checkpoints, work split, resume,
orientation, outputs, provenance) and calls `run_cascade` once per process with the samples that
process still has to make. The contract:

* inputs: the samples (prompt, name, own seed), the resolved generation config (sampling
  settings, slices, mesh, SR batch), the checked weights of each stage, a `StageTimer` to compile
  and time each stage with, and whether to draw progress bars (already false on processes other
  than 0 and off a terminal: pass it as `stage_progress(..., enabled=progress)`);
* output: one `CascadeOutput` per sample, yielded as soon as it is ready (so volumes are written
  and memory is freed while the next sample runs), in any order;
* the volume is HU in the models' own array layout (`layout` of the run: "canonical" for models
  trained by ctgen, "generatect" for GenerateCT's imported weights; the command maps it to the
  canonical orientation), `(slices, H, W)` with H = W = the SR output size, or the CT-ViT's with
  `superres.enabled` off;
* the same seed and device count give the same volume.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

from ctgen.errors import UserError
from ctgen.generate.checkpoints import StageWeights
from ctgen.generate.prompts import Sample
from ctgen.generate.runtime import StageTimer


@dataclasses.dataclass
class CascadeOutput:
    """One generated volume: `hu_DxHxW` float32 HU in the models' layout; `seconds` and
    `compile_seconds` per stage for this sample (its share of a batch)."""

    sample: Sample
    hu_DxHxW: np.ndarray
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def run_cascade(samples: Sequence[Sample], config, stages: Mapping[str, StageWeights], *, timer: StageTimer,
                progress: bool) -> Iterator[CascadeOutput]:
    """Generate `samples` (module docstring). Not available until the MaskGIT and SR models land."""
    raise UserError("the MaskGIT and super-resolution stages are not built yet: `ctgen generate` checked the "
                    f"prompts, checkpoints and output folder and would now generate {len(samples)} volume(s)")
