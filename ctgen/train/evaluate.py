"""`ctgen eval`: run a stage's eval (and optionally previews) on saved weights, no training."""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from ctgen import weights as weights_lib
from ctgen.errors import UserError
from ctgen.parallel import axes as axes_lib
from ctgen.parallel.mesh import describe, make_mesh
from ctgen.train import state as state_lib

log = logging.getLogger(__name__)


def load_for_inference(config: ml_collections.ConfigDict, weights: str, stage, *, devices=None):
    """(setup, state) of `stage` with weights from a weights directory or a workdir's latest
    checkpoint (its EMA parameters if the config evaluates with EMA), read straight onto the
    config's mesh. `state` has params (EMA merged in), model_state and no EMA; `setup` has no
    optimizers (the shapes come from the stage's abstract model; optimizer state is never read)."""
    mesh = make_mesh(config.mesh.to_dict(), devices)
    if not os.path.exists(weights):
        raise UserError(f"--weights {weights}: no such directory")
    rules = axes_lib.rules_from_config(config.sharding_rules)
    graphdef, abstract = weights_lib.abstract_model(stage.build_model, mesh=mesh, rules=rules)
    params, model_state = nnx.split_state(abstract, nnx.Param, ...)
    phases = {p.name: p for p in stage.phases()}
    ema_phases = [n for n in dict.fromkeys(config.train.phase_cycle)
                  if n in phases and n in config.optim and config.optim[n].ema_decay > 0]
    abstract_ema = {n: nnx.filter_state(params, phases[n].trains) for n in ema_phases}
    abstract_state = {"params": params, "model_state": model_state, "ema": {}}
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    setup = state_lib.Setup(graphdef, phases, {}, {}, abstract_state, shardings, mesh, rules)
    params, model_state, ema = weights_lib.load_weights_and_ema(
        weights, params, model_state, abstract_ema if config.train.eval_with_ema else None)
    params = state_lib.eval_params({"params": params, "ema": ema or {}}, use_ema=True)
    state = {"params": params, "model_state": model_state, "ema": {}}
    log.info("loaded %s%s (%s)", weights, " with EMA parameters" if ema else "", describe(mesh))
    return setup, state


def evaluate(config: ml_collections.ConfigDict, weights: str, stage, *, previews: str | None = None,
             devices=None) -> dict[str, Any]:
    """`stage`'s eval metrics on its eval split with `weights` (same reduction as the training
    loop's eval); previews of the first eval batch go to `previews` if given."""
    from ctgen.train.loop import evaluate_split, preview

    setup, state = load_for_inference(config, weights, stage, devices=devices)
    data = stage.eval_data(jax.process_index(), jax.process_count())
    if data is None:
        raise UserError(f"stage {config.stage!r} has no eval data with this config (check config.data)")
    frozen = state_lib.restore_frozen(stage, setup.mesh, setup.rules)
    with jax.set_mesh(setup.mesh):
        eval_fn = state_lib.make_apply_fn(setup, stage.eval_step, False, frozen)
        metrics = evaluate_split(stage, eval_fn, state, frozen, data, config.train.eval_batches, setup)
        if previews:
            preview_fn = state_lib.make_apply_fn(setup, stage.preview_step, False, frozen)
            preview(stage, preview_fn, state, frozen, data, None, setup, previews, 0)
    return metrics
