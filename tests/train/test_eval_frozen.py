"""The stage seam's eval contract (exact split means) and frozen upstream models, on the toy stage."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ctgen.cli import main
from ctgen.errors import UserError
from ctgen.stages.toy import ToyStage, _Example
from ctgen.train import state as state_lib
from ctgen.train.evaluate import evaluate
from ctgen.train.loop import train
from ctgen.weights import save_weights

from helpers import TOY, save_toy_weights, toy_config, toy_predictions

# 20 eval examples in batches of 16: the second batch has 4 real rows and 12 padded ones.
SPLIT = {"data.num_eval": 20, "data.eval_batch_size": 16}


def _eval_examples(cfg):
    example = _Example(ToyStage(cfg).cfg, cfg.data.data_seed + 1)
    rows = [example.map(i) for i in range(cfg.data.num_eval)]
    return np.stack([r["x"] for r in rows]), np.stack([r["y"] for r in rows])


class CountingToyStage(ToyStage):
    """Records every frozen-model restore and the restored teacher's kernel sharding."""

    def __init__(self, config, loads: list):
        super().__init__(config)
        self.loads = loads

    def _load_teacher(self, weights, mesh, rules):
        module = super()._load_teacher(weights, mesh, rules)
        self.loads.append(module.mid.kernel[...].sharding)
        return module


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("teacher") / "weights")
    save_toy_weights(path, toy_config(**{"seed": 5}))
    return path


def test_eval_mean_is_exact_over_a_padded_split(tmp_path):
    cfg = toy_config(**SPLIT, **{"train.steps": 4, "train.eval_every": 2, "train.preview_every": -1})
    out = train(cfg, str(tmp_path / "run"), ToyStage(cfg))
    x, y = _eval_examples(cfg)
    pred = toy_predictions(cfg, out["state"]["params"], out["state"]["model_state"], x)
    direct = float(np.mean((pred.astype(np.float64) - y) ** 2))
    assert out["eval"]["mse"] == pytest.approx(direct, rel=1e-5)
    # ctgen eval reduces the same way
    save_weights(str(tmp_path / "w"), out["state"]["params"], out["state"]["model_state"], model="toy",
                 model_config=cfg.model.to_dict())
    assert evaluate(cfg, str(tmp_path / "w"), ToyStage(cfg))["mse"] == pytest.approx(direct, rel=1e-5)


def test_frozen_teacher_restored_once_sharded_used_and_never_checkpointed(tmp_path, teacher):
    assert jax.device_count() == 8
    cfg = toy_config(**SPLIT, **{"teacher.weights": teacher, "train.steps": 4, "train.eval_every": 2,
                                 "train.preview_every": 2, "train.checkpoint_every": 2})
    with cfg.unlocked():
        cfg.mesh.update({"data": 2, "fsdp": 4, "tensor": 1})
    loads = []
    run = str(tmp_path / "run")
    out = train(cfg, run, CountingToyStage(cfg, loads))

    # restored once (two evals and two previews used it), sharded like a trained model: mid kernel
    # (mlp 64, embed 64) with embed over fsdp=4
    assert len(loads) == 1
    assert loads[0].spec == jax.sharding.PartitionSpec(None, "fsdp") and len(loads[0].device_set) == 8

    # eval and previews used it: teacher_mse against a direct computation
    x, _ = _eval_examples(cfg)
    teacher_model = ToyStage(cfg)._load_teacher(teacher, loads[0].mesh, ())
    want_teacher = np.asarray(teacher_model(x))
    pred = toy_predictions(cfg, out["state"]["params"], out["state"]["model_state"], x)
    direct = float(np.mean((pred.astype(np.float64) - want_teacher) ** 2))
    assert out["eval"]["teacher_mse"] == pytest.approx(direct, rel=1e-5) and direct > 0
    preview = np.load(os.path.join(run, "previews", "step_00000004", "preview.npz"))
    np.testing.assert_allclose(preview["teacher"], want_teacher[:16], rtol=1e-5, atol=1e-6)

    # never checkpointed: the checkpoint holds the train state's entries only
    saved_state = ocp.StandardCheckpointer().metadata(os.path.join(run, "checkpoints", "4", "state")).item_metadata
    assert set(saved_state.keys()) == set(out["state"]) == {"step", "rng", "params", "model_state", "opt", "ema",
                                                     "phase_updates"}


def test_frozen_states_are_jit_arguments(teacher):
    """The eval function takes the teacher's arrays as arguments: other arrays, other result."""
    cfg = toy_config(**SPLIT, **{"teacher.weights": teacher})
    stage = ToyStage(cfg)
    from ctgen.parallel.mesh import make_mesh

    setup = state_lib.setup_from_config(cfg, make_mesh(cfg.mesh.to_dict()), stage)
    state = state_lib.create_state(stage, cfg, setup)
    frozen = state_lib.restore_frozen(stage, setup.mesh, setup.rules)
    eval_fn = state_lib.make_apply_fn(setup, stage.eval_step, False, frozen)
    batch = state_lib.global_batch(state_lib.numeric_fields(next(iter(stage.eval_data(0, 1)))), setup)
    with jax.set_mesh(setup.mesh):
        a = eval_fn(state, frozen.states, batch)["teacher_mse"]
        zeros = jax.tree.map(lambda v: v * 0, frozen.states)
        b = eval_fn(state, zeros, batch)["teacher_mse"]
    assert float(a) != pytest.approx(float(b), rel=1e-3)


def test_wrong_frozen_weights_path_is_one_clear_line(tmp_path, capsys, teacher):
    missing = str(tmp_path / "no_teacher")
    rc = main(["train", "--config", f"{TOY}:tiny", "--workdir", str(tmp_path / "run"),
               f"--config.teacher.weights={missing}", "--config.train.progress_bar=false"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert f"frozen model 'teacher' (config.teacher.weights={missing}): {missing}: neither a ctgen weights" in err
    cfg = toy_config(**{"teacher.weights": missing})
    with pytest.raises(UserError, match=f"frozen model 'teacher' \\(config.teacher.weights={missing}\\)"):
        evaluate(cfg, teacher, ToyStage(cfg))  # ctgen eval restores frozen models too
