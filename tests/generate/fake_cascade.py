"""Stand-ins for `ctgen.generate.cascade.run_cascade` and for the stages' weights directories
(the models are not part of these tests)."""
import json
import os

import numpy as np

from ctgen.generate.cascade import CascadeOutput


class FakeCascade:
    """Stands in for `run_cascade`: a volume drawn from each sample's seed, in the models' layout.
    `fail_after` simulates a process killed after that many samples."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, samples, config, stages, *, timer, progress):
        self.calls.append([s.name for s in samples])
        assert set(stages) == {"text", "ctvit", "maskgit"} | ({"superres"} if config.superres.enabled else set())
        for n, s in enumerate(samples):
            if self.fail_after is not None and n == self.fail_after:
                raise KeyboardInterrupt("killed")
            rng = np.random.default_rng(s.seed)
            hu = rng.uniform(-1000, 1000, size=(config.slices, 12, 12)).astype(np.float32)
            yield CascadeOutput(sample=s, hu_DxHxW=hu, seconds={"maskgit": 0.5, "superres": 1.0},
                                compile_seconds={"maskgit": 2.0})


def fake_weights_dir(path, model, model_config=None, **info):
    """A directory that `ctgen generate`'s checkpoint checks take for `model`'s weights (its marker
    and one file to hash); nothing in it loads."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "ctgen_weights.json"), "w") as f:
        json.dump({"format": "ctgen-weights-v1", "model": model, "model_config": model_config or {}, **info}, f)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(model.encode() * 100)
