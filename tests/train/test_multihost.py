"""Two processes on localhost with jax.distributed (gloo CPU collectives), 4 devices each."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, save_toy_weights, toy_config

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, tag, steps, stop_after, tmp_path, teacher):
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "CTGEN_DISTRIBUTED": "1", "CTGEN_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "CTGEN_NUM_PROCESSES": "2", "CTGEN_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu"}
        log = tmp_path / f"{tag}_{pid}.json"
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, WORKER, str(workdir), str(log), str(steps), str(stop_after), teacher],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    return [json.loads(open(l).read()) for l in logs]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    teacher = str(tmp_path / "teacher")
    save_toy_weights(teacher, toy_config(**{"seed": 5}))
    straight = _launch(tmp_path / "straight", "straight", 8, 0, tmp_path, teacher)
    first = _launch(tmp_path / "resumed", "first", 8, 4, tmp_path, teacher)
    second = _launch(tmp_path / "resumed", "second", 8, 0, tmp_path, teacher)

    for info in straight + first + second:
        assert info["process_count"] == 2 and info["devices"] == 8 and info["local_devices"] == 4
        # mid kernel (mlp 64, embed 64) on data=2 x fsdp=4: embed split 4 ways, all over both hosts
        assert info["shard_shape"] == [64, 16]
    a, b = straight
    assert a["process_index"] != b["process_index"]
    for batch_a, batch_b in zip(a["batches"], b["batches"]):
        assert len(batch_a) == len(batch_b) == 8  # each host reads half of the global batch of 16
        assert not set(batch_a) & set(batch_b), "hosts must read disjoint shards"
    assert all(i % 2 == a["process_index"] for batch in a["batches"] for i in batch)
    # Resumed across a restart of both processes: the same batches as straight through.
    assert first[0]["final_step"] == 4 and second[0]["start_step"] == 4 and second[0]["final_step"] == 8
    for s, f, r in zip(straight, first, second):
        assert f["batches"] + r["batches"] == s["batches"]
    assert second[0]["eval"] == pytest.approx(straight[0]["eval"], rel=1e-6)
    # The frozen teacher (sharded over both processes) entered eval and the previews, which both
    # processes ran (a sharded jitted call that only process 0 made would hang) and process 0 wrote.
    assert a["eval"] == b["eval"] and a["eval"]["teacher_mse"] > 0
    for step in (4, 8):
        preview = np.load(tmp_path / "straight" / "previews" / f"step_{step:08d}" / "preview.npz")
        assert preview["teacher"].shape == preview["pred"].shape == (16, 8)
