"""`ctgen.generate.runtime`: where the compilation cache goes, compile time apart from run time,
progress bars only on a terminal of process 0."""
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ctgen.generate.runtime import ENV_CACHE, StageTimer, cache_dir_setting, progress_enabled, stage_progress

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cache_directory_settings(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir_setting() == str(tmp_path / "xdg" / "ctgen" / "jax")
    assert cache_dir_setting(enabled=False) is None
    assert cache_dir_setting(directory=str(tmp_path / "mine")) == str(tmp_path / "mine")
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "env"))
    assert cache_dir_setting() == str(tmp_path / "env")
    assert cache_dir_setting(directory=str(tmp_path / "mine")) == str(tmp_path / "mine")  # the config wins
    monkeypatch.setenv(ENV_CACHE, "off")
    assert cache_dir_setting() is None
    assert cache_dir_setting(enabled=False, directory=str(tmp_path / "mine")) is None


PROBE = """
import jax, jax.numpy as jnp
from ctgen.generate.runtime import setup_compile_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
print(setup_compile_cache())
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((16, 16))).block_until_ready()
"""


def test_compile_cache_is_written_where_configured(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop(ENV_CACHE, None)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    cache = os.path.join(str(tmp_path), "ctgen", "jax")
    assert out.stdout.strip() == cache and os.listdir(cache)


def test_compile_cache_off(monkeypatch):
    from ctgen.generate.runtime import setup_compile_cache

    monkeypatch.setenv(ENV_CACHE, "0")
    previous = jax.config.jax_compilation_cache_dir  # the test session's own cache (conftest)
    try:
        assert setup_compile_cache() is None and jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_stage_timer_compiles_once_per_shape():
    timer = StageTimer()
    f = jax.jit(lambda x: jnp.tanh(x) * 2.0)
    x4, x8 = jnp.ones((4,)), jnp.ones((8,))
    step = timer.compile("maskgit", f, x4)
    assert timer.compile("maskgit", f, x4) is step  # same shapes: compiled once
    assert timer.compile("maskgit", f, x8) is not step
    first = timer.compile_seconds["maskgit"]
    assert first > 0
    with timer.run("maskgit"):
        y = step(x4).block_until_ready()
    np.testing.assert_allclose(y, np.tanh(1.0) * 2.0, rtol=1e-6)
    timer.compile("superres", f, x4)  # another stage counts apart
    summary = timer.summary()
    assert set(summary["compile_seconds"]) == {"maskgit", "superres"} and set(summary["seconds"]) == {"maskgit"}
    assert summary["compile_seconds"]["maskgit"] == round(first, 3)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal_of_process_zero():
    assert progress_enabled(True, 0, _Tty())
    assert not progress_enabled(True, 1, _Tty())
    assert not progress_enabled(False, 0, _Tty())
    assert not progress_enabled(True, 0, io.StringIO())  # a log file
    with stage_progress(3, "maskgit", enabled=True, process_index=1) as bar:
        bar.update(3)
        assert bar.disable


def test_stage_timer_counts_first_call_compilation_apart():
    """A jit compiled on its first call inside `run(stage, jit_compiles=True)` (the T5 encoder)
    adds to the stage's compile seconds, not its run seconds; the next call compiles nothing."""
    timer = StageTimer()
    f = jax.jit(lambda x: jnp.cos(x) @ x.T + 1.0)
    with timer.run("text", jit_compiles=True):
        f(jnp.ones((8, 8))).block_until_ready()
    first = timer.compile_seconds["text"]
    assert first > 0 and timer.seconds["text"] >= 0
    with timer.run("text", jit_compiles=True):
        f(jnp.ones((8, 8))).block_until_ready()
    assert timer.compile_seconds["text"] == first
    with timer.run("plain"):  # without the flag nothing moves
        jax.jit(lambda x: x * 3.0)(jnp.ones(3)).block_until_ready()
    assert "plain" not in timer.compile_seconds
