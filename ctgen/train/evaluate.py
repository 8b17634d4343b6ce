"""`ctgen eval`: run a stage's eval (and optionally previews) on saved weights, no training."""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections

from ctgen.errors import UserError
from ctgen.parallel import axes as axes_lib
from ctgen.parallel.mesh import describe, make_mesh
from ctgen.stages import get_stage
from ctgen.train import checkpoint as ckpt_lib
from ctgen.train import state as state_lib
from ctgen.train.optim import make_optimizer

log = logging.getLogger(__name__)


def load_for_inference(config: ml_collections.ConfigDict, weights: str, *, stage=None, devices=None):
    """(stage, setup, state) with weights from a weights directory or a workdir's latest checkpoint
    (its EMA parameters if the config evaluates with EMA), sharded over the config's mesh."""
    mesh = make_mesh(config.mesh.to_dict(), devices)
    rules = axes_lib.rules_from_config(config.sharding_rules)
    stage = stage or get_stage(config)
    names = list(dict.fromkeys(config.train.phase_cycle))
    optimizers = {n: make_optimizer(config.optim[n], config.train.steps) for n in names}
    setup = state_lib.build_setup(stage, config, mesh, rules, optimizers)
    if not os.path.exists(weights):
        raise UserError(f"--weights {weights}: no such directory")
    ckpt_dir = os.path.join(weights, "checkpoints")
    if ckpt_lib.weights_info(weights) is None and os.path.isdir(ckpt_dir):
        ck = ckpt_lib.Checkpointer(weights, async_save=False)
        step = ck.latest_step()
        if step is None:
            ck.close()
            raise UserError(f"{weights}: workdir has no complete checkpoint")
        full, _ = ck.restore(step, setup.abstract)
        ck.close()
        params = state_lib.eval_params(full, config.train.eval_with_ema)
        state = {"params": params, "model_state": full["model_state"], "ema": {}}
        log.info("loaded %s step %d (%s)", weights, step, describe(mesh))
    else:
        try:
            params, model_state = ckpt_lib.load_weights(weights, setup.abstract["params"],
                                                        setup.abstract["model_state"])
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        state = {"params": params, "model_state": model_state, "ema": {}}
        log.info("loaded weights %s (%s)", weights, describe(mesh))
    return stage, setup, state


def evaluate(config: ml_collections.ConfigDict, weights: str, *, previews: str | None = None,
             stage=None, devices=None) -> dict[str, Any]:
    from ctgen.train.loop import _evaluate, _preview

    stage, setup, state = load_for_inference(config, weights, stage=stage, devices=devices)
    data = stage.eval_data(jax.process_index(), jax.process_count())
    if data is None:
        raise UserError(f"stage {config.stage!r} has no eval data with this config (check config.data)")
    with jax.set_mesh(setup.mesh):
        eval_fn = state_lib.make_apply_fn(setup, stage.eval_step, use_ema=False)
        metrics = _evaluate(eval_fn, state, data, config.train.eval_batches, setup.mesh)
        if previews:
            preview_fn = state_lib.make_apply_fn(setup, stage.preview_step, use_ema=False)
            _preview(stage, preview_fn, state, data, None, setup.mesh, previews, 0)
    return metrics
