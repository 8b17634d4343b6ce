"""Resuming: 2N straight == N, stop, resume, N more (params and batches), and the checkpoint
restores onto other meshes and device counts."""
import jax
import numpy as np
import pytest

from ctgen import weights as weights_lib
from ctgen.errors import UserError
from ctgen.stages.toy import ToyStage
from ctgen.train import checkpoint as ckpt_lib
from ctgen.train.loop import train

from helpers import RecordingToyStage, assert_params_equal, params_numpy, toy_config

N = 7


def _cfg(**kw):
    base = {"train.steps": 2 * N, "train.checkpoint_every": 5, "train.eval_every": -1,
            "train.log_every": 1, "train.batch_size": 16}
    base.update(kw)
    return toy_config("two_phase,ema", **base)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    log = []
    cfg = _cfg()
    out = train(cfg, str(tmp_path_factory.mktemp("straight")), RecordingToyStage(cfg, log))
    return out, log


def test_stop_and_resume_is_identical(tmp_path, straight):
    ref, ref_log = straight
    log = []
    cfg = _cfg(**{"train.stop_after_steps": N})
    first = train(cfg, str(tmp_path), RecordingToyStage(cfg, log))
    assert first["final_step"] == N
    assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() == N
    # A fresh process would rebuild everything from the workdir: so do we.
    cfg2 = _cfg()
    second = train(cfg2, str(tmp_path), RecordingToyStage(cfg2, log))
    assert second["start_step"] == N and second["final_step"] == 2 * N
    assert log == ref_log, "a resumed run must see exactly the batches of an uninterrupted one"
    assert_params_equal(params_numpy(second["state"]), params_numpy(ref["state"]))
    for name in ("main", "aux"):
        assert int(second["state"]["phase_updates"][name]) == int(ref["state"]["phase_updates"][name])
    ema_a = jax.device_get(second["state"]["ema"]["main"]["mid"]["kernel"][...])
    ema_b = jax.device_get(ref["state"]["ema"]["main"]["mid"]["kernel"][...])
    np.testing.assert_array_equal(ema_a, ema_b)


@pytest.mark.parametrize("mesh,ndev", [({"data": 2, "fsdp": 4, "tensor": 1}, 8),
                                       ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
                                       ({"data": 1, "fsdp": 2, "tensor": 2}, 4)])
def test_checkpoint_restores_onto_other_meshes(tmp_path, mesh, ndev):
    cfg = _cfg(**{"train.steps": 4, "train.checkpoint_every": 4})
    with cfg.unlocked():
        cfg.mesh.update({"data": 1, "fsdp": 8, "tensor": 1})
    saved = train(cfg, str(tmp_path), ToyStage(cfg))
    want = params_numpy(saved["state"])
    # Continue the same workdir on another mesh: it must resume, not restart.
    cfg2 = _cfg(**{"train.steps": 5, "train.checkpoint_every": 100})
    with cfg2.unlocked():
        cfg2.mesh.update(mesh)
    resumed = train(cfg2, str(tmp_path), ToyStage(cfg2), devices=jax.devices()[:ndev])
    assert resumed["start_step"] == 4
    kernel = resumed["state"]["params"]["mid"]["kernel"][...]
    assert len(kernel.sharding.device_set) == ndev
    # And the restored values are exactly the saved ones.
    from ctgen.parallel.mesh import make_mesh
    from ctgen.train import state as state_lib
    m = make_mesh(mesh, jax.devices()[:ndev])
    setup = state_lib.setup_from_config(cfg2, m, ToyStage(cfg2))
    ck = ckpt_lib.Checkpointer(str(tmp_path))
    state, data = ck.restore(4, setup.abstract)
    ck.close()
    assert data is not None
    assert_params_equal(params_numpy(state), want)
    assert state["params"]["inp"]["kernel"][...].sharding.mesh.shape == m.shape


def test_init_from_warm_starts_params_only(tmp_path):
    cfg = _cfg(**{"train.steps": 3})
    src = train(cfg, str(tmp_path / "src"), ToyStage(cfg))
    cfg2 = _cfg(**{"train.steps": 1, "init_from": str(tmp_path / "src")})  # "ema" variant: EMA kept
    with cfg2.unlocked():
        cfg2.optim.main.learning_rate = 0.0  # keep params as loaded
        cfg2.optim.main.weight_decay = 0.0
        cfg2.train.phase_cycle = ("main",)
        cfg2.model.momentum = 1.0  # keep the running mean as loaded too
    dst = train(cfg2, str(tmp_path / "dst"), ToyStage(cfg2))
    assert dst["start_step"] == 0  # a fresh run: step/optimizer not taken over
    assert int(dst["state"]["opt"]["main"][1][0].count) == 1
    assert_params_equal(params_numpy(dst["state"]), params_numpy(src["state"]))
    # non-trainable model state (here a running mean; for CT-ViT the VQ codebook) comes along
    loaded = jax.device_get(dst["state"]["model_state"]["target_mean"][...])
    trained = jax.device_get(src["state"]["model_state"]["target_mean"][...])
    assert np.abs(trained).max() > 0  # not the zeros a fresh init starts from
    np.testing.assert_array_equal(loaded, trained)
    # the EMA starts from the loaded weights (lr 0: they stay put), not from the random init
    ema = jax.device_get(dst["state"]["ema"]["main"]["mid"]["kernel"][...])
    np.testing.assert_allclose(ema, params_numpy(src["state"])["mid/kernel"], rtol=1e-6, atol=1e-7)


def test_warm_start_of_a_model_without_non_trainable_state_keeps_the_state_type(tmp_path):
    """A model with no non-trainable state (the SR U-Net) has an empty nnx.State there; loading
    must hand back an nnx.State, not a dict, or the jitted step's shardings no longer match
    (the SR fine-tune with init_from failed so)."""
    from flax import nnx

    cfg = _cfg(**{"train.steps": 1})
    src = train(cfg, str(tmp_path / "src"), ToyStage(cfg))
    empty = nnx.State({})
    assert not empty  # falsy: the case `x or {}` turned into a dict
    params, model_state = weights_lib.load_weights(str(tmp_path / "src"), src["state"]["params"], empty)
    assert isinstance(model_state, nnx.State) and not jax.tree.leaves(model_state)
    assert_params_equal(params_numpy({"params": params}), params_numpy(src["state"]))
    _, model_state, _ = weights_lib.load_weights_and_ema(str(tmp_path / "src"), src["state"]["params"], empty, None)
    assert isinstance(model_state, nnx.State)


def test_weights_directory_roundtrip(tmp_path):
    cfg = _cfg(**{"train.steps": 2})
    out = train(cfg, str(tmp_path / "run"), ToyStage(cfg))
    st = out["state"]
    weights_lib.save_weights(str(tmp_path / "w"), st["params"], st["model_state"], model="toy",
                             model_config=cfg.model.to_dict())
    assert weights_lib.weights_info(str(tmp_path / "w"))["model"] == "toy"
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    for source in ("w", "run"):  # a weights directory, or a workdir's latest checkpoint
        params, model_state = weights_lib.load_weights(str(tmp_path / source), abstract(st["params"]),
                                                    abstract(st["model_state"]))
        assert_params_equal(params_numpy({"params": params}), params_numpy(st))
        np.testing.assert_array_equal(jax.device_get(model_state["target_mean"][...]),
                                      jax.device_get(st["model_state"]["target_mean"][...]))
    with pytest.raises(UserError, match="neither a ctgen weights directory"):
        weights_lib.load_weights(str(tmp_path / "nothing"), abstract(st["params"]))


def test_checkpoint_every_zero_saves_only_at_the_end(tmp_path):
    cfg = _cfg(**{"train.steps": 3, "train.checkpoint_every": 0})
    train(cfg, str(tmp_path / "zero"), ToyStage(cfg))
    ck = ckpt_lib.Checkpointer(str(tmp_path / "zero"))
    assert ck.all_steps() == [3]
    ck.close()
    with pytest.raises(UserError, match="train.checkpoint_every must be >= 0"):
        negative = _cfg(**{"train.steps": 3, "train.checkpoint_every": -1})
        train(negative, str(tmp_path / "negative"), ToyStage(negative))


def test_retention_keeps_the_newest(tmp_path):
    cfg = _cfg(**{"train.steps": 8, "train.checkpoint_every": 2, "train.keep_checkpoints": 2})
    train(cfg, str(tmp_path), ToyStage(cfg))
    assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [6, 8]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["6", "8"]


def test_resuming_with_another_model_is_one_clear_error(tmp_path):
    cfg = _cfg(**{"train.steps": 2})
    train(cfg, str(tmp_path), ToyStage(cfg))
    other = _cfg(**{"train.steps": 4, "model.hidden": 32})
    with pytest.raises(UserError, match=r"checkpoint at step 2 does not fit the model .* new --workdir"):
        train(other, str(tmp_path), ToyStage(other))
