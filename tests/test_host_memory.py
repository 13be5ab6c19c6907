"""parallel.release_host_memory: freed C-heap pages go back to the OS (what the trainer and
the train benchmarks call after compiling a step)."""
import ctypes
import ctypes.util
import platform

import pytest

from centermask_jax import parallel


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
  assert parallel.release_host_memory()
  released = held - _rss_kib()
  libc.free(blocks[-1])
  assert released > 150 * 1024, released  # KiB
