"""Shared helpers for the training-loop tests (toy stage, recorded batches, param access)."""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from ctgen.configuration import load
from ctgen.stages.toy import ToyStage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = os.path.join(REPO, "configs", "toy.py")


def toy_config(variant: str = "tiny", **overrides):
    cfg = load(f"{TOY}:{variant}", [(k, str(v)) for k, v in overrides.items()])
    with cfg.unlocked():
        cfg.train.progress_bar = False
    return cfg


class RecordingIterator:
    """Wraps a grain iterator, recording the example indices of every batch it yields."""

    def __init__(self, it, log: list):
        self.it, self.log = it, log

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.log.append(batch["index"].tolist())
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


class RecordingToyStage(ToyStage):
    def __init__(self, config, log: list):
        super().__init__(config)
        self.log = log

    def train_data(self, process_index, process_count, seed):
        return RecordingIterator(super().train_data(process_index, process_count, seed), self.log)


def params_numpy(state) -> dict[str, np.ndarray]:
    from ctgen.weights import flatten_state

    return {k: np.asarray(jax.device_get(v)) for k, v in flatten_state(nnx.to_pure_dict(state["params"])).items()}


def assert_params_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def save_toy_weights(path: str, cfg) -> None:
    """A weights directory holding a freshly initialised toy model of `cfg` (seeded by `cfg.seed`)."""
    from ctgen.parallel.mesh import make_mesh
    from ctgen.train import state as state_lib
    from ctgen.weights import save_weights

    stage = ToyStage(cfg)
    setup = state_lib.setup_from_config(cfg, make_mesh(cfg.mesh.to_dict()), stage)
    state = state_lib.create_state(stage, cfg, setup)
    save_weights(path, state["params"], state["model_state"], model="toy", model_config=cfg.model.to_dict())


def toy_predictions(cfg, params, model_state, x: np.ndarray) -> np.ndarray:
    """A toy model of `cfg` with the given state applied to `x`, computed on the host."""
    from ctgen.stages.toy import ToyModel

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ToyModel(ToyStage(cfg).cfg, rngs=nnx.Rngs(0))))
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), (params, model_state))
    model = nnx.merge(graphdef, *host)
    return np.asarray(model(x))
