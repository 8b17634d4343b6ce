"""Preemption and crashes, with real processes: SIGTERM saves and exits 75; `kill -9` during an
asynchronous save leaves a torn checkpoint that is never loaded; both resume to the same
parameters as an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ctgen.train import checkpoint as ckpt_lib
from ctgen.train.loop import EXIT_PREEMPTED

from helpers import REPO, TOY

ENV = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "PYTHONUNBUFFERED": "1"}


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "ctgen", "train", "--config", f"{TOY}:ema", "--workdir", str(workdir),
            "--config.train.progress_bar=false", "--config.train.eval_every=-1", *overrides]


def _run(workdir, *overrides, timeout=600):
    p = subprocess.run(_cmd(workdir, *overrides), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _final_params(workdir):
    """Parameters of the latest checkpoint, as flat numpy (restored without any model code)."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    step = mngr.latest_step()
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    mngr.close()
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = np.asarray(node)

    walk("", state["params"])
    walk("ema", state["ema"])
    return step, flat


def _assert_same_final_params(straight, resumed, steps):
    step_a, a = _final_params(straight)
    step_b, b = _final_params(resumed)
    assert step_a == step_b == steps
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.001)


@pytest.mark.slow
def test_sigterm_saves_and_resumes_identically(tmp_path):
    args = ["--config.train.steps=400", "--config.train.checkpoint_every=50"]
    _run(tmp_path / "straight", *args)
    work = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(work, *args), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: os.path.isdir(work / "checkpoints" / "50"), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "preempted at step" in err
    stopped = ckpt_lib.Checkpointer(str(work)).latest_step()
    assert 50 <= stopped < 400, stopped
    _run(work, *args)
    _assert_same_final_params(tmp_path / "straight", work, steps=400)


@pytest.mark.slow
def test_kill_9_during_async_save_skips_torn_checkpoint(tmp_path):
    # A model big enough that an asynchronous save takes a while (~40 MB of state).
    args = ["--config.train.steps=40", "--config.train.checkpoint_every=10", "--config.model.hidden=1536",
            "--config.train.log_every=5"]
    _run(tmp_path / "straight", *args)
    torn = None
    for attempt in range(4):
        work = tmp_path / f"killed{attempt}"
        ck_dir = work / "checkpoints"
        proc = subprocess.Popen(_cmd(work, *args), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

        def tmp_dirs():
            if not ck_dir.is_dir():
                return []
            return [n for n in os.listdir(ck_dir) if ".orbax-checkpoint-tmp" in n and not n.startswith("10.")]

        _wait_for(lambda: bool(tmp_dirs()) and (ck_dir / "10").is_dir(), proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        if tmp_dirs():
            torn = work
            break
    assert torn is not None, "never caught a save in flight"
    torn_step = int(tmp_dirs_name(torn)[-1].split(".")[0])
    complete = ckpt_lib.Checkpointer(str(torn)).latest_step()
    assert complete is not None and complete < torn_step, (complete, torn_step)
    _run(torn, *args)
    _assert_same_final_params(tmp_path / "straight", torn, steps=40)
    assert not [n for n in os.listdir(torn / "checkpoints") if "tmp" in n], "torn directory not cleaned up"


def tmp_dirs_name(work):
    return sorted(n for n in os.listdir(work / "checkpoints") if ".orbax-checkpoint-tmp" in n)
