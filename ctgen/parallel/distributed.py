"""Multi-host initialisation: `jax.distributed.initialize` only when asked, failing loudly.

Asked for by `config.distributed.enabled` (or `--config.distributed.enabled=True`) or by the
environment variable `CTGEN_DISTRIBUTED=1`. Coordinator, process count and process id come
from the config, else from `CTGEN_COORDINATOR_ADDRESS`, `CTGEN_NUM_PROCESSES`,
`CTGEN_PROCESS_ID`, else JAX auto-detects them (TPU pods, SLURM, Open MPI, ...). After
initialising, the process count is asserted against the expected one when it is known.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax

from ctgen.errors import UserError

log = logging.getLogger(__name__)

_ENV = {
    "coordinator_address": "CTGEN_COORDINATOR_ADDRESS",
    "num_processes": "CTGEN_NUM_PROCESSES",
    "process_id": "CTGEN_PROCESS_ID",
}


class DistributedError(UserError):
    pass


def _get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    try:
        value = cfg[key]
    except (KeyError, TypeError, AttributeError):
        return default
    return default if value in (None, "", -1) else value


def distributed_config():
    """The `distributed` section of training and generation configs (fields read by `maybe_initialize`)."""
    import ml_collections

    return ml_collections.ConfigDict({
        "enabled": False, "coordinator_address": "", "num_processes": -1, "process_id": -1,
        "cpu_collectives": "", "initialization_timeout": 300})


def requested(cfg: Any = None) -> bool:
    env = os.environ.get("CTGEN_DISTRIBUTED", "").strip().lower()
    return bool(_get(cfg, "enabled", False)) or env in ("1", "true", "yes", "on")


def maybe_initialize(cfg: Any = None) -> bool:
    """Initialise `jax.distributed` if requested; returns whether it was. Idempotent."""
    if not requested(cfg):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs: dict[str, Any] = {}
    for key, env in _ENV.items():
        value = _get(cfg, key) or os.environ.get(env) or None
        if value is not None:
            kwargs[key] = int(value) if key != "coordinator_address" else str(value)
    # CPU devices need a collectives backend to talk across processes (tests, CPU clusters); the
    # setting only affects the CPU client, and must not query the backend before initialize().
    jax.config.update("jax_cpu_collectives_implementation", _get(cfg, "cpu_collectives", "gloo"))
    timeout = _get(cfg, "initialization_timeout")
    if timeout:
        kwargs["initialization_timeout"] = int(timeout)
    log.info("jax.distributed.initialize(%s)", kwargs or "auto-detect")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # re-raise with what was attempted; never continue single-host silently
        raise DistributedError(
            f"jax.distributed.initialize({kwargs or 'auto-detect'}) failed: {e}. Set "
            "CTGEN_COORDINATOR_ADDRESS (host:port of process 0), CTGEN_NUM_PROCESSES and "
            "CTGEN_PROCESS_ID, or run where JAX can auto-detect the cluster (TPU VM, SLURM)."
        ) from e
    expected = kwargs.get("num_processes")
    if expected is not None and jax.process_count() != expected:
        raise DistributedError(
            f"expected {expected} processes after jax.distributed.initialize, got {jax.process_count()}"
        )
    log.info(
        "distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True
