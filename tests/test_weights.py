"""ctgen.weights: markers (and the keys older markers used), abstract models, partial restore
straight onto a mesh, sub-models stored at the root, and errors naming what does not fit."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctgen import weights as weights_lib
from ctgen.errors import UserError
from ctgen.models.layers import Buffer, Dense
from ctgen.parallel.axes import param
from ctgen.parallel.mesh import make_mesh


class Part(nnx.Module):
    def __init__(self, width: int = 8, *, rngs: nnx.Rngs):
        self.inp = Dense(4, width, axes=("embed", "mlp"), rngs=rngs)
        self.out = Dense(width, 4, axes=("mlp", "embed"), rngs=rngs)
        self.count = param(jnp.arange(3.0), "norm", cls=Buffer)


class Whole(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.part = Part(rngs=rngs)
        self.extra = Dense(4, 2, axes=("embed", None), rngs=rngs)


def _save(path, tree, model="test", **kw):
    params, rest = nnx.split_state(nnx.state(tree) if isinstance(tree, nnx.Module) else tree, nnx.Param, ...)
    weights_lib.save_weights(path, params, rest, model=model, model_config={"width": 8}, **kw)


def _assert_same(a: nnx.Module, b: nnx.Module):
    fa = weights_lib.flatten_state(weights_lib.to_pure(nnx.state(a)))
    fb = weights_lib.flatten_state(weights_lib.to_pure(nnx.state(b)))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_marker_and_the_keys_older_markers_used(tmp_path):
    path = str(tmp_path / "w")
    assert weights_lib.weights_info(path) is None
    _save(path, Part(rngs=nnx.Rngs(0)), info={"source": "here"})
    info = weights_lib.weights_info(path)
    assert (info["format"], info["model"], info["model_config"], info["source"]) == (
        "ctgen-weights-v1", "test", {"width": 8}, "here")
    marker = os.path.join(path, weights_lib.WEIGHTS_MARKER)
    for old, model, config in ((({"stage": "ctvit", "ctvit_config": {"dim": 32}}), "ctvit", {"dim": 32}),
                               (({"stage": "text", "t5_config": {"d_model": 64}}), "t5_encoder", {"d_model": 64}),
                               (({"stage": "toy"}), "toy", {})):
        with open(marker, "w", encoding="utf-8") as f:
            json.dump({"format": "ctgen-weights-v1", "written": "2025-01-01T00:00:00", **old}, f)
        info = weights_lib.weights_info(path)
        assert (info["model"], info["model_config"]) == (model, config)


def test_abstract_model_computes_no_weights_and_carries_shardings():
    graphdef, state = weights_lib.abstract_model(lambda rngs: Part(rngs=rngs))
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert {x.sharding for x in leaves} == {jax.sharding.SingleDeviceSharding(jax.local_devices()[0])}
    _, state = weights_lib.abstract_model(lambda rngs: Part(rngs=rngs), mesh=make_mesh({"data": 2, "fsdp": 2,
                                                                                        "tensor": 2}))
    assert state["inp"]["kernel"].get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_part_of_a_bigger_model_restores_onto_a_mesh(tmp_path):
    whole = Whole(rngs=nnx.Rngs(1))
    path = str(tmp_path / "whole")
    _save(path, whole)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    part = weights_lib.load_model(path, lambda rngs: Part(rngs=rngs), at="part", mesh=mesh)
    _assert_same(part, whole.part)
    kernel = part.inp.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 4)


def test_sub_model_stored_at_the_root(tmp_path):
    """A tree saved before `part` was wrapped (its entries at the root, beside `extra`) loads into
    the wrapper, and `part` alone loads from it."""
    whole = Whole(rngs=nnx.Rngs(2))
    state = weights_lib.to_pure(nnx.state(whole))
    old = {**state["part"], "extra": state["extra"]}
    params = {k: v for k, v in old.items() if k != "count"}
    path = str(tmp_path / "old")
    weights_lib.save_weights(path, params, {"count": old["count"]}, model="test", model_config={})
    _assert_same(weights_lib.load_model(path, lambda rngs: Whole(rngs=rngs)), whole)
    _assert_same(weights_lib.load_model(path, lambda rngs: Part(rngs=rngs), at="part"), whole.part)


def test_what_does_not_fit_is_named(tmp_path):
    path = str(tmp_path / "part")
    _save(path, Part(rngs=nnx.Rngs(3)))
    with pytest.raises(UserError) as err:
        weights_lib.load_model(path, lambda rngs: Part(6, rngs=rngs))
    msg = str(err.value)
    assert os.path.join(path, "weights") in msg
    assert "params/inp/kernel: (4, 8) vs (4, 6)" in msg and "params/out/kernel: (8, 4) vs (6, 4)" in msg
    with pytest.raises(UserError, match=r"missing \(2\):\n  params/extra/bias\n  params/extra/kernel"):
        weights_lib.load_model(path, lambda rngs: Whole(rngs=rngs))
    with pytest.raises(UserError, match="neither a ctgen weights directory"):
        weights_lib.load_model(str(tmp_path), lambda rngs: Part(rngs=rngs))


def test_a_workdir_checkpoint_loads_quietly(tmp_path, caplog):
    """Weights read out of a training workdir (train state + data-iterator state, as the loop
    saves them) load without Orbax warnings (that the data item could not be restored, that the
    read-only manager's options were changed)."""
    from ctgen.train.checkpoint import Checkpointer

    part = Part(rngs=nnx.Rngs(4))
    params, rest = nnx.split_state(nnx.state(part), nnx.Param, ...)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(7, {"params": weights_lib.to_pure(params), "model_state": weights_lib.to_pure(rest),
                  "step": jnp.asarray(7)}, {"position": 3})
    ckpt.close()
    caplog.set_level("WARNING")
    loaded = weights_lib.load_model(str(tmp_path), lambda rngs: Part(rngs=rngs))
    _assert_same(loaded, part)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
