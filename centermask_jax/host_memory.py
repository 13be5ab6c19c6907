"""The C heap under XLA:CPU: the one home of the process's allocator settings. Imports
nothing from JAX.

XLA:CPU allocates a program's temporaries (the train step's: 1-4 GiB) with malloc at every
run and frees them after it. glibc serves blocks that large with fresh mmaps, so every step
touches ~300k new 4 KiB pages: page faults and kernel zeroing (Lite V-19-slim-DW train step,
batch 2: ~335k minor faults and ~1 s of system CPU time per step). With glibc's
`glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) malloc asks for transparent huge pages
(madvise) on those mmaps: 2 MiB pages, 512x fewer faults. The tunable is read when the
process starts, so an entry point re-executes itself with it (`reexec_with_hugepage_malloc`)
and the benchmarks pass it to their children (`child_environ`). It applies only where it
changes something: Linux with glibc >= 2.35 and transparent huge pages in `madvise` mode (in
`always` mode they are used already; in `never` mode not at all).
CENTERMASK_JAX_HUGEPAGE_MALLOC=0 turns it off. No computation changes: only where pages
come from.
"""
import os
import platform
import sys
from typing import Dict, Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
ENV = "CENTERMASK_JAX_HUGEPAGE_MALLOC"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
  """The kernel's transparent huge page mode (`always`, `madvise`, `never`), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple]:
  """(major, minor) of the running glibc, or None (another C library, or not Linux)."""
  name, version = platform.libc_ver()
  if name != "glibc":
    return None
  try:
    return tuple(int(p) for p in version.split(".")[:2])
  except ValueError:
    return None


_DETECT = object()


def hugepage_environ(environ: Optional[Mapping[str, str]] = None, glibc=_DETECT,
                     thp=_DETECT) -> Optional[Dict[str, str]]:
  """environ (default os.environ) with `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES,
  or None where it would change nothing: not Linux, glibc older than 2.35 or absent, huge
  pages not in `madvise` mode, CENTERMASK_JAX_HUGEPAGE_MALLOC=0, or the tunable already
  set (by the user or a parent). glibc ((major, minor) or None) / thp (a mode or None):
  for tests (default: this machine's)."""
  environ = dict(os.environ if environ is None else environ)
  if environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
    return None
  glibc = glibc_version() if glibc is _DETECT else glibc
  thp = thp_mode() if thp is _DETECT else thp
  if glibc is None or glibc < (2, 35) or thp != "madvise":
    return None
  tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  if any(t.split("=")[0] == TUNABLE for t in tunables):
    return None
  environ["GLIBC_TUNABLES"] = ":".join(tunables + [TUNABLE + "=1"])
  return environ


def child_environ(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
  """The environment for a child process that runs XLA: `hugepage_environ(environ)` where
  it applies, else a copy of environ (default os.environ)."""
  env = hugepage_environ(environ)
  return env if env is not None else dict(os.environ if environ is None else environ)


def reexec_with_hugepage_malloc() -> None:
  """For an entry point's `__main__`, before any work: re-executes this Python process
  (same interpreter, options and arguments: `sys.orig_argv`) with `hugepage_environ()`,
  when that applies; else returns. The new process finds the tunable set and goes on."""
  env = hugepage_environ()
  argv = getattr(sys, "orig_argv", None)
  if env is None or not argv:
    return
  try:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + list(argv[1:]), env)
  except OSError:
    return  # e.g. a frozen or embedded interpreter: run on as is


def release_host_memory() -> bool:
  """Returns the C heap's free pages to the OS (glibc `malloc_trim(0)`; False where there
  is none). XLA compilation frees about 1 GiB of host memory that glibc keeps mapped (Lite
  train step on CPU: RSS 2.2 -> 1.2 GiB after compiling, step peak 5.8 -> 4.8 GiB); call
  it after a compile. Changes no computation."""
  import ctypes
  import ctypes.util
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.malloc_trim(0))
  except (OSError, AttributeError):
    return False


def release_after_compile(compiled: set, key) -> None:
  """After a call that compiles the program for `key` the first time it sees it (a jitted
  function on a new shape): then, and only then, `key` joins `compiled` and the heap the
  compile freed goes back to the OS (`release_host_memory`)."""
  if key not in compiled:
    compiled.add(key)
    release_host_memory()
