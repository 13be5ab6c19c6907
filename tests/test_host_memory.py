"""host_memory.release_host_memory: freed C-heap pages go back to the OS (what the trainer and
the train benchmarks call after compiling a step)."""
import ctypes
import ctypes.util
import os
import platform

import pytest

from centermask_jax import host_memory


def _rss_kib():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1])
  raise RuntimeError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_release_host_memory_returns_freed_heap_pages():
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
  # 192 MiB in 4 KiB blocks (below the mmap threshold: on the heap, as the compiler's are)
  blocks = [libc.malloc(4096) for _ in range(48 * 1024)]
  for b in blocks:
    libc.memset(b, 1, 4096)
  for b in blocks[:-1]:  # the last one pins the heap top: plain free() cannot shrink it
    libc.free(b)
  held = _rss_kib()
  assert host_memory.release_host_memory()
  released = held - _rss_kib()
  libc.free(blocks[-1])
  assert released > 150 * 1024, released  # KiB


def test_release_after_compile_releases_once_per_new_key(monkeypatch):
  calls = []
  monkeypatch.setattr(host_memory, "release_host_memory", lambda: calls.append(1) or True)
  compiled = set()
  for key in ["a", "a", ("b", 2), "a", ("b", 2)]:
    host_memory.release_after_compile(compiled, key)
  assert compiled == {"a", ("b", 2)} and len(calls) == 2


def test_hugepage_environ_rules():
  """The tunable is added only where it changes something, after the user's tunables, and
  never twice."""
  env = {"PATH": "/bin"}
  got = host_memory.hugepage_environ(env, glibc=(2, 36), thp="madvise")
  assert got == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert env == {"PATH": "/bin"}  # not modified in place
  got = host_memory.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                     glibc=(2, 35), thp="madvise")
  assert got["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  for kwargs in [dict(glibc=(2, 34), thp="madvise"), dict(glibc=None, thp="madvise"),
                 dict(glibc=(2, 36), thp="always"), dict(glibc=(2, 36), thp="never"),
                 dict(glibc=(2, 36), thp=None)]:
    assert host_memory.hugepage_environ(env, **kwargs) is None, kwargs
  assert host_memory.hugepage_environ({host_memory.ENV: "0"}, glibc=(2, 36),
                                      thp="madvise") is None
  assert host_memory.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                                      glibc=(2, 36), thp="madvise") is None  # the user's
  assert host_memory.child_environ({"A": "1"}) in (
      {"A": "1"}, {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(f)) == "madvise"
  assert host_memory.thp_mode(str(tmp_path / "absent")) is None


_FAULTS_CHILD = r"""
import ctypes, ctypes.util, os, resource, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 256 << 20  # one block far above the mmap threshold, as XLA's temporaries
p = libc.malloc(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.memset(p, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
      os.environ.get("GLIBC_TUNABLES", ""), " ".join(sys.argv[1:]))
"""


@pytest.mark.skipif(host_memory.hugepage_environ({}) is None,  # this machine
                    reason="glibc >= 2.35 with transparent huge pages in madvise mode only")
def test_reexec_gives_xla_sized_blocks_huge_pages(tmp_path):
  """A process that re-executes itself (as train.py does) keeps its arguments, has the
  tunable, and touching a 256 MiB malloc block costs ~128 faults (2 MiB pages) instead of
  65536 (4 KiB pages, measured in the same child without it)."""
  import subprocess
  import sys
  script = tmp_path / "child.py"
  script.write_text("from centermask_jax import host_memory\n"
                    "host_memory.reexec_with_hugepage_malloc()\n" + _FAULTS_CHILD)
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  runs = {}
  for flag in ("1", "0"):
    out = subprocess.run([sys.executable, str(script), "a b", "--x=1"], capture_output=True,
                         text=True, env=dict(env, **{host_memory.ENV: flag}), check=True)
    faults, *rest = out.stdout.split(maxsplit=1)
    runs[flag] = int(faults), rest[0] if rest else ""
  assert runs["1"][1].split() == ["glibc.malloc.hugetlb=1", "a", "b", "--x=1"]
  assert runs["0"][1].split() == ["a", "b", "--x=1"]
  assert runs["0"][0] >= 60000, runs  # 4 KiB pages
  assert runs["1"][0] <= 8000, runs  # mostly 2 MiB pages
