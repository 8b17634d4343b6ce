"""The seam between the shared training loop and a model stage (CT-ViT, MaskGIT, SR, ...).

A stage supplies only what differs between stages: how to build the model, which losses update
which parameters (phases), where batches come from, and how to evaluate / preview. The loop in
`ctgen.train.loop` does everything else (mesh, sharded state, jit, accumulation, optimizers, EMA,
checkpoints, metrics, preemption) and is the same for every stage.

Phases: most stages have one phase, "main", training every `nnx.Param`. A GAN has two:
"generator" (all params but the discriminator) and "discriminator" (only its params); the
config's `train.phase_cycle` says in which order loop steps visit them (GenerateCT's CT-ViT:
generator, generator, generator, discriminator). Each phase has its own optimizer
(`config.optim.<phase>`), its own optimizer state and optional EMA.

Loss functions are traced inside `jax.jit` under the mesh:
    loss_fn(model, batch, rng) -> (scalar loss, {name: scalar metric})
`model` is the full NNX module (all phases' params plus non-trainable state). Non-`nnx.Param`
variables that the loss mutates (e.g. a VQ codebook's EMA buffers) are written back into the
train state when `Phase.update_state` is true. Reductions over the batch inside the loss are
global (jit over the mesh), so statistics are already reduced across data-parallel replicas.

Eval is exact whatever the padding: eval batches carry a boolean `valid` per row (the last batch
of a split is padded to the full batch size); `eval_step` returns SUMS over the valid rows plus
their number as "count" (any shape: a scalar, a histogram); the loop adds these over every batch
of the split and `eval_metrics` turns the totals into metrics (`mean_metrics` divides every sum
by the count; a codebook's usage comes from the split's summed histogram).

Frozen upstream models (MaskGIT's CT-ViT tokenizer, the SR stage's CT-ViT) are declared by
`frozen_models()`: the loop restores each once, sharded over the mesh by its logical axes, never
checkpoints it, and passes `{name: module}` to `eval_step` and `preview_step` (as jit arguments,
not constants). A frozen model `NAME` is configured as the sub-config `config.NAME` with its
weights directory in `config.NAME.weights` (big_vision's UViM nests its oracle the same way).

The stage object is built by the caller (`ctgen.stages.get_stage(config)` in the CLI) and handed
to `train` / `evaluate`: nothing under `ctgen/train/` imports `ctgen.stages`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

Batch = Mapping[str, Any]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One kind of update: which parameters it trains and with which loss.

    name: also the key of its optimizer config (`config.optim.<name>`).
    trains: an NNX filter selecting the `nnx.Param`s this phase updates (others are frozen).
    loss: see module docstring.
    update_state: write back non-Param variables mutated by `loss` (False: discard them).
    """

    name: str
    loss: LossFn
    trains: Any = nnx.Param
    update_state: bool = True


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A frozen upstream model a stage needs for eval/previews (never trained, never checkpointed).

    weights: a weights directory or a training workdir (its latest checkpoint).
    load: `load(weights, mesh, rules) -> module`, restoring the model straight onto `mesh`, each
      variable sharded by its logical axes under the rules table; raises FileNotFoundError (naming
      the path) when `weights` holds no weights.
    """

    weights: str
    load: Callable[[str, Mesh, Any], nnx.Module]


def valid_rows(batch: Batch, n: int) -> jax.Array:
    """float32 (n,) 1 for the batch's real rows, 0 for padding (all 1 without a `valid` field)."""
    return batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones((n,), jnp.float32)


def mean_metrics(totals: Mapping[str, np.ndarray], skip: Sequence[str] = ()) -> dict[str, float]:
    """Every summed entry of `totals` but "count" and `skip`, divided by "count"."""
    count = float(totals["count"])
    return {k: float(v) / count for k, v in totals.items() if k != "count" and k not in skip}


class Stage(Protocol):
    """What a model stage provides to the shared loop. See `ctgen.stages.toy` for a small example."""

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """Create the model (called under `nnx.eval_shape` first, then inside a sharded jit)."""

    def phases(self) -> Sequence[Phase]:
        """The phases this stage trains; names must match `config.train.phase_cycle` entries."""

    def train_data(self, process_index: int, process_count: int, seed: int) -> Iterator[Batch]:
        """This host's share of every global batch, as numpy arrays with a leading batch axis of
        `config.train.batch_size // process_count`. Must be a grain `DatasetIterator` (or expose
        `get_state()`/`set_state()`) so that a resumed run sees exactly the batches it would have."""

    def eval_data(self, process_index: int, process_count: int) -> Iterable[Batch] | None:
        """A finite iterable of host-local eval batches, or None for no eval."""

    def frozen_models(self) -> Mapping[str, FrozenModel]:
        """Frozen upstream models by name ({} when none); see the module docstring."""

    def eval_step(self, model: nnx.Module, frozen: Mapping[str, nnx.Module], batch: Batch) -> dict[str, jax.Array]:
        """Sums over the batch's valid rows (`valid_rows`) and their number as "count"; the loop
        jits this over the mesh and adds the results over all batches of the split."""

    def eval_metrics(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
        """The split's metrics from the summed `eval_step` outputs (often `mean_metrics(totals)`)."""

    def preview_step(self, model: nnx.Module, frozen: Mapping[str, nnx.Module], batch: Batch) -> dict[str, jax.Array]:
        """Arrays to look at (e.g. reconstructions); jitted by the loop and run on every process
        (it may call sharded models), gathered to host."""

    def write_preview(self, outputs: dict[str, Any], batch: Batch, out_dir: str, step: int) -> None:
        """Write previews (PNG, NIfTI) from `preview_step` outputs and the host batch (which keeps
        text fields). Called on process 0 only."""
