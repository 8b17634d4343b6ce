"""Weights directories, and models restored from them straight onto a mesh.

This is the one path for every load of a model for use rather than for resuming a run:
`init_from`, `ctgen eval`, `ctgen import`/`export`, text encoders, frozen upstream models and
generation.

A weights directory is `DIR/weights` (an Orbax PyTree `{"params", "model_state"}`: parameters and
non-trainable state such as a VQ codebook, never optimizer state) plus the marker
`DIR/ctgen_weights.json`:
    {"format": "ctgen-weights-v1", "model": NAME, "model_config": {...}, "written": TIME, ...info}
NAME names the model the tree belongs to ("ctvit", "t5_encoder", ...) and `model_config` is what
its owner needs to build it. Markers written before these two keys existed (`stage` plus
`ctvit_config` or `t5_config`) are read as if they had them.

Loading takes abstract target trees (ShapeDtypeStructs carrying target shardings, see
`abstract_model`) and reads only what they name (a partial restore), from a weights directory or
from a training workdir's latest checkpoint (params, model state and, if asked, EMA copies; never
optimizer state). So a model loads from a directory that holds more than it needs (a CT-ViT
autoencoder from a directory that also holds its loss networks), and every array is read
straight into its shards. Names and shapes are checked against the stored metadata first; all
problems are reported together.

A sub-model stored at the root: if the target has a top-level key K (say "ctvit") that the stored
tree lacks while the stored root holds every entry of K, K is read from the root. Trees saved
before a model was wrapped together with others (a CT-ViT whose loss networks were its own
attributes) thereby load into the wrapper, and the wrapper's part loads from them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from ctgen.errors import UserError
from ctgen.parallel import axes as axes_lib

log = logging.getLogger(__name__)

WEIGHTS_MARKER = "ctgen_weights.json"
FORMAT = "ctgen-weights-v1"
# Markers written before `model`/`model_config`: (old config key, model name).
_LEGACY_CONFIG_KEYS = (("ctvit_config", "ctvit"), ("t5_config", "t5_encoder"))


# --- pure trees and flat paths ------------------------------------------------------------------------
def to_pure(tree: Any) -> Any:
    """`tree` (nnx.State, nested dicts, or dicts holding States) as nested dicts of leaves: NNX
    variables become their values."""
    if isinstance(tree, nnx.Variable):
        return tree.get_value()
    if isinstance(tree, Mapping):
        return {k: to_pure(v) for k, v in tree.items()}
    return tree


def flatten_state(tree: Mapping, sep: str = "/") -> dict[str, Any]:
    """Flatten a nested dict (e.g. `nnx.to_pure_dict(state)`) into '/'-joined paths."""
    flat: dict[str, Any] = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}{sep}{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("", tree)
    return flat


def unflatten_state(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """Inverse of `flatten_state`; integer-looking components become int keys (NNX lists)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in path.split(sep)]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


# --- abstract models --------------------------------------------------------------------------------
def abstract_model(build: Callable[[nnx.Rngs], nnx.Module], *, mesh: Mesh | None = None,
                   rules=None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of the model `build(rngs)` makes, without computing any weights.

    Every variable holds a ShapeDtypeStruct carrying its target sharding: from its logical axes
    and `rules` (default `DEFAULT_RULES`) on `mesh`, or the first local device without a mesh.
    Call it outside `jax.set_mesh` (NNX would read logical names as mesh axes there).
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    if mesh is not None:
        return graphdef, axes_lib.abstract_on_mesh(state, rules or axes_lib.DEFAULT_RULES, mesh)
    device = SingleDeviceSharding(jax.local_devices()[0])
    return graphdef, jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device), state)


def place(abstract: nnx.State, values: Mapping) -> nnx.State:
    """`abstract` (from `abstract_model`) filled with host arrays `values` (a pure nested dict
    with the same paths), each cast to its dtype and put onto its sharding."""
    arrays = jax.tree.map(lambda a, v: jax.device_put(np.asarray(v).astype(a.dtype, copy=False), a.sharding),
                          nnx.to_pure_dict(abstract), dict(values))
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, arrays)
    return state


# --- weights directories ----------------------------------------------------------------------------
def save_weights(path: str, params: Any, model_state: Any = None, *, model: str, model_config: Mapping,
                 info: Mapping | None = None) -> None:
    """Write a weights directory: parameters plus non-trainable model state, no optimizer state.

    `model` and `model_config` (JSON-able) go into the marker file so the model can be rebuilt;
    `info` adds further JSON-able entries (e.g. where the weights came from)."""
    path = os.path.abspath(path)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "weights"), {"params": params, "model_state": model_state or {}}, force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    if jax.process_index() == 0:
        meta = {"format": FORMAT, "model": model, "model_config": dict(model_config),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}
        with open(os.path.join(path, WEIGHTS_MARKER), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


def workdir_config(workdir: str, stage: str, what: str) -> dict:
    """The config.json of a training workdir of `stage` (`what` names it in errors, e.g. "CT-ViT");
    UserError for a directory without one or of another stage."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{workdir}: neither a ctgen weights directory nor a training workdir (no config.json)")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("stage") != stage:
        raise UserError(f"{workdir} is a {config.get('stage')!r} workdir, not a {what} one")
    return config


def weights_info(path: str) -> dict | None:
    """The marker of a weights directory (None if `path` is none), with `model` and
    `model_config` filled in from the keys older markers used."""
    marker = os.path.join(os.path.abspath(path), WEIGHTS_MARKER)
    if not os.path.exists(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        meta = json.load(f)
    if "model" not in meta:
        old = next(((k, name) for k, name in _LEGACY_CONFIG_KEYS if k in meta), None)
        meta["model"] = old[1] if old else meta.get("stage")
        meta["model_config"] = meta[old[0]] if old else {}
    return meta


def load_weights(path: str, abstract_params: Any, abstract_model_state: Any = None) -> tuple[Any, Any]:
    """(params, model_state) from a weights directory or a workdir's latest checkpoint.

    The abstract trees (nnx.State or nested dicts of ShapeDtypeStructs, e.g. from
    `abstract_model`) name what to read and give dtypes and target shardings; the results have
    the same types. The stored tree may hold more (partial restore)."""
    # `is None`, not `or`: an empty nnx.State (a model without non-trainable state) is falsy but must
    # come back as an nnx.State, the type the train state's shardings expect
    out = _restore(path, {"params": abstract_params, "model_state": {} if abstract_model_state is None
                          else abstract_model_state})
    return out["params"], out["model_state"]


def load_weights_and_ema(path: str, abstract_params: Any, abstract_model_state: Any,
                         abstract_ema: Any) -> tuple[Any, Any, Any]:
    """`load_weights` plus the EMA copies `{phase: params}` (`abstract_ema`, like the train
    state's `ema`) when `path` is a workdir: (params, model_state, ema). A weights directory
    keeps no EMA, so ema is None there."""
    target = {"params": abstract_params, "model_state": {} if abstract_model_state is None else abstract_model_state}
    if weights_info(path) is None and abstract_ema:
        target["ema"] = abstract_ema
    out = _restore(path, target)
    return out["params"], out["model_state"], out.get("ema")


def load_model(path: str, build: Callable[[nnx.Rngs], nnx.Module], *, at: str | None = None,
               mesh: Mesh | None = None, rules=None) -> nnx.Module:
    """The model `build(rngs)` makes, with its weights read from `path` onto `mesh`.

    at: the top-level key the model sits under in the stored tree (a part of a bigger model,
    e.g. "ctvit" in the CT-ViT stage's weights); None for the root."""
    graphdef, abstract = abstract_model(build, mesh=mesh, rules=rules)
    params, model_state = nnx.split_state(abstract, nnx.Param, ...)
    if at is None:
        params, model_state = load_weights(path, params, model_state)
    else:
        loaded = load_weights(path, {at: params}, {at: model_state})
        params, model_state = loaded[0][at], loaded[1][at]
    return nnx.merge(graphdef, params, model_state)


# --- restoring ----------------------------------------------------------------------------------------
def _refill(template: Any, values: Any) -> Any:
    """`values` (pure nested dicts) in the container types of `template`."""
    if isinstance(template, nnx.State):
        state = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(state, values)
        return state
    if isinstance(template, nnx.Variable):
        return template.replace(values)
    if isinstance(template, Mapping):
        return {k: _refill(v, values[k]) for k, v in template.items()}
    return values


def _is_leaf_meta(node: Any) -> bool:
    return not isinstance(node, Mapping) or set(node) == {"value"}  # a saved NNX variable: {"value": array}


def _from_root(target: dict, stored: Mapping) -> list:
    """Top-level keys of `target` whose entries sit at the stored root (see module docstring)."""
    return [k for k, sub in target.items()
            if str(k) not in stored and isinstance(sub, Mapping) and sub and all(str(c) in stored for c in sub)]


def _arrange(target: dict, stored: Mapping) -> dict:
    """`target` laid out like `stored` (sub-models stored at the root moved there)."""
    moved = _from_root(target, stored)
    out = {k: v for k, v in target.items() if k not in moved}
    for k in moved:
        for c, v in target[k].items():
            if c in out:
                raise UserError(f"cannot read {k!r} from the stored root: its entry {c!r} is also a target key")
            out[c] = v
    return out


def _unarrange(target: dict, stored: Mapping, values: dict) -> dict:
    moved = _from_root(target, stored)
    out = {k: values[k] for k in target if k not in moved}
    out.update({k: {c: values[c] for c in target[k]} for k in moved})
    return out


def _fit(target: Any, stored: Any, path: str, missing: list, mismatched: list) -> Any:
    """`target` with each leaf in the stored form ({"value": leaf} for saved NNX variables);
    collects target paths the stored tree lacks or holds in another shape."""
    if isinstance(target, Mapping):
        node = stored if isinstance(stored, Mapping) and not _is_leaf_meta(stored) else {}
        return {k: _fit(v, node.get(str(k)), f"{path}/{k}" if path else str(k), missing, mismatched)
                for k, v in target.items()}
    if stored is None or (isinstance(stored, Mapping) and not _is_leaf_meta(stored)):
        missing.append(path)
        return target
    wrapped = isinstance(stored, Mapping)
    meta = stored["value"] if wrapped else stored
    if tuple(meta.shape) != tuple(target.shape):
        mismatched.append(f"{path}: {tuple(meta.shape)} vs {tuple(target.shape)}")
    return {"value": target} if wrapped else target


def _unwrap(target: Any, restored: Any) -> Any:
    if isinstance(target, Mapping):
        return {k: _unwrap(v, restored[k]) for k, v in target.items()}
    return restored["value"] if isinstance(restored, Mapping) else restored


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree.leaves(tree))


def _plan(source: str, target: dict, stored: Mapping) -> tuple[dict, dict]:
    """(restore item in the stored layout and form, per-item arranged targets)."""
    missing: list[str] = []
    mismatched: list[str] = []
    arranged, item = {}, {}
    for name, tree in target.items():
        if not _has_leaves(tree):
            continue
        node = stored.get(name) or {}
        if name == "ema":  # {phase: params}: each phase's copy is laid out like the params
            arranged[name] = {p: _arrange(t, node.get(p) or {}) for p, t in tree.items()}
        else:
            arranged[name] = _arrange(tree, node)
        item[name] = _fit(arranged[name], node, name, missing, mismatched)
    if missing or mismatched:
        # The first line stands alone (the CLI prints only it where errors are one line); the lists follow.
        found = [f"{len(missing)} missing, e.g. {missing[0]}" if missing else "",
                 f"{len(mismatched)} of another shape (stored vs expected), e.g. {mismatched[0]}" if mismatched else ""]
        lines = [f"{source}: the stored weights do not fit this model: {'; '.join(f for f in found if f)}"]
        for title, items in (("missing", missing), ("shape mismatches (stored vs expected)", mismatched)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {i}" for i in items[:20]]
                if len(items) > 20:
                    lines.append(f"  ... and {len(items) - 20} more")
        raise UserError("\n".join(lines))
    return item, arranged


def _restore(path: str, target: dict) -> dict:
    """Restore `target`'s items ({"params", "model_state", optionally "ema"}) from a weights
    directory or, partially, from the train state of a workdir's latest checkpoint."""
    path = os.path.abspath(path)
    pure = {k: to_pure(v) for k, v in target.items()}
    if weights_info(path) is not None:
        source = os.path.join(path, "weights")
        with ocp.PyTreeCheckpointer() as ckptr:
            stored = ckptr.metadata(source).item_metadata.tree
            item, arranged = _plan(source, pure, stored)
            restored = ckptr.restore(source, args=_restore_args(item)) if item else {}
    elif os.path.isdir(os.path.join(path, "checkpoints")):
        source = os.path.join(path, "checkpoints")
        absl_log = logging.getLogger("absl")
        absl_log.addFilter(_read_only_notice)
        try:
            mngr = ocp.CheckpointManager(source, item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                                "data": _UnreadItem()},
                                         options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                                                              create=False))
        finally:
            absl_log.removeFilter(_read_only_notice)
        try:
            step = mngr.latest_step()
            if step is None:
                raise UserError(f"{path}: workdir has no complete checkpoint to take weights from")
            stored = mngr.item_metadata(step)["state"].tree
            item, arranged = _plan(f"{source}/{step}", pure, stored)
            restored = mngr.restore(step, args=ocp.args.Composite(state=_restore_args(item)))["state"] if item else {}
        finally:
            mngr.close()
        log.info("weights (%s) from %s step %d", ", ".join(target), source, step)
    else:
        raise UserError(f"{path}: neither a ctgen weights directory ({WEIGHTS_MARKER}) nor a workdir with "
                        "checkpoints/")
    out = {}
    for name, tree in pure.items():
        if name not in arranged:
            out[name] = target[name]
            continue
        values = _unwrap(arranged[name], restored[name])
        node = stored.get(name) or {}
        if name == "ema":
            values = {p: _unarrange(tree[p], node.get(p) or {}, values[p]) for p in tree}
        else:
            values = _unarrange(tree, node, values)
        out[name] = _refill(target[name], values)
    return out


class _UnreadItem(ocp.CheckpointHandler):
    """The workdir checkpoint's `data` item (data-iterator state, `ctgen.train.checkpoint`): named
    so that Orbax knows it, never read here (without a handler Orbax warns on every weights load)."""

    def save(self, directory, args):  # the manager is read-only: Orbax never calls this
        raise RuntimeError(f"{directory}: weights reading does not write checkpoints")

    def restore(self, directory, args=None):  # weights never need the data-iterator state
        return None

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(_UnreadItem, for_save=True, for_restore=True)
class _UnreadItemArgs(ocp.args.CheckpointArgs):
    pass


def _read_only_notice(record: logging.LogRecord) -> bool:
    """Drops Orbax's warning that a read-only manager's directory is read only (it is meant to be)."""
    return not record.getMessage().startswith("Given directory is read only")


def _restore_args(item: dict) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
