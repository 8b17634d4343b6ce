"""Sharded train state and the jitted per-phase update / eval steps.

The train state is a plain dict PyTree (what Orbax saves):
  step         int32, loop steps taken (all phases)
  rng          uint32[2], the run's base key; step keys are fold_in(rng, step)
  params       nnx.State of every nnx.Param
  model_state  nnx.State of every other variable (e.g. VQ EMA buffers)
  opt          {phase: optax state over that phase's parameters}
  ema          {phase: EMA copy of that phase's parameters} for phases with ema_decay > 0
  phase_updates {phase: int32 updates taken by that phase}
NNX variables keep their logical-axis metadata inside the PyTree, so optimizer moments and EMA
copies shard exactly like the parameters they mirror.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ctgen.errors import UserError
from ctgen.parallel import axes as axes_lib
from ctgen.parallel.mesh import BATCH_AXES, batch_sharding, batch_shards, replicated
from ctgen.train.optim import ema_update, make_optimizer
from ctgen.train.stage import Phase

TrainState = dict


@dataclasses.dataclass
class Setup:
    """Everything derived once from (stage, config, mesh): used by the loop and by tools
    (`ctgen eval` builds one without optimizers, see `ctgen.train.evaluate`)."""

    graphdef: Any
    phases: dict[str, Phase]
    optimizers: dict[str, optax.GradientTransformation]
    ema_cfg: dict[str, Any]
    abstract: TrainState  # ShapeDtypeStructs with shardings
    shardings: TrainState
    mesh: Mesh


def _split_model(model: nnx.Module):
    return nnx.split(model, nnx.Param, ...)


def setup_from_config(config, mesh: Mesh, stage=None) -> tuple[Any, Setup]:
    """(stage, Setup) for `config` on `mesh`: the stage (`config.stage` unless given), one
    optimizer per phase in `train.phase_cycle` from `config.optim`, the sharding rules table.
    Used by training, `ctgen eval` and tools, so they all build the same state layout."""
    from ctgen.stages import get_stage

    stage = stage or get_stage(config)
    names = list(dict.fromkeys(config.train.phase_cycle))
    for name in names:
        if name not in config.optim:
            raise UserError(f"phase {name!r} has no optimizer config: set config.optim.{name}")
    optimizers = {n: make_optimizer(config.optim[n], config.train.steps) for n in names}
    rules = axes_lib.rules_from_config(config.sharding_rules)
    return stage, build_setup(stage, config, mesh, rules, optimizers)


def build_setup(stage, config, mesh: Mesh, rules, optimizers: dict[str, optax.GradientTransformation]) -> Setup:
    phases = {p.name: p for p in stage.phases()}
    for name in config.train.phase_cycle:
        if name not in phases:
            raise UserError(
                f"train.phase_cycle names phase {name!r}, but this stage has phases {sorted(phases)}"
            )
    used = dict.fromkeys(config.train.phase_cycle)
    phases = {n: phases[n] for n in used}
    ema_cfg = {n: config.optim[n] for n in phases if config.optim[n].ema_decay > 0}
    init = make_init_fn(stage, config.seed, phases, optimizers, ema_cfg)
    # Outside the mesh context: NNX would otherwise read logical names as mesh axes.
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: stage.build_model(nnx.Rngs(0))))
    abstract_values = jax.eval_shape(init)
    shardings = axes_lib.tree_shardings(abstract_values, rules, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_values, shardings
    )
    return Setup(graphdef, phases, optimizers, ema_cfg, abstract, shardings, mesh)


def make_init_fn(stage, seed: int, phases: dict[str, Phase], optimizers, ema_cfg) -> Callable[[], TrainState]:
    def init() -> TrainState:
        model = stage.build_model(nnx.Rngs(params=seed, default=seed + 1))
        _, params, model_state = _split_model(model)
        opt, ema = {}, {}
        for name, phase in phases.items():
            opt[name] = optimizers[name].init(nnx.filter_state(params, phase.trains))
            if name in ema_cfg:
                ema[name] = init_ema(params, phase)
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed),
            "params": params,
            "model_state": model_state,
            "opt": opt,
            "ema": ema,
            "phase_updates": {name: jnp.zeros((), jnp.int32) for name in phases},
        }

    return init


def init_ema(params, phase: Phase):
    """A phase's EMA copy before any update: a copy of the parameters that phase trains."""
    return jax.tree.map(jnp.copy, nnx.filter_state(params, phase.trains))


def create_state(stage, config, setup: Setup) -> TrainState:
    """Initialise the train state directly into its shardings (no host-side full copy)."""
    init = make_init_fn(stage, config.seed, setup.phases, setup.optimizers, setup.ema_cfg)
    with jax.set_mesh(setup.mesh):
        return jax.jit(init, out_shardings=setup.shardings)()


def eval_params(state: TrainState, use_ema: bool):
    """Parameters for eval/preview: EMA copies where kept (if `use_ema`), else the live ones."""
    params = state["params"]
    if use_ema and state["ema"]:
        params = nnx.merge_state(params, *state["ema"].values())
    return params


def _microbatches(batch, k: int, mesh: Mesh):
    """(B, ...) -> (k, B/k, ...) taking every k-th example, so each micro-batch stays evenly
    sharded over the batch axes without moving data between devices."""

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        spec = PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def make_train_step(setup: Setup, phase_name: str, accum_steps: int, prefix_metrics: bool):
    phase = setup.phases[phase_name]
    optimizer = setup.optimizers[phase_name]
    graphdef, mesh = setup.graphdef, setup.mesh
    ema = setup.ema_cfg.get(phase_name)

    def loss_of(trainable, frozen, model_state, batch, rng):
        # copy=True: fresh Variables at this trace level, so the loss may mutate model state.
        model = nnx.merge(graphdef, trainable, frozen, model_state, copy=True)
        loss, metrics = phase.loss(model, batch, rng)
        new_state = nnx.state(model, nnx.Not(nnx.Param))
        return loss, (metrics, new_state)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        trainable, frozen = nnx.split_state(state["params"], phase.trains, ...)
        if accum_steps == 1:
            (loss, (metrics, model_state)), grads = grad_fn(trainable, frozen, state["model_state"], batch, rng)
        else:
            micro = _microbatches(batch, accum_steps, mesh)

            def body(carry, xs):
                g_acc, ms = carry
                mb, i = xs
                (l, (m, ms)), g = grad_fn(trainable, frozen, ms, mb, jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, g_acc, g), ms), (l, m)

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            (grads, model_state), (losses, ms) = jax.lax.scan(
                body, (zeros, state["model_state"]), (micro, jnp.arange(accum_steps))
            )
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            loss = jnp.mean(losses)
            metrics = jax.tree.map(jnp.mean, ms)
        if not phase.update_state:
            model_state = state["model_state"]
        updates, opt_state = optimizer.update(grads, state["opt"][phase_name], trainable)
        trainable = optax.apply_updates(trainable, updates)
        count = state["phase_updates"][phase_name]
        new = dict(state)
        new["params"] = nnx.merge_state(state["params"], trainable)
        new["model_state"] = model_state
        new["opt"] = {**state["opt"], phase_name: opt_state}
        if ema is not None:
            new["ema"] = {**state["ema"], phase_name: ema_update(
                state["ema"][phase_name], trainable, ema.ema_decay, count, ema.ema_start, ema.update_every)}
        new["phase_updates"] = {**state["phase_updates"], phase_name: count + 1}
        new["step"] = state["step"] + 1
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
        if prefix_metrics:
            metrics = {f"{phase_name}/{k}": v for k, v in metrics.items()}
        return new, metrics

    return step


def jit_train_step(setup: Setup, step_fn, batch_shardings):
    return jax.jit(
        step_fn,
        in_shardings=(setup.shardings, batch_shardings),
        out_shardings=(setup.shardings, replicated(setup.mesh)),
        donate_argnums=(0,),
    )


def make_apply_fn(setup: Setup, fn: Callable, use_ema: bool):
    """jit `fn(model, batch)` (eval or preview) over the mesh; outputs replicated."""
    graphdef = setup.graphdef

    def apply(state, batch):
        model = nnx.merge(graphdef, eval_params(state, use_ema), state["model_state"], copy=True)
        return fn(model, batch)

    return jax.jit(apply, out_shardings=replicated(setup.mesh))


def numeric_fields(batch) -> dict:
    """The fields that go to devices (text and other object arrays stay on the host)."""
    return {k: v for k, v in batch.items() if getattr(v, "dtype", None) is not None and v.dtype.kind in "biuf"}


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble each process's local rows into global arrays sharded over data x fsdp."""
    shards = batch_shards(mesh)
    out = {}
    for k, v in local.items():
        rows = v.shape[0] * jax.process_count()
        if rows % shards:
            raise UserError(
                f"a batch of {rows} examples (field {k!r}) cannot be split over data*fsdp={shards} devices; "
                "make the batch size (train.batch_size, or the stage's eval batch size such as "
                "data.eval_batch_size) a multiple of it")
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def batch_shardings_for(local: dict, mesh: Mesh) -> dict:
    return {k: batch_sharding(mesh, v.ndim) for k, v in local.items()}


def param_count(state: TrainState) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state["params"]))

