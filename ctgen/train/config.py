"""Defaults shared by every stage's config (`configs/<stage>.py` starts from `base_config()`).

Field reference (all overridable as `--config.<path>=value`):
  stage            which stage implementation trains (see `ctgen.stages.STAGES`)
  seed             seeds parameter init, per-step RNG and data shuffling
  mesh.{data,fsdp,tensor}   device mesh; one axis may be -1 (= all remaining devices)
  sharding_rules   (logical axis, mesh axes) pairs; first applicable rule wins per dimension
  distributed.*    multi-host initialisation (see ctgen.parallel.distributed)
  optim.<phase>.*  optimizer, schedule, clipping and EMA per training phase
  train.*          steps, global batch size, accumulation, phase order, logging/eval/checkpoint
  init_from        warm-start a new run from a workdir or weights directory: parameters and
                   non-trainable state (e.g. the VQ codebook), not the optimizer
  model.*, data.*  stage specific
"""
from __future__ import annotations

import ml_collections

from ctgen.parallel.axes import DEFAULT_RULES
from ctgen.parallel.distributed import distributed_config
from ctgen.train.optim import optimizer_config


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = ""
    c.seed = 0

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.sharding_rules = tuple((name, axes) for name, axes in DEFAULT_RULES)

    c.distributed = distributed_config()

    c.optim = ml_collections.ConfigDict({"main": optimizer_config()})

    t = c.train = ml_collections.ConfigDict()
    t.steps = 1000
    t.batch_size = 8  # global, across all processes and accumulation micro-batches
    t.accum_steps = 1  # micro-batches per optimizer update (scanned inside one jitted step)
    t.phase_cycle = ("main",)  # order in which loop steps visit the stage's phases
    t.log_every = 10
    t.eval_every = 0  # 0 = only at the end (if the stage has eval data); -1 = never
    t.eval_batches = 0  # 0 = the whole eval split
    t.eval_with_ema = True  # evaluate with EMA parameters when a phase keeps them
    t.preview_every = 0  # 0 = only at the end; -1 = never
    t.checkpoint_every = 500  # 0 = only at the end of the run (a run always ends with a checkpoint)
    t.keep_checkpoints = 3
    t.keep_period = 0  # also keep every checkpoint whose step is a multiple of this (0 = off)
    t.async_checkpointing = True
    t.stop_after_steps = 0  # >0: stop (with a checkpoint) after this many steps in this run,
    #                           e.g. to fit a job time limit; the schedule still spans train.steps
    t.progress_bar = True
    t.profile_steps = 0  # >0: write a jax.profiler trace of that many steps after warm-up

    c.init_from = ""
    c.model = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()
    return c
