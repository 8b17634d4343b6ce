"""Metric files (JSON lines, TensorBoard events), schedules, accumulation, EMA."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctgen.stages.toy import ToyStage
from ctgen.train import tensorboard as tb
from ctgen.train.loop import train
from ctgen.train.metrics import MetricWriter, read_jsonl
from ctgen.train.optim import ema_update, optimizer_config, schedule

from helpers import RecordingToyStage, params_numpy, toy_config


def test_crc32c_known_vector():
    assert tb.crc32c(b"123456789") == 0xE3069283


def test_event_file_roundtrip_and_tensorboard_reads_it(tmp_path):
    w = MetricWriter(str(tmp_path), enabled=True)
    w.write(1, {"loss": 2.5, "lr": 1e-3})
    w.write(2, {"loss": 1.5, "bad": float("nan")})
    w.close()
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert rows[0]["loss"] == 2.5 and rows[1]["bad"] == "nan"
    (path,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert tb.read_scalars(path) == [(1, "train/loss", 2.5), (1, "train/lr", pytest.approx(1e-3)), (2, "train/loss", 1.5)]
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [2.5, 1.5]


def test_schedules():
    c = optimizer_config(learning_rate=1.0, schedule="warmup_cosine", warmup_steps=10, end_learning_rate_factor=0.1)
    s = schedule(c, total_steps=110)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0) and float(s(110)) == pytest.approx(0.1)
    c = optimizer_config(learning_rate=2.0, schedule="warmup_constant", warmup_steps=4)
    s = schedule(c, total_steps=100)
    assert float(s(2)) == pytest.approx(1.0) and float(s(50)) == pytest.approx(2.0)
    # a cool-down: held at the full rate, then a cosine to end_learning_rate_factor * lr at train.steps
    c = optimizer_config(learning_rate=1e-3, schedule="constant_cosine", hold_steps=4500, end_learning_rate_factor=0.1)
    s = schedule(c, total_steps=7000)
    assert float(s(0)) == pytest.approx(1e-3) and float(s(4500)) == pytest.approx(1e-3)
    assert float(s(5750)) == pytest.approx(0.55e-3) and float(s(7000)) == pytest.approx(1e-4)


def test_ema_update_copy_then_decay():
    e, p = jnp.zeros(3), jnp.ones(3)
    np.testing.assert_allclose(ema_update(e, p, 0.9, jnp.int32(0), 2, 1), 1.0)  # copies before start
    np.testing.assert_allclose(ema_update(e, p, 0.9, jnp.int32(5), 2, 1), 0.1, rtol=1e-6)
    np.testing.assert_allclose(ema_update(e, p, 0.9, jnp.int32(5), 2, 2), 0.0)  # not its turn


def test_gradient_accumulation_matches_full_batch(tmp_path):
    common = {"train.steps": 3, "train.eval_every": -1, "train.batch_size": 16}
    full_cfg = toy_config(**common)
    full = train(full_cfg, str(tmp_path / "full"), ToyStage(full_cfg))
    batches = []
    cfg = toy_config(**common, **{"train.accum_steps": 2})
    acc = train(cfg, str(tmp_path / "acc"), RecordingToyStage(cfg, batches))
    a, b = params_numpy(full["state"]), params_numpy(acc["state"])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-4, err_msg=k)
    # the running mean (model state) went through both micro-batches, in order: micro-batch j
    # of a step is its rows j::2, each updates mean <- m * mean + (1 - m) * batch mean of y
    from ctgen.stages.toy import ToyConfig, _Example

    example = _Example(ToyConfig(**cfg.model.to_dict()), cfg.data.data_seed)
    m, mean, logged = cfg.model.momentum, np.zeros(cfg.model.out_dim), []
    for indices in batches:
        y = np.stack([example.map(i)["y"] for i in indices]).astype(np.float64)
        per_micro = []
        for j in range(2):
            mean = m * mean + (1 - m) * y[j::2].mean(axis=0)
            per_micro.append(mean[0])
        logged.append(np.mean(per_micro))  # the step's metric: mean over its micro-batches
    assert len(batches) == 3
    np.testing.assert_allclose(jax.device_get(acc["state"]["model_state"]["target_mean"][...]), mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc["train"]["target_mean0"], np.mean(logged), rtol=1e-5, atol=1e-6)


def test_loop_writes_metrics_eval_and_learns(tmp_path):
    cfg = toy_config(**{"train.steps": 60, "train.log_every": 20, "train.eval_every": 30, "train.preview_every": 30})
    out = train(cfg, str(tmp_path), ToyStage(cfg))
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [20, 40, 60] and [r["step"] for r in eval_rows] == [30, 60]
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert all(r["steps_per_sec"] > 0 for r in train_rows)
    assert os.path.exists(tmp_path / "config.json")
    assert out["eval"]["mse"] == eval_rows[-1]["mse"]
    for step in (30, 60):
        prev = np.load(tmp_path / "previews" / f"step_{step:08d}" / "preview.npz")
        assert prev["pred"].shape == prev["y"].shape == (16, 8)
