"""Preemption and crashes, with real processes: SIGTERM saves and exits 75; `kill -9` during an
asynchronous save leaves a torn checkpoint that is never loaded; both resume to the same
parameters as an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

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


def test_processes_agree_on_stopping_only_every_few_steps(monkeypatch):
    """With several processes the stop flags are gathered (a collective that waits for the
    devices) only every STOP_CHECK_EVERY steps and at the last step; any process's flag stops all."""
    from ctgen.train import loop

    gathered = []
    peer_flag = [0]

    def allgather(local):
        gathered.append(int(local))
        return np.array([int(local), peer_flag[0]], np.int32)

    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    monkeypatch.setattr(loop.multihost_utils, "process_allgather", allgather)
    stop = loop._StopSignal()
    k, end = loop.STOP_CHECK_EVERY, 2 * loop.STOP_CHECK_EVERY + 3
    assert not any(stop.stop_requested(step, end) for step in range(1, end + 1))
    assert len(gathered) == 3  # at k, 2k and the last step
    stop.flag.set()  # this process was signalled: noticed at the next multiple of k
    assert not stop.stop_requested(k + 1, end) and stop.stop_requested(2 * k, end)
    stop.flag.clear()
    peer_flag[0] = 1  # only the other process was signalled: this one stops at the same step
    assert not stop.stop_requested(k - 1, end) and stop.stop_requested(k, end)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    import socket

    from ctgen.train.loop import STOP_CHECK_EVERY

    work = tmp_path / "two"

    def start(*extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for pid in range(2):
            env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
                   "CTGEN_DISTRIBUTED": "1", "CTGEN_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                   "CTGEN_NUM_PROCESSES": "2", "CTGEN_PROCESS_ID": str(pid)}
            procs.append(subprocess.Popen(_cmd(work, "--config.train.steps=100000", "--config.train.checkpoint_every=25",
                                               *extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        return procs

    procs = start()
    _wait_for(lambda: os.path.isdir(work / "checkpoints" / "25"), procs[0])
    procs[1].send_signal(signal.SIGTERM)  # process 0 is not signalled: it learns through the allgather
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, errs[0][-2000:] + errs[1][-2000:]
    steps = {int(e.split("preempted at step ")[1].split(";")[0]) for e in errs}
    assert len(steps) == 1, steps
    (stopped,) = steps
    assert stopped % STOP_CHECK_EVERY == 0 and stopped >= 25
    assert _latest_step(work) == stopped
    # Both processes restore it and continue.
    procs = start("--config.train.stop_after_steps=5")
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert _latest_step(work) == stopped + 5


def _latest_step(workdir):
    ck = ckpt_lib.Checkpointer(str(workdir))
    try:
        return ck.latest_step()
    finally:
        ck.close()
