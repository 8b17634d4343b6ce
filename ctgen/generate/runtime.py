"""Start-up and run-time helpers of generation: the persistent compilation cache, compile time
measured apart from sampling time, per-stage progress bars, and the end-of-run wait of a
multi-process run.

    cache = setup_compile_cache(enabled=True)          # before the first jit; returns the directory
    timer = StageTimer()
    step = timer.compile("maskgit", jitted_step, *args)  # AOT lower + compile, timed and memoised
    with timer.run("maskgit"):
        out = jax.block_until_ready(step(*args))
    timer.summary()   # {"compile_seconds": {...}, "seconds": {...}}
    with stage_progress(18, "maskgit", enabled=True, process_index=0) as bar: ...
    wait_for_all_processes("ctgen_generate_finished")  # jax.distributed: before any process exits

The cache: JAX writes compiled executables to a directory and reads them back in the next
process, so a second `ctgen generate` of the same shapes skips XLA compilation. Where:
`--no-compile-cache` (config `compile_cache.enabled`) turns it off; otherwise the config's
`compile_cache.dir`, else `$CTGEN_COMPILE_CACHE` (a directory, or 0/off/false to turn it off),
else `$XDG_CACHE_HOME/ctgen/jax` (default `~/.cache/ctgen/jax`).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

ENV_CACHE = "CTGEN_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ctgen", "jax")


def cache_dir_setting(enabled: bool = True, directory: str = "") -> str | None:
    """The compilation-cache directory the settings ask for (module docstring), None = off."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if not enabled or (not directory and env.lower() in _OFF):
        return None
    return os.path.abspath(os.path.expanduser(directory or env or default_cache_dir()))


def setup_compile_cache(enabled: bool = True, directory: str = "") -> str | None:
    """Point JAX's persistent compilation cache at `cache_dir_setting(...)` (call before the first
    compilation); returns the directory or None when off. An unusable directory turns the cache
    off with a warning rather than failing the run."""
    import logging

    import jax

    path = cache_dir_setting(enabled, directory)
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            logging.getLogger("ctgen").warning("compilation cache %s unusable (%s); compiling without it", path, e)
            path = None
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def _signature(args: Any, kwargs: Any) -> tuple:
    import jax

    def leaf(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return ("array", tuple(x.shape), str(x.dtype), getattr(x, "sharding", None))
        return ("value", x)

    leaves, treedef = jax.tree.flatten((args, kwargs))
    return treedef, tuple(leaf(x) for x in leaves)


class StageTimer:
    """Seconds per stage, with compilation counted apart from running.

    `compile(stage, jitted, *args, **kwargs)` lowers and compiles ahead of time (`jitted.lower(...)
    .compile()`), adds the time to the stage's compile seconds and returns the executable;
    the same function with arguments of the same shapes, dtypes and shardings is compiled once.
    `run(stage)` times a block (block on its results inside it so device work is counted);
    `run(stage, jit_compiles=True)` moves the compilations of jits called inside it to compile seconds.
    """

    def __init__(self) -> None:
        self.compile_seconds: dict[str, float] = defaultdict(float)
        self.seconds: dict[str, float] = defaultdict(float)
        self._compiled: dict[tuple, Any] = {}

    def compile(self, stage: str, jitted: Callable, *args: Any, **kwargs: Any) -> Callable:
        key = (stage, id(jitted), _signature(args, kwargs))
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = jitted.lower(*args, **kwargs).compile()
            self.compile_seconds[stage] += time.perf_counter() - start
        return self._compiled[key]

    @contextlib.contextmanager
    def run(self, stage: str, *, jit_compiles: bool = False) -> Iterator[None]:
        """Time a block as the stage's run seconds. `jit_compiles`: for code that compiles on its
        first call (a jit we do not lower ahead of time), the compilations inside the block (JAX's
        tracing, lowering and XLA compile or persistent-cache read, from `jax.monitoring`) count
        as the stage's compile seconds instead."""
        start = time.perf_counter()
        spans = _CompileSpans() if jit_compiles else None
        try:
            with spans or contextlib.nullcontext():
                yield
        finally:
            total = time.perf_counter() - start
            compiled = min(spans.seconds(), total) if spans else 0.0
            self.seconds[stage] += total - compiled
            if compiled:
                self.compile_seconds[stage] += compiled

    def summary(self) -> dict[str, dict[str, float]]:
        return {"compile_seconds": {k: round(v, 3) for k, v in self.compile_seconds.items()},
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


# JAX's monitoring events of a jit's first call (jax/_src/dispatch.py); the backend compile
# includes a persistent-cache read.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class _CompileSpans:
    """Collects the time spans of JAX compilations on this thread while active; `seconds()` is
    the length of their union (a jit traced inside another's tracing is not counted twice)."""

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self._spans: list[tuple[float, float]] = []

    def _listener(self, event: str, start_time: float, end_time: float, **_: Any) -> None:
        if event in COMPILE_EVENTS and threading.get_ident() == self._thread:
            self._spans.append((start_time, end_time))

    def __enter__(self) -> "_CompileSpans":
        import jax

        jax.monitoring.register_event_time_span_listener(self._listener)
        return self

    def __exit__(self, *exc: Any) -> None:
        import jax

        jax.monitoring.unregister_event_time_span_listener(self._listener)

    def seconds(self) -> float:
        total, end = 0.0, float("-inf")
        for a, b in sorted(self._spans):
            if b > end:
                total += b - max(a, end)
                end = b
        return total


def progress_enabled(enabled: bool, process_index: int, stream: Any = None) -> bool:
    """Bars only when asked, on process 0, and on a terminal (never into log files)."""
    stream = sys.stderr if stream is None else stream
    return bool(enabled) and process_index == 0 and bool(getattr(stream, "isatty", lambda: False)())


def stage_progress(total: int, desc: str, *, enabled: bool = True, process_index: int = 0, unit: str = "step"):
    """A tqdm bar with rate and ETA for one stage of the cascade (a context manager); a disabled
    bar (see `progress_enabled`) costs nothing and prints nothing."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not progress_enabled(enabled, process_index))


# A process's share can take days at paper size; the wait ends early only if a process dies
# (jax.distributed's heartbeats then end every process).
FINISH_TIMEOUT_S = 7 * 24 * 3600


_BARRIERS = itertools.count()


def wait_for_all_processes(name: str, timeout_s: int = FINISH_TIMEOUT_S) -> None:
    """Block until every `jax.distributed` process has called this with the same `name` (a
    coordination-service barrier: no device computation, heartbeats keep running); a no-op in a
    single-process run. Every process must make the same sequence of calls (each barrier gets
    its own key)."""
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=f"{name}_{next(_BARRIERS)}", timeout_ms=int(timeout_s * 1000))
