import numpy as np
import pytest

from ctgen.convert.namemap import ConversionError, Rule, convert, transpose
from ctgen.weights import flatten_state, unflatten_state

RULES = [
    Rule("layers/{i}/attn/to_q/kernel", "layers.{i}.1.to_q.weight", transpose, transpose),
    Rule("norm/scale", "norm.gamma"),
]


def test_roundtrip_with_hooks():
    ours = {"layers/0/attn/to_q/kernel": np.arange(6.0).reshape(2, 3), "norm/scale": np.ones(3)}
    foreign, rep = convert(ours, RULES, direction="to_foreign")
    assert rep.ok and rep.converted == 2
    assert foreign["layers.0.1.to_q.weight"].shape == (3, 2)
    back, _ = convert(foreign, RULES, direction="to_ours")
    np.testing.assert_array_equal(back["layers/0/attn/to_q/kernel"], ours["layers/0/attn/to_q/kernel"])


def test_report_names_every_problem():
    foreign = {"layers.0.1.to_q.weight": np.zeros((3, 2)), "stray.weight": np.zeros(1)}
    with pytest.raises(ConversionError) as err:
        convert(foreign, RULES, direction="to_ours",
                expected_shapes={"layers/0/attn/to_q/kernel": (3, 2), "norm/scale": (3,)})
    msg = str(err.value)
    assert "stray.weight" in msg and "norm/scale" in msg and "(2, 3) vs (3, 2)" in msg


def test_flatten_unflatten():
    tree = {"a": {0: {"w": 1}, 1: {"w": 2}}, "b": 3}
    flat = flatten_state(tree)
    assert flat == {"a/0/w": 1, "a/1/w": 2, "b": 3}
    assert unflatten_state(flat) == tree
