"""The one training loop every stage uses: `train(config, workdir, stage)`.

Sections: mesh -> optimizers -> sharded state (fresh, resumed, or warm-started) -> frozen
upstream models -> data -> jitted steps -> loop (log, eval, preview, checkpoint, preemption) ->
final save. The caller builds the stage (`ctgen.stages.get_stage(config)`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from ctgen import weights as weights_lib
from ctgen.errors import UserError
from ctgen.parallel import axes as axes_lib
from ctgen.parallel.mesh import batch_shards, describe, make_mesh
from ctgen.train import checkpoint as ckpt_lib
from ctgen.train import state as state_lib
from ctgen.train.metrics import MetricWriter, to_python

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; run the same command again to resume


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT-triggered checkpoint was written."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; checkpoint saved, rerun the same command to resume")
        self.step = step


# Multi-process runs agree on stopping only every this many steps (and at the end of the run):
# agreeing is a collective that waits for every step dispatched so far, so doing it every step
# would stop the host from running ahead of the devices.
STOP_CHECK_EVERY = 10


class _StopSignal:
    """Turns SIGTERM (and SIGINT) into a flag the loop polls between steps.

    One process: the flag is read after every step, so the loop stops after the current step.
    Several processes: they must all stop at the same step (for a consistent checkpoint), so
    the flags are combined (an allgather) only at steps every process picks identically, every
    `STOP_CHECK_EVERY` steps and at the run's last step: a signal is noticed within
    `STOP_CHECK_EVERY` steps, which must fit in the grace period before the hard kill (SLURM's
    `--signal=TERM@120` gives 120 s), together with the checkpoint save.
    """

    def __init__(self):
        self.flag = threading.Event()
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("received signal %d: will checkpoint and stop after the current step", signum)
        self.flag.set()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def stop_requested(self, step: int, end: int) -> bool:
        """Whether to stop after `step` (the steps taken so far; `end` is this run's last)."""
        local = self.flag.is_set()
        if jax.process_count() == 1:
            return local
        if step % STOP_CHECK_EVERY and step != end:
            return False
        # Every process must stop at the same step so the checkpoint is consistent.
        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))


def validate(config: ml_collections.ConfigDict, mesh, rules) -> None:
    t = config.train
    shards = batch_shards(mesh, rules)
    if t.batch_size % jax.process_count():
        raise UserError(f"train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} processes")
    if t.batch_size % (shards * t.accum_steps):
        raise UserError(
            f"train.batch_size={t.batch_size} must be divisible by {axes_lib.describe_batch_axes(rules, mesh)} "
            f"times train.accum_steps={t.accum_steps} (each micro-batch is split over the batch axes)"
        )
    if t.steps <= 0:
        raise UserError(f"train.steps must be positive, got {t.steps}")
    if t.accum_steps <= 0:
        raise UserError(f"train.accum_steps must be positive, got {t.accum_steps}")
    if t.checkpoint_every < 0:
        raise UserError(f"train.checkpoint_every must be >= 0 (0 = only at the end of the run), "
                        f"got {t.checkpoint_every}; the end of a run always saves a checkpoint")


def _due(step: int, every: int, last: int) -> bool:
    """Hook schedule: every `every` steps and at `last`; 0 = only at `last`; -1 = never."""
    if every < 0:
        return False
    return step == last or (every > 0 and step % every == 0)


def _write_config(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            log.warning("resuming with a config that differs from %s in: %s", path, ", ".join(changed))
        path = os.path.join(workdir, f"config.{int(time.time())}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(new, f, indent=2)


def train(config: ml_collections.ConfigDict, workdir: str, stage, *, devices=None) -> dict[str, Any]:
    """Train `stage` (a `ctgen.train.stage.Stage` built for `config`) in `workdir`, resuming if it
    has checkpoints. Returns a summary.

    devices: build the mesh over these devices instead of all of them.
    """
    # --- mesh -----------------------------------------------------------------------------------
    mesh = make_mesh(config.mesh.to_dict(), devices)
    rules = axes_lib.rules_from_config(config.sharding_rules)
    validate(config, mesh, rules)
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    log.info("mesh %s, process %d/%d", describe(mesh), jax.process_index(), jax.process_count())

    # --- optimizers, sharded state layout ----------------------------------------------------------
    setup = state_lib.setup_from_config(config, mesh, stage)
    t = config.train

    # --- eval / preview functions, frozen upstream models, data (train steps are jitted per phase
    # on first use) --------------------------------------------------------------------------------
    steps: dict[str, Any] = {}
    eval_fn = preview_fn = None
    eval_data = stage.eval_data(jax.process_index(), jax.process_count()) if t.eval_every >= 0 else None
    frozen = state_lib.restore_frozen(stage, mesh, setup.rules) if eval_data is not None or t.preview_every >= 0 \
        else None
    if eval_data is not None:
        eval_fn = state_lib.make_apply_fn(setup, stage.eval_step, t.eval_with_ema, frozen)
    if t.preview_every >= 0:
        preview_fn = state_lib.make_apply_fn(setup, stage.preview_step, t.eval_with_ema, frozen)

    data_it = stage.train_data(jax.process_index(), jax.process_count(), config.seed)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints, keep_period=t.keep_period,
                                 async_save=t.async_checkpointing)
    try:
        state = _initial_state(stage, config, setup, ckpt, data_it)
    except BaseException:
        ckpt.close()  # also stops Orbax's background threads before the error propagates
        raise
    start = int(jax.device_get(state["step"]))
    end = min(t.steps, start + t.stop_after_steps) if t.stop_after_steps > 0 else t.steps
    log.info("%d parameters; starting at step %d of %d", state_lib.param_count(state), start, t.steps)

    writer = MetricWriter(workdir)
    pending: list[dict] = []
    last_batch = None
    summary: dict[str, Any] = {"start_step": start}
    bar = tqdm(total=t.steps, initial=start, desc=f"train {config.stage}", unit="step",
               disable=not (t.progress_bar and jax.process_index() == 0), dynamic_ncols=True)
    tick, tick_step = time.time(), start
    step = start
    try:
        with _StopSignal() as stop, jax.set_mesh(mesh):
            while step < end:
                phase = t.phase_cycle[step % len(t.phase_cycle)]
                try:
                    host = next(data_it)
                except StopIteration:
                    raise RuntimeError(f"training data ran out at step {step}; train pipelines must repeat") from None
                last_batch = host
                local = state_lib.numeric_fields(host)
                if phase not in steps:
                    fn = state_lib.make_train_step(setup, phase, t.accum_steps, len(setup.phases) > 1)
                    steps[phase] = state_lib.jit_train_step(setup, fn, state_lib.batch_shardings_for(local, setup))
                if t.profile_steps and step == start + 2 and jax.process_index() == 0:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                state, metrics = steps[phase](state, state_lib.global_batch(local, setup))
                step += 1
                if t.profile_steps and step == start + 2 + t.profile_steps and jax.process_index() == 0:
                    jax.block_until_ready(state["step"])
                    jax.profiler.stop_trace()
                pending.append(metrics)
                bar.update(1)

                if _due(step, t.log_every, t.steps) or step == end:
                    values = _average(to_python(pending))  # one device_get for all pending steps
                    now = time.time()
                    values["steps_per_sec"] = (step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step, pending = now, step, []
                    writer.write(step, values)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k.endswith("loss")}, refresh=False)
                    summary["train"] = values
                if eval_fn is not None and _due(step, t.eval_every, t.steps):
                    summary["eval"] = evaluate_split(stage, eval_fn, state, frozen, eval_data, t.eval_batches, setup)
                    writer.write(step, summary["eval"], split="eval")
                    log.info("step %d eval: %s", step, _fmt(summary["eval"]))
                if preview_fn is not None and _due(step, t.preview_every, t.steps):
                    preview(stage, preview_fn, state, frozen, eval_data, last_batch, setup,
                            os.path.join(workdir, "previews", f"step_{step:08d}"), step)
                if _due(step, t.checkpoint_every, end):
                    ckpt.save(step, state, ckpt_lib.iterator_state(data_it))
                if stop.stop_requested(step, end):
                    if step not in ckpt.all_steps():
                        ckpt.save(step, state, ckpt_lib.iterator_state(data_it), force=True)
                    ckpt.wait()
                    raise Preempted(step)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    summary["final_step"] = step
    summary["state"] = state
    return summary


def _initial_state(stage, config, setup, ckpt, data_it):
    """Resume from the workdir's latest checkpoint (state and data position), else a fresh
    sharded state, warm-started from `init_from` if set."""
    latest = ckpt.latest_step()
    if latest is not None:
        log.info("resuming from %s step %d", ckpt.directory, latest)
        if config.init_from:
            log.info("init_from=%s ignored: the workdir already has checkpoints", config.init_from)
        try:
            state, data_state = ckpt.restore(latest, setup.abstract)
        except ValueError as e:  # Orbax: a stored array of another shape (a different model config)
            if "shape" not in str(e):
                raise
            raise UserError(f"{ckpt.directory}: the checkpoint at step {latest} does not fit the model this config "
                            f"builds ({str(e).splitlines()[0]}); train in a new --workdir, or resume with the config "
                            "the run was started with") from None
        if data_state is not None:
            ckpt_lib.set_iterator_state(data_it, data_state)
        return state
    state = state_lib.create_state(stage, config, setup)
    if config.init_from:
        log.info("warm-starting parameters and non-trainable state from %s", config.init_from)
        state["params"], state["model_state"] = weights_lib.load_weights(
            config.init_from, setup.abstract["params"], setup.abstract["model_state"])
        for name in state["ema"]:  # EMA copies start from the loaded weights, not the random init
            state["ema"][name] = state_lib.init_ema(state["params"], setup.phases[name])
    return state


def _average(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.5g}" for k, v in values.items())


def evaluate_split(stage, eval_fn, state, frozen, eval_data, max_batches: int, setup) -> dict[str, float]:
    """The stage's metrics over the eval split (its first `max_batches` batches if > 0): the
    per-batch sums of `eval_step` added up (in float64 on the host), then `stage.eval_metrics`.
    Every process computes the same global totals."""
    rows = []  # per-batch sums, left on device until all batches are dispatched
    for i, host in enumerate(eval_data):
        if max_batches and i >= max_batches:
            break
        local = state_lib.numeric_fields(host)
        rows.append(eval_fn(state, frozen.states, state_lib.global_batch(local, setup)))
    if not rows:
        raise RuntimeError("the eval split yielded no batches (is it smaller than one eval batch?)")
    rows = jax.device_get(rows)
    totals = {k: np.sum([np.asarray(r[k], np.float64) for r in rows], axis=0) for k in rows[0]}
    if "count" not in totals or totals["count"] <= 0:
        raise RuntimeError("the eval split had no valid rows (eval_step must return a positive 'count')")
    return stage.eval_metrics(totals)


def preview(stage, preview_fn, state, frozen, eval_data, last_batch, setup, out_dir: str, step: int) -> None:
    """Run `preview_fn` on the first eval batch (else the last training batch) on EVERY process,
    since it may call sharded models; process 0 alone writes the files."""
    host = next(iter(eval_data)) if eval_data is not None else last_batch
    outputs = preview_fn(state, frozen.states, state_lib.global_batch(state_lib.numeric_fields(host), setup))
    outputs = jax.tree.map(np.asarray, jax.device_get(outputs))
    if jax.process_index() == 0:
        stage.write_preview(outputs, host, out_dir, step)
