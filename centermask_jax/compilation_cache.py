"""JAX's persistent compilation cache for train / eval / demo and the tests.

Compiled XLA executables are written to a directory and reused by later processes with the
same program, shapes, devices and versions, so extra canvas buckets, reruns and CI reruns
skip most of the compile time. Directory: `config.compilation_cache_dir`, else jax's own
JAX_COMPILATION_CACHE_DIR when set, else CENTERMASK_JAX_CACHE_DIR, else
~/.cache/centermask_jax/xla; "none" turns it off. Correctness never depends on it (a cold or absent cache only compiles).

The cache is given a size bound (`MAX_BYTES`, least recently used entries evicted): with a
bound, jax takes a file lock around every read and write of the directory, so processes
sharing it (two trainers, pytest-xdist workers, a train and an eval) never read an
executable another one is still writing. Unbounded, jax writes entries unlocked and a
reader can deserialise a truncated file (the likely cause of a SIGABRT once seen in a
two-worker test run with the cache on).
"""
import os
from typing import Optional

ENV = "CENTERMASK_JAX_CACHE_DIR"
DEFAULT = os.path.join("~", ".cache", "centermask_jax", "xla")
OFF = ("none", "off")
MAX_BYTES = 16 << 30  # LRU bound; any bound also turns on jax's file lock (module docstring)


def cache_dir(path: Optional[str] = None) -> Optional[str]:
  """The directory to use (absolute), or None when the cache is off."""
  path = path or os.environ.get(ENV) or DEFAULT
  if path.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(path))


def enable(path: Optional[str] = None, min_compile_time_s: float = 1.0) -> Optional[str]:
  """Points jax at the cache directory (call before the first compilation) -> the
  directory, or None when off. Only programs compiling longer than `min_compile_time_s`
  are written."""
  import jax
  if not path and jax.config.jax_compilation_cache_dir:
    d = jax.config.jax_compilation_cache_dir  # already chosen (JAX_COMPILATION_CACHE_DIR)
  else:
    d = cache_dir(path)
    if d is None:
      return None
    os.makedirs(d, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
  if jax.config.jax_compilation_cache_max_size == -1:  # unbounded = unlocked: bound it
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return d
