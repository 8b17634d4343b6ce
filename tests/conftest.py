"""Test-wide settings: 8 emulated CPU devices, strict JAX numerics, hermetic environment."""
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the test session; subprocesses started by tests
# inherit these through the environment.
# The suite is bound by XLA compile time, not by run time: the tiny CT-ViT generator loss + gradient
# took 95 CPU-s to compile with XLA's defaults and 24 with LLVM optimisation off and the legacy loop
# emitters (the compiled step runs ~1.5x slower, which tiny tests do not notice). A flag the caller
# already set wins.
_TEST_XLA_FLAGS = {
    "xla_force_host_platform_device_count": "8",
    "xla_backend_optimization_level": "0",
    "xla_cpu_use_fusion_emitters": "false",
}
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags] + [f"--{k}={v}" for k, v in _TEST_XLA_FLAGS.items() if k not in _flags]).strip()
# Tests and the CLI processes they start compile many identical programs (the same tiny train step in
# several tests): one persistent compilation cache per session, shared by pytest-xdist workers (they
# inherit the controller's environment) and removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE = tempfile.mkdtemp(prefix="ctgen-test-xla-cache-")
else:
    _SESSION_CACHE = None
os.environ.setdefault("CTGEN_COMPILE_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])  # `ctgen generate`'s
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-dir")  # never touch a user's datasets

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

MARKERS = (
    "slow: takes more than ~30 s on the 2-core CI machine",
    "multiprocess: starts several jax.distributed processes on localhost",
    "parity: numeric parity against a reference implementation (skipped without it)",
)


def pytest_configure(config):
    # Settings live here rather than in an ini file (the repository's top level is fixed).
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:tensorflow_datasets.*")


def pytest_collection_modifyitems(session, config, items):
    # Slow tests first (stable otherwise): under pytest-xdist the long ones then overlap with the many
    # short ones instead of leaving one worker busy at the end. The order is deterministic, as xdist needs.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None and not hasattr(config, "workerinput"):  # the controller owns it
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


DATA_DIR = os.path.join(TESTS_DIR, "data")


@pytest.fixture(scope="session")
def data_dir() -> str:
    return DATA_DIR
