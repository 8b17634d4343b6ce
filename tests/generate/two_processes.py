"""Run `ctgen generate` as two `jax.distributed` processes on localhost (`generate_worker.py`)."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def launch_two(tmp_path, tag, argv, *, real_cascade=False, timeout=600, shutdown_timeout=None):
    """Both processes' JSON reports (generate_worker.py). A process that fails, or a pair that has
    not finished after `timeout` seconds (a hang at a cross-process barrier), fails the test; both
    processes are killed first. `shutdown_timeout`: seconds jax.distributed lets a finished process
    wait for the others at exit before it aborts every process (default 300)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the session's XLA flags (fast test compiles), with two devices per process
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    procs, logs = [], []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=2".strip(),
               "JAX_PLATFORMS": "cpu", "CTGEN_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "CTGEN_NUM_PROCESSES": "2",
               "CTGEN_PROCESS_ID": str(pid), "PYTHONPATH": REPO,
               **({"CTGEN_TEST_SHUTDOWN_TIMEOUT": str(shutdown_timeout)} if shutdown_timeout else {})}
        logs.append(tmp_path / f"{tag}_{pid}.json")
        cmd = [sys.executable, os.path.join(HERE, "generate_worker.py"), str(logs[-1]),
               *(["--real-cascade"] if real_cascade else []), *argv, "--distributed"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            results.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = "\n".join(f"--- process {i} stderr:\n{p.communicate()[1][-3000:]}" for i, p in enumerate(procs))
        pytest.fail(f"two-process `ctgen generate` still running after {timeout} s (killed)\n{tails}")
    for i, (p, (_, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{err[-4000:]}"
    return [json.load(open(log)) for log in logs]
