"""One builder from config sections to model dataclasses: nesting, lists -> tuples, unknown fields."""
import dataclasses
import json

import ml_collections
import pytest

from ctgen.config_dataclass import build_dataclass
from ctgen.errors import UserError
from ctgen.models.ctvit import CTViTConfig
from ctgen.models.ctvit_losses import LossNetworksConfig
from ctgen.models.discriminator import DiscriminatorConfig
from ctgen.text.config import T5Config


def test_nested_sections_and_json_round_trip():
    cfg = CTViTConfig.tiny(max_slices=17)
    section = ml_collections.ConfigDict(cfg.to_dict())
    assert build_dataclass(CTViTConfig, section) == cfg
    assert CTViTConfig.from_dict(section) == cfg  # the models keep their from_dict, built here
    nets = LossNetworksConfig.tiny()
    plain = json.loads(json.dumps(dataclasses.asdict(nets)))  # tuples came back as lists
    back = build_dataclass(LossNetworksConfig, plain)
    assert back == nets and isinstance(back.vgg.widths, tuple) and isinstance(back.discr, DiscriminatorConfig)
    assert T5Config.from_dict({"d_model": 64}) == T5Config(d_model=64)


@pytest.mark.parametrize("cls,values,msg", [
    (CTViTConfig, {"dim": 8, "dimm": 3}, r"config.model: unknown CTViTConfig field\(s\) dimm; known: codebook_size"),
    (LossNetworksConfig, {"discr": {"base_dimm": 2}},
     r"config.model.discr: unknown DiscriminatorConfig field\(s\) base_dimm"),
    (LossNetworksConfig, {"vgg": 3}, r"config.model.vgg: expected a group of VGGConfig fields, got 3"),
])
def test_unknown_fields_are_one_line(cls, values, msg):
    with pytest.raises(UserError, match=msg) as e:
        build_dataclass(cls, values, where="config.model")
    assert "\n" not in str(e.value)
