import jax
import jax.extend
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ctgen.errors import UserError
from ctgen.parallel import axes
from ctgen.parallel.mesh import MeshError, make_mesh, resolve_mesh_shape


def test_resolve_mesh_shape():
    assert resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert resolve_mesh_shape({"data": 2, "fsdp": 4, "tensor": 1}, 8) == (2, 4, 1)


@pytest.mark.parametrize("sizes,msg", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices but 8 are available"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, "do not divide|does not divide"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis may be -1"),
    ({"data": 0, "fsdp": 8, "tensor": 1}, "positive"),
    ({"model": 8}, "unknown mesh axes"),
])
def test_invalid_mesh_messages(sizes, msg):
    with pytest.raises(MeshError, match=msg):
        resolve_mesh_shape(sizes, 8)


def test_make_mesh_auto_axes_and_subset():
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    one = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    assert one.size == 1


def test_spec_for_rules():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = axes.DEFAULT_RULES
    assert axes.spec_for(("embed", "mlp"), (64, 128), rules, mesh) == P("fsdp", "tensor")
    # 1365 is not divisible by 2: replicated rather than failing
    assert axes.spec_for(("embed", "mlp"), (64, 1365), rules, mesh) == P("fsdp", None)
    # a mesh axis is used once per array: the second `embed` stays replicated
    assert axes.spec_for(("embed", "embed"), (64, 64), rules, mesh) == P("fsdp", None)
    # vocab falls back to its second rule when `tensor` is taken
    assert axes.spec_for(("mlp", "vocab"), (64, 64), rules, mesh) == P("tensor", "fsdp")
    assert axes.spec_for(None, (3,), rules, mesh) == P()
    # size-1 mesh axes are dropped
    single = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    assert axes.spec_for(("embed", "mlp"), (64, 128), rules, single) == P(None, None)


def test_param_annotations_and_bad_names():
    p = axes.param(np.zeros((2, 3), np.float32), "embed", "mlp")
    assert axes.logical_names(p) == ("embed", "mlp")
    with pytest.raises(ValueError, match="unknown logical axis"):
        axes.param(np.zeros((2,)), "nonsense")
    with pytest.raises(ValueError, match="2 axis names"):
        axes.param(np.zeros((2,)), "embed", "mlp")
    init = axes.with_axes(nnx.initializers.zeros, "vocab", "embed")
    v = nnx.Param(init(jax.random.PRNGKey(0), (4, 8)))
    assert axes.logical_names(v) == ("vocab", "embed")


def test_rules_from_config_validates():
    assert axes.rules_from_config([["embed", "fsdp"], ["mlp", ["tensor"]], ["kv", None]]) == (
        ("embed", "fsdp"), ("mlp", ("tensor",)), ("kv", None))
    with pytest.raises(UserError, match="not one of data/fsdp/tensor"):
        axes.rules_from_config([["embed", "model"]])


def test_constrain_follows_the_active_rules():
    import jax.numpy as jnp

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = jnp.ones((8, 4, 6))
    assert axes.constrain(x, ("batch", "length", "mlp")) is x  # no activation_sharding block: no-op

    def run(rules):
        def f(x):
            with axes.activation_sharding(mesh, rules):
                return axes.constrain(x * 2, ("batch", "length", "mlp"))

        return jax.jit(f)(x).sharding.spec

    assert run(axes.DEFAULT_RULES) == P(("data", "fsdp"), None, "tensor")
    assert run((("batch", "data"), ("mlp", "tensor"))) == P("data", None, "tensor")
    assert run(()) == P()  # no rules: replicated


def test_batch_axes_come_from_the_batch_rule():
    from ctgen.parallel.mesh import batch_shards

    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    assert axes.batch_axes(axes.DEFAULT_RULES, mesh) == ("data", "fsdp")
    assert axes.describe_batch_axes(axes.DEFAULT_RULES, mesh) == "data*fsdp=8"
    assert axes.batch_axes([("batch", "data")], mesh) == ("data",) and batch_shards(mesh, [("batch", "data")]) == 2
    assert axes.describe_batch_axes([("embed", "fsdp")], mesh) == "no mesh axis=1"


def _constraint_specs(fn, *args) -> list:
    """PartitionSpecs of every sharding constraint in the jaxpr of `fn(*args)` (nested jaxprs too)."""
    specs = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                specs.append(eqn.params["sharding"].spec)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return specs


def test_models_constrain_their_activations_by_the_rules():
    """The CT-ViT (and its shared attention/feed-forward layers) and the T5 encoder pin their
    activations through `constrain`: batch over the `batch` rule's axes, the feed-forward hidden
    over `mlp`'s; a user's rules change them, and with no active rules there are none."""
    import jax.numpy as jnp
    from flax import nnx

    from ctgen.models.ctvit import CTViT, CTViTConfig
    from ctgen.text.config import T5Config
    from ctgen.text.t5 import T5Encoder

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ctvit = CTViT(CTViTConfig.tiny(max_slices=3), rngs=nnx.Rngs(0))
    t5 = T5Encoder(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4), rngs=nnx.Rngs(0))
    vol = jnp.zeros((4, 3, 32, 32))
    ids, mask = jnp.ones((4, 6), jnp.int32), jnp.ones((4, 6), bool)

    def under(rules, model, *args):
        def f(*a):
            with axes.activation_sharding(mesh, rules):
                return model(*a)
        return _constraint_specs(f, *args)

    for model, args in ((lambda v: ctvit.reconstruct(v), (vol,)), (t5, (ids, mask))):
        assert not _constraint_specs(model, *args)
        specs = under(axes.DEFAULT_RULES, model, *args)
        assert specs and all(s[0] == ("data", "fsdp") for s in specs)
        assert any("tensor" in s[1:] for s in specs)  # mlp / heads over tensor
        user = under((("batch", "data"),), model, *args)
        assert len(user) == len(specs) and all(s[0] == "data" and "tensor" not in s[1:] for s in user)
