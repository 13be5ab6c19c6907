"""Persistent compilation cache: a second process reuses the first one's executable."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from centermask_jax import compilation_cache

REPO = pathlib.Path(__file__).resolve().parents[1]

_CHILD = """
import sys
import jax, jax.numpy as jnp
from centermask_jax import compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda e, **kw: hits.append(e) if e == '/jax/compilation_cache/cache_hits' else None)
d = compilation_cache.enable(sys.argv[1], min_compile_time_s=0.0)
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 1.0)
y = f(jnp.ones((64, 64)))
print(d, len(hits), float(y[0, 0]), jax.config.jax_compilation_cache_max_size)
"""


def _run(arg):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)
  r = subprocess.run([sys.executable, "-c", _CHILD, arg], env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return r.stdout.split()


def test_second_process_hits_the_cache(tmp_path):
  d = str(tmp_path / "xla")
  first = _run(d)
  assert first[0] == d and first[1] == "0" and os.listdir(d)
  # bounded, so jax reads and writes the directory under its file lock
  assert int(first[3]) == compilation_cache.MAX_BYTES
  assert os.path.exists(os.path.join(d, ".lockfile"))
  second = _run(d)
  assert int(second[1]) >= 1 and second[2] == first[2]  # cached executables, same result


def test_cache_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  assert compilation_cache.cache_dir() == os.path.expanduser("~/.cache/centermask_jax/xla")
  monkeypatch.setenv(compilation_cache.ENV, str(tmp_path))
  assert compilation_cache.cache_dir() == str(tmp_path)
  assert compilation_cache.cache_dir("none") is None
  assert compilation_cache.cache_dir("~/x") == os.path.expanduser("~/x")


def test_compiles_listener_counts_a_cache_hit_with_its_stored_compile_time(compiles):
  """conftest.Compiles: a program this process reads from the persistent cache is recorded
  as a hit with the compile time stored beside it (jax stores whole seconds), not with the
  read's duration, so compile-count checks see it as the program it is."""
  import jax
  import jax.numpy as jnp
  if not jax.config.jax_compilation_cache_dir:
    pytest.skip("persistent compilation cache off in this run")
  old = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    x = jnp.arange(37.0) + float(os.getpid())  # a program no other test compiles
    mark = len(compiles.names)
    first = jax.jit(lambda v: jnp.cumsum(jnp.tanh(v) * 3.0))(x)
    second = jax.jit(lambda v: jnp.cumsum(jnp.tanh(v) * 3.0))(x)  # new jit: same key
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)
  hits, seconds = compiles.hits[mark:], compiles.seconds[mark:]
  assert len(compiles.since(mark)) == 2 and hits == [False, True], (hits, seconds)
  assert (np.asarray(first) == np.asarray(second)).all()
  assert seconds[0] > 0 and abs(seconds[1] - round(seconds[1])) < 1e-9, seconds
