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

Frozen upstream models (`Stage.frozen_models`) are not part of the train state: `restore_frozen`
restores them once onto the mesh, and the eval/preview functions take their states as jit
arguments next to the train state, so they are neither checkpointed nor baked into the program.
Batches are split over the mesh axes of the rules' `batch` rule, and every traced step runs inside
`axes.activation_sharding(mesh, rules)` so `axes.constrain` in models follows the same table.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ctgen.errors import UserError
from ctgen.parallel import axes as axes_lib
from ctgen.parallel.mesh import batch_shards, replicated
from ctgen.train.optim import ema_update, make_optimizer
from ctgen.train.stage import Phase

log = logging.getLogger(__name__)

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
    rules: tuple  # the logical-axis rules table (parameters, batches, activations)


def _split_model(model: nnx.Module):
    return nnx.split(model, nnx.Param, ...)


def setup_from_config(config, mesh: Mesh, stage) -> Setup:
    """The Setup of `stage` for `config` on `mesh`: one optimizer per phase in `train.phase_cycle`
    from `config.optim`, the sharding rules table. Used by training, `ctgen eval` and tools, so
    they all build the same state layout."""
    names = list(dict.fromkeys(config.train.phase_cycle))
    for name in names:
        if name not in config.optim:
            raise UserError(f"phase {name!r} has no optimizer config: set config.optim.{name}")
    optimizers = {n: make_optimizer(config.optim[n], config.train.steps) for n in names}
    rules = axes_lib.rules_from_config(config.sharding_rules)
    return build_setup(stage, config, mesh, rules, optimizers)


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
    abstract = axes_lib.abstract_on_mesh(abstract_values, rules, mesh)
    return Setup(graphdef, phases, optimizers, ema_cfg, abstract, shardings, mesh, tuple(rules))


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


# XLA:CPU compiles the threefry random-number kernels of a parameter init slowly (the phantom SR
# U-Net's init: 282 s with the default options, 128 s with these, under the same load); the init runs
# once, so its speed does not matter.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def create_state(stage, config, setup: Setup) -> TrainState:
    """Initialise the train state directly into its shardings (no host-side full copy)."""
    init = make_init_fn(stage, config.seed, setup.phases, setup.optimizers, setup.ema_cfg)
    with jax.set_mesh(setup.mesh):
        jitted = jax.jit(init, out_shardings=setup.shardings)
        if setup.mesh.devices.flat[0].platform == "cpu":
            return jitted.lower().compile(compiler_options=CPU_INIT_COMPILER_OPTIONS)()
        return jitted()


def eval_params(state: TrainState, use_ema: bool):
    """Parameters for eval/preview: EMA copies where kept (if `use_ema`), else the live ones."""
    params = state["params"]
    if use_ema and state["ema"]:
        params = nnx.merge_state(params, *state["ema"].values())
    return params


def _microbatches(batch, k: int):
    """(B, ...) -> (k, B/k, ...) taking every k-th example, so each micro-batch stays evenly
    sharded over the batch axes without moving data between devices."""

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return axes_lib.constrain(x, (None, "batch", *([None] * (x.ndim - 2))))

    return jax.tree.map(split, batch)


def make_train_step(setup: Setup, phase_name: str, accum_steps: int, prefix_metrics: bool):
    phase = setup.phases[phase_name]
    optimizer = setup.optimizers[phase_name]
    graphdef, mesh, rules = setup.graphdef, setup.mesh, setup.rules
    ema = setup.ema_cfg.get(phase_name)

    def loss_of(trainable, frozen, model_state, batch, rng):
        # copy=True: fresh Variables at this trace level, so the loss may mutate model state.
        model = nnx.merge(graphdef, trainable, frozen, model_state, copy=True)
        loss, metrics = phase.loss(model, batch, rng)
        new_state = nnx.state(model, nnx.Not(nnx.Param))
        return loss, (metrics, new_state)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        with axes_lib.activation_sharding(mesh, rules):
            return _step(state, batch)

    def _step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        trainable, frozen = nnx.split_state(state["params"], phase.trains, ...)
        if accum_steps == 1:
            (loss, (metrics, model_state)), grads = grad_fn(trainable, frozen, state["model_state"], batch, rng)
        else:
            micro = _microbatches(batch, accum_steps)

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
                state["ema"][phase_name], trainable, ema.ema_decay, count, ema.ema_start, ema.update_every,
                ema.get("ema_warmup_power", 0.0), ema.get("ema_inv_gamma", 1.0))}
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


@dataclasses.dataclass
class Frozen:
    """Restored frozen upstream models, split for jit: static graphdefs, array states (arguments)."""

    graphdefs: dict[str, Any]
    states: dict[str, Any]

    def merge(self, states) -> dict[str, nnx.Module]:
        return {name: nnx.merge(g, states[name]) for name, g in self.graphdefs.items()}


def restore_frozen(stage, mesh: Mesh, rules) -> Frozen:
    """Restore each of `stage.frozen_models()` once onto `mesh`, sharded by its logical axes.
    A frozen model `NAME` is configured as `config.NAME` (weights in `config.NAME.weights`), which
    the error for a missing or unreadable weights path names."""
    graphdefs, states = {}, {}
    for name, frozen in stage.frozen_models().items():
        try:
            module = frozen.load(frozen.weights, mesh, rules)
        except (FileNotFoundError, UserError) as e:
            raise UserError(f"frozen model {name!r} (config.{name}.weights={frozen.weights}): {e}") from None
        graphdefs[name], states[name] = nnx.split(module)
        log.info("frozen model %r from %s", name, frozen.weights)
    return Frozen(graphdefs, states)


def make_apply_fn(setup: Setup, fn: Callable, use_ema: bool, frozen: Frozen):
    """jit `fn(model, frozen_models, batch)` (eval or preview) over the mesh; outputs replicated.
    The jitted function takes `(train_state, frozen.states, batch)`."""
    graphdef, mesh, rules = setup.graphdef, setup.mesh, setup.rules

    def apply(state, frozen_states, batch):
        with axes_lib.activation_sharding(mesh, rules):
            model = nnx.merge(graphdef, eval_params(state, use_ema), state["model_state"], copy=True)
            return fn(model, frozen.merge(frozen_states), batch)

    return jax.jit(apply, out_shardings=replicated(mesh))


def numeric_fields(batch) -> dict:
    """The fields that go to devices (text and other object arrays stay on the host)."""
    return {k: v for k, v in batch.items() if getattr(v, "dtype", None) is not None and v.dtype.kind in "biuf"}


def batch_sharding(setup: Setup, name: str, local_shape: tuple[int, ...]) -> NamedSharding:
    """Sharding of a global batch field whose host-local part has `local_shape`: the leading axis
    over the `batch` rule's mesh axes, the rest replicated. Fails if the rows do not split evenly."""
    rows = local_shape[0] * jax.process_count()
    shards = batch_shards(setup.mesh, setup.rules)
    if rows % shards:
        raise UserError(
            f"a batch of {rows} examples (field {name!r}) cannot be split over "
            f"{axes_lib.describe_batch_axes(setup.rules, setup.mesh)} devices; make the batch size "
            "(train.batch_size, or the stage's eval batch size such as data.eval_batch_size) a multiple of it")
    names = ("batch", *([None] * (len(local_shape) - 1)))
    return axes_lib.logical_sharding(names, (rows, *local_shape[1:]), setup.rules, setup.mesh)


def global_batch(local: dict, setup: Setup) -> dict:
    """Assemble each process's local rows into global arrays split over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(setup, k, v.shape), v)
            for k, v in local.items()}


def batch_shardings_for(local: dict, setup: Setup) -> dict:
    return {k: batch_sharding(setup, k, v.shape) for k, v in local.items()}


def param_count(state: TrainState) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state["params"]))

