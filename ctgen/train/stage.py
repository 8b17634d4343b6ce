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
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import jax
from flax import nnx

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

    def eval_step(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """Per-batch eval metrics (means over the batch); the loop jits this over the mesh and
        averages the results over eval batches."""

    def preview_step(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """Arrays to look at (e.g. reconstructions); jitted by the loop, gathered to host."""

    def write_preview(self, outputs: dict[str, Any], batch: Batch, out_dir: str, step: int) -> None:
        """Write previews (PNG, NIfTI) from `preview_step` outputs and the host batch (which keeps
        text fields). Called on process 0 only."""
