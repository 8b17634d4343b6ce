"""A training step on 8 emulated devices with parameters really sharded, vs one device."""
import jax
import numpy as np
import pytest

from ctgen.stages.toy import ToyStage
from ctgen.train.loop import train

from helpers import params_numpy, toy_config

MESHES = {
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def _run(tmp_path, name, mesh, devices):
    cfg = toy_config(**{"train.steps": 6, "train.eval_every": -1, "train.log_every": 1,
                        "train.checkpoint_every": 1000, "train.batch_size": 16})
    with cfg.unlocked():
        cfg.mesh.update(mesh)
    return train(cfg, str(tmp_path / name), ToyStage(cfg), devices=devices)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one"), "run", {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_step_matches_one_device(tmp_path, one_device, mesh_name):
    assert jax.device_count() == 8
    mesh = MESHES[mesh_name]
    out = _run(tmp_path, mesh_name, mesh, None)
    kernel = out["state"]["params"]["mid"]["kernel"][...]  # logical (mlp, embed): 64 x 64
    shard = kernel.addressable_shards[0].data.shape
    # embed -> fsdp, mlp -> tensor under the default rules
    assert shard == (64 // mesh["tensor"], 64 // mesh["fsdp"]), shard
    assert len({s.device for s in kernel.addressable_shards}) == 8
    inp = out["state"]["params"]["inp"]["kernel"][...]  # (embed 16, mlp 64)
    assert inp.addressable_shards[0].data.shape == (16 // mesh["fsdp"], 64 // mesh["tensor"])
    # Adam moments are sharded like their parameters.
    mu = out["state"]["opt"]["main"][1][0].mu["mid"]["kernel"][...]
    assert mu.sharding.spec == kernel.sharding.spec
    np.testing.assert_allclose(out["train"]["loss"], one_device["train"]["loss"], rtol=1e-5, atol=1e-6)
    a, b = params_numpy(out["state"]), params_numpy(one_device["state"])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, rtol=1e-4, err_msg=k)


def test_a_users_batch_rule_decides_how_batches_are_split(tmp_path):
    """sharding_rules with ("batch", "data"): batches and micro-batches split over `data` only, so a
    batch of 4 in 2 micro-batches trains on data=2 x fsdp=4 (the default rules need multiples of 8)."""
    from jax.sharding import PartitionSpec as P

    from ctgen.errors import UserError
    from ctgen.parallel.axes import DEFAULT_RULES
    from ctgen.parallel.mesh import make_mesh
    from ctgen.train import state as state_lib

    mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    over = {"train.steps": 3, "train.eval_every": -1, "train.batch_size": 4, "train.accum_steps": 2,
            "train.checkpoint_every": 1000}

    def config(batch_rule):
        cfg = toy_config(**over)
        with cfg.unlocked():
            cfg.mesh.update(mesh)
            cfg.sharding_rules = (batch_rule, *[r for r in DEFAULT_RULES if r[0] != "batch"])
        return cfg

    user = config(("batch", "data"))
    setup = state_lib.setup_from_config(user, make_mesh(mesh), ToyStage(user))
    x = state_lib.global_batch({"x": np.zeros((4, 16), np.float32)}, setup)["x"]
    assert x.sharding.spec == P("data", None)
    out = train(user, str(tmp_path / "user"), ToyStage(user))
    assert out["final_step"] == 3
    default = config(("batch", ("data", "fsdp")))
    with pytest.raises(UserError, match="must be divisible by data\\*fsdp=8 times train.accum_steps=2"):
        train(default, str(tmp_path / "default"), ToyStage(default))
    one = toy_config(**over)
    with one.unlocked():
        one.mesh.update({"data": 1, "fsdp": 1, "tensor": 1})
    ref = train(one, str(tmp_path / "one"), ToyStage(one), devices=jax.devices()[:1])
    a, b = params_numpy(out["state"]), params_numpy(ref["state"])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, rtol=1e-4, err_msg=k)
