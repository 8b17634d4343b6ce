"""A small regression stage that exercises every seam of the shared loop.

Not a CT model: it exists so the loop's sharding, accumulation, phases, non-trainable state,
checkpoint/resume and multi-host behaviour are tested on something that trains in seconds. The
data is a deterministic synthetic regression problem served through grain exactly like the real
stages' data (seeded shuffle, per-host shards, checkpointable iterator state).

Model: x -> Dense(in, hidden) -> GELU -> Dense(hidden, hidden) -> GELU -> Dense(hidden, out).
A second head `aux` is trained by the optional phase "aux" (to test multi-phase cycles like
the CT-ViT's generator/discriminator). `target_mean` is a non-trainable running mean of the
targets, updated inside the loss (like a VQ codebook's EMA buffers).

Eval: the mean squared error over the whole eval split (`data.num_eval` examples, the last batch
padded with rows marked invalid). Frozen upstream model: with `teacher.weights` set (a weights
directory or workdir of a toy model with the same `model` config), the loop restores that model
once, sharded, and eval also reports `teacher_mse`, the mean squared distance between this
model's and the teacher's predictions; previews include the teacher's predictions. This is the
pattern a downstream stage follows for its frozen upstream model (`config.tokenizer.weights`).
"""
from __future__ import annotations

import dataclasses
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctgen.config_dataclass import build_dataclass
from ctgen.data.pipelines import eval_records
from ctgen.parallel.axes import param, with_axes
from ctgen.weights import load_model
from ctgen.train.stage import FrozenModel, Phase, mean_metrics, valid_rows


class RunningStat(nnx.Variable):
    """Non-trainable state updated in the forward pass (not touched by optimizers)."""


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    in_dim: int = 16
    hidden: int = 64
    out_dim: int = 8
    momentum: float = 0.9


class Dense(nnx.Module):
    def __init__(self, din: int, dout: int, names: tuple[str, str], *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(with_axes(nnx.initializers.lecun_normal(), *names)(rngs.params(), (din, dout)))
        self.bias = param(jnp.zeros((dout,)), names[1])

    def __call__(self, x_BxI: jax.Array) -> jax.Array:
        return x_BxI @ self.kernel[...] + self.bias[...][None, :]


class ToyModel(nnx.Module):
    def __init__(self, cfg: ToyConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.inp = Dense(cfg.in_dim, cfg.hidden, ("embed", "mlp"), rngs=rngs)
        self.mid = Dense(cfg.hidden, cfg.hidden, ("mlp", "embed"), rngs=rngs)
        self.out = Dense(cfg.hidden, cfg.out_dim, ("embed", "vocab"), rngs=rngs)
        self.aux = Dense(cfg.hidden, 1, ("embed", None), rngs=rngs)
        self.target_mean = param(jnp.zeros((cfg.out_dim,)), "norm", cls=RunningStat)

    def features(self, x_BxI: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.mid(jax.nn.gelu(self.inp(x_BxI))))

    def __call__(self, x_BxI: jax.Array) -> jax.Array:
        return self.out(self.features(x_BxI))


# --- data -----------------------------------------------------------------------------------------
class _Example(grain.transforms.Map):
    """Deterministic example `i` of a fixed random linear-plus-sine regression problem."""

    def __init__(self, cfg: ToyConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        w_rng = np.random.default_rng(1234)
        self.w = w_rng.normal(size=(cfg.in_dim, cfg.out_dim)).astype(np.float32) / np.sqrt(cfg.in_dim)

    def map(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(i)])
        x = rng.normal(size=(self.cfg.in_dim,)).astype(np.float32)
        y = (x @ self.w + np.sin(x[: self.cfg.out_dim])).astype(np.float32)
        return {"x": x, "y": y, "index": np.int64(i)}


def toy_dataset(cfg: ToyConfig, *, num_examples: int, seed: int) -> grain.MapDataset:
    return grain.MapDataset.range(num_examples).map(_Example(cfg, seed))


def _with_valid_field(item):
    ex, valid = item
    return {**ex, "valid": np.bool_(valid)}


class ToyStage:
    def __init__(self, config):
        self.config = config
        self.cfg = build_dataclass(ToyConfig, config.model, where="config.model")

    def build_model(self, rngs: nnx.Rngs) -> ToyModel:
        return ToyModel(self.cfg, rngs=rngs)

    def frozen_models(self) -> dict[str, FrozenModel]:
        weights = self.config.teacher.weights
        return {"teacher": FrozenModel(weights, self._load_teacher)} if weights else {}

    def _load_teacher(self, weights: str, mesh, rules) -> ToyModel:
        return load_model(weights, lambda rngs: ToyModel(self.cfg, rngs=rngs), mesh=mesh, rules=rules)

    def phases(self):
        def main_loss(model: ToyModel, batch, rng):
            pred = model(batch["x"])
            mse = jnp.mean((pred - batch["y"]) ** 2)
            m = self.cfg.momentum
            model.target_mean[...] = m * model.target_mean[...] + (1 - m) * jnp.mean(batch["y"], axis=0)
            return mse, {"mse": mse, "target_mean0": model.target_mean[0]}

        def aux_loss(model: ToyModel, batch, rng):
            pred = model.aux(model.features(batch["x"]))[:, 0]
            target = jnp.sum(batch["y"], axis=-1)
            loss = jnp.mean((pred - target) ** 2)
            return loss, {"aux_mse": loss}

        return [
            Phase("main", main_loss, trains=nnx.All(nnx.Param, nnx.Not(nnx.PathContains("aux")))),
            Phase("aux", aux_loss, trains=nnx.All(nnx.Param, nnx.PathContains("aux")), update_state=False),
        ]

    def train_data(self, process_index: int, process_count: int, seed: int):
        d = self.config.data
        local = self.config.train.batch_size // process_count
        ds = toy_dataset(self.cfg, num_examples=d.num_train, seed=d.data_seed)
        ds = ds[process_index::process_count].shuffle(seed=seed).repeat()
        return ds.batch(local, drop_remainder=True).to_iter_dataset().__iter__()

    def eval_data(self, process_index: int, process_count: int):
        d = self.config.data
        if d.num_eval <= 0:
            return None
        local = d.eval_batch_size // process_count
        ds = toy_dataset(self.cfg, num_examples=d.num_eval, seed=d.data_seed + 1)
        ds = eval_records(ds, process_index=process_index, process_count=process_count, batch=local)
        return ds.map(_with_valid_field).batch(local)

    def eval_step(self, model: ToyModel, frozen, batch):
        pred = model(batch["x"])
        valid = valid_rows(batch, pred.shape[0])
        out = {"mse": jnp.sum(jnp.mean((pred - batch["y"]) ** 2, axis=-1) * valid), "count": jnp.sum(valid)}
        if "teacher" in frozen:
            out["teacher_mse"] = jnp.sum(jnp.mean((pred - frozen["teacher"](batch["x"])) ** 2, axis=-1) * valid)
        return out

    def eval_metrics(self, totals):
        return mean_metrics(totals)

    def preview_step(self, model: ToyModel, frozen, batch):
        out = {"pred": model(batch["x"])}
        if "teacher" in frozen:
            out["teacher"] = frozen["teacher"](batch["x"])
        return out

    def write_preview(self, outputs, batch, out_dir: str, step: int) -> None:
        os.makedirs(out_dir, exist_ok=True)
        np.savez(os.path.join(out_dir, "preview.npz"), y=batch["y"], **outputs)


def make_stage(config) -> ToyStage:
    return ToyStage(config)
