"""Model stages that the shared training loop can train, by `config.stage` name.

An explicit table (no decorator registry): add a stage by adding a line here. Each module
exposes `make_stage(config) -> ctgen.train.stage.Stage`.
"""
from __future__ import annotations

import importlib

from ctgen.errors import UserError

STAGES = {
    "toy": "ctgen.stages.toy",
    "ctvit": "ctgen.stages.ctvit",
    "maskgit": "ctgen.stages.maskgit",
    "superres": "ctgen.stages.superres",
}


def get_stage(config):
    name = config.stage
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r} in config.stage; known stages: {sorted(STAGES)}")
    return importlib.import_module(STAGES[name]).make_stage(config)
