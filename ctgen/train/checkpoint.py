"""Checkpoints: one Orbax `CheckpointManager` per workdir, train state and data state together.

Layout: `WORKDIR/checkpoints/<step>/{state, data}`.
- `state`: the whole train state (params, non-trainable model state, optimizer states, EMA, step,
  rng) as a sharded PyTree; restored against an abstract target carrying the *current* mesh's
  shardings, so a checkpoint written on one mesh/device count restores onto another.
- `data`: each process's data-iterator state as `process_<i>-of-<n>.json`, captured at the
  moment of the save (the iterator keeps running while an async save is in flight).
Saves are asynchronous and atomic: Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it
only when every item is complete, so a process killed mid-save leaves a temporary directory that
is never listed as a step (and is cleaned up on the next start).

Weights directories (`save_weights`/`load_weights`: parameters plus non-trainable model state
such as a VQ codebook, no optimizer) are what `init_from`, `ctgen import`, `ctgen eval` and
inference use: `DIR/weights` (Orbax) + `DIR/ctgen_weights.json` (what wrote it, and when).
`load_weights` also accepts a training workdir (its latest checkpoint, read partially: no
optimizer state); `load_weights_and_ema` also reads that checkpoint's EMA copies.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

WEIGHTS_MARKER = "ctgen_weights.json"


# --- per-process data-iterator state --------------------------------------------------------------
class DataStateHandler(ocp.CheckpointHandler):
    """Saves a JSON-able snapshot per process (unlike JsonSave, which only process 0 writes)."""

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None) -> Any:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            present = sorted(p.name for p in directory.iterdir())
            raise DataStateMissing(
                f"{path} does not exist (checkpoint has {present}); it was written by a different "
                "number of processes"
            )
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def structure(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


class DataStateMissing(FileNotFoundError):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def iterator_state(it: Any) -> Any:
    """A JSON-able snapshot of a grain iterator's state (dict, or bytes for DataLoader)."""
    state = it.get_state()
    if isinstance(state, bytes):
        return {"__bytes__": state.decode()}
    return state


def set_iterator_state(it: Any, state: Any) -> None:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        state = state["__bytes__"].encode()
    it.set_state(state)


# --- the manager --------------------------------------------------------------------------------
class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, keep_period: int = 0, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any, *, force: bool = False) -> bool:
        saved = self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataStateSave(data_state)),
            force=force,
        )
        return bool(saved)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any | None]:
        """Restore `state` onto the shardings in `abstract_state`; data state or None if absent
        for this process layout."""
        restored = self.manager.restore(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        state = restored["state"]
        try:
            data = self.manager.restore(int(step), args=ocp.args.Composite(data=DataStateRestore()))["data"]
        except DataStateMissing as e:
            log.warning("data-iterator state not restored: %s", e)
            data = None
        return state, data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --- weights directories --------------------------------------------------------------------------
def save_weights(path: str, params: Any, model_state: Any = None, *, info: dict | None = None) -> None:
    """Write a weights directory: parameters plus non-trainable model state (e.g. a VQ codebook),
    without optimizer state. `info` (JSON-able) is stored in the marker file (stage, config...)."""
    path = os.path.abspath(path)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "weights"), {"params": params, "model_state": model_state or {}}, force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    if jax.process_index() == 0:
        meta = {"format": "ctgen-weights-v1", "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}
        with open(os.path.join(path, WEIGHTS_MARKER), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


def weights_info(path: str) -> dict | None:
    marker = os.path.join(os.path.abspath(path), WEIGHTS_MARKER)
    if not os.path.exists(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        return json.load(f)


def load_weights(path: str, abstract_params: Any, abstract_model_state: Any = None) -> tuple[Any, Any]:
    """(params, model_state) from a weights directory or from a workdir's latest checkpoint.

    The abstract trees give structure, dtypes and target shardings (ShapeDtypeStructs or arrays),
    so the weights land directly on the current mesh. Raises FileNotFoundError naming `path`
    if neither layout is there.
    """
    out = _restore_weights(path, {"params": abstract_params, "model_state": abstract_model_state or {}})
    return out["params"], out["model_state"]


def load_module(path: str, abstract_module: Any, mesh: Any, rules: Any) -> Any:
    """An NNX module (parameters + non-trainable state) restored from a weights directory or a
    workdir straight onto `mesh`, each variable sharded by its logical axes under `rules`.
    `abstract_module` comes from `nnx.eval_shape`; raises FileNotFoundError naming `path`."""
    from flax import nnx

    from ctgen.parallel.axes import abstract_on_mesh

    graphdef, params, rest = nnx.split(abstract_module, nnx.Param, ...)
    params, rest = load_weights(path, abstract_on_mesh(params, rules, mesh), abstract_on_mesh(rest, rules, mesh))
    return nnx.merge(graphdef, params, rest)


def load_weights_and_ema(path: str, abstract_params: Any, abstract_model_state: Any,
                         abstract_ema: Any) -> tuple[Any, Any, Any]:
    """`load_weights` plus the EMA copies `{phase: params}` (`abstract_ema`, like the train
    state's `ema`) when `path` is a workdir: (params, model_state, ema). A weights directory
    keeps no EMA, so ema is None there. Only these subtrees are read, never optimizer state."""
    target = {"params": abstract_params, "model_state": abstract_model_state or {}}
    if weights_info(path) is None and abstract_ema:
        target["ema"] = abstract_ema
    out = _restore_weights(path, target)
    return out["params"], out["model_state"], out.get("ema")


def _restore_weights(path: str, target: dict) -> dict:
    """Restore `target`'s subtrees from a weights directory (params, model_state) or,
    partially, from the train state of a workdir's latest checkpoint."""
    path = os.path.abspath(path)
    if weights_info(path) is not None:
        ckptr = ocp.StandardCheckpointer()
        try:
            return ckptr.restore(os.path.join(path, "weights"), target)
        finally:
            ckptr.close()
    ckpt_dir = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt_dir):
        mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"),
                                     options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            step = mngr.latest_step()
            if step is None:
                raise FileNotFoundError(f"{path}: workdir has no complete checkpoint to take weights from")
            # Partial restore: only the target's subtrees of the saved train state.
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )
                ),
            )
        finally:
            mngr.close()
        log.info("weights (%s) from %s step %d", ", ".join(target), ckpt_dir, step)
        return restored["state"]
    raise FileNotFoundError(
        f"{path}: neither a ctgen weights directory ({WEIGHTS_MARKER}) nor a workdir with checkpoints/"
    )
