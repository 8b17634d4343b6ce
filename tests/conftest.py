"""Test-wide settings: 8 emulated CPU devices, strict JAX numerics, hermetic environment."""
import os

# Must happen before jax is imported anywhere in the test session.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
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


DATA_DIR = os.path.join(TESTS_DIR, "data")


@pytest.fixture(scope="session")
def data_dir() -> str:
    return DATA_DIR
