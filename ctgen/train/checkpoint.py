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

Weights directories, and weights read out of a workdir's checkpoint for `init_from`, `ctgen eval`
and inference, are `ctgen.weights`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

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
