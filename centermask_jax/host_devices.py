"""How many host CPU devices a process gets: the one home of XLA's
`--xla_force_host_platform_device_count`. Imports nothing from JAX.

XLA:CPU runs most fusions of a program (elementwise ops, reductions, transposes) on one
thread; only convolutions and dots use the intra-op pool. Every host CPU device runs its
program on a thread of its own, so a pmapped step over one CPU device per core keeps all
cores busy (data parallelism inside one process, same losses as one device: the step
normalises across devices).

`configure()` is called first thing by the entry points (train.py, eval.py, benchmark
children; with auto=ENTRY_POINT_AUTO), before JAX's CPU backend starts (the flag is read
then). Precedence:
1. a `count` argument (a benchmark's explicit choice) replaces any flag in XLA_FLAGS;
2. the flag already in XLA_FLAGS (the user's) is kept;
3. CENTERMASK_JAX_HOST_DEVICES: an integer >= 1 (1 = off: one host device) or `auto`;
4. auto: one device per usable core (`os.sched_getaffinity`) when the platform may be
   CPU (JAX_PLATFORMS unset or naming cpu); else nothing is set.
On a GPU/TPU host the flag only adds host devices: `jax.local_devices()` is still the
accelerator's. `device_count_for_batch` is the rule that fits a global batch to them.
"""
import os
import re
import sys
from typing import MutableMapping, Optional

from centermask_jax.errors import UserError

FLAG = "--xla_force_host_platform_device_count"
ENV = "CENTERMASK_JAX_HOST_DEVICES"
# Whether the entry points apply rule 4 by default. Off: on the shared 2-core CPU the 2-device
# train step (Lite, batch 2 = 1 + 1) was not a clear win under load 5-9 (docs/PERFORMANCE.md,
# host CPU devices); CENTERMASK_JAX_HOST_DEVICES=auto (or N) opts in. Flip after a
# quiet-machine measurement.
ENTRY_POINT_AUTO = False
_FLAG_RE = re.compile(re.escape(FLAG) + r"=(\S*)")


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask; os.cpu_count() where none)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except (AttributeError, OSError):
    return max(1, os.cpu_count() or 1)


def flag_value(xla_flags: str) -> Optional[int]:
  """The host device count set in an XLA_FLAGS string (its last occurrence), or None."""
  found = _FLAG_RE.findall(xla_flags or "")
  if not found:
    return None
  try:
    return int(found[-1])
  except ValueError:
    raise UserError(f"XLA_FLAGS: {FLAG}={found[-1]!r} is not an integer") from None


def _with_flag(xla_flags: str, n: int) -> str:
  rest = _FLAG_RE.sub("", xla_flags or "").split()
  return " ".join(rest + [f"{FLAG}={n}"])


def _cpu_possible(environ) -> bool:
  platforms = environ.get("JAX_PLATFORMS", environ.get("JAX_PLATFORM_NAME", ""))
  names = [p.strip().lower() for p in platforms.split(",") if p.strip()]
  return not names or "cpu" in names


def configure(count: Optional[int] = None, auto: bool = True,
              environ: Optional[MutableMapping[str, str]] = None,
              cores: Optional[int] = None) -> int:
  """Sets the host CPU device count in environ["XLA_FLAGS"] (default os.environ) by the
  precedence above; returns the count the CPU backend will have (1 when nothing is set).
  auto=False skips rule 4 (multi-process runs: several processes may share one host's
  cores). cores: the usable cores (default `usable_cores()`; for tests). Raises
  errors.UserError for a bad CENTERMASK_JAX_HOST_DEVICES, flag value or `count`. Must run
  before JAX's backend starts: after that it changes nothing and returns the flag's value
  as set."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if environ is os.environ and backend_started():
    return flag_value(flags) or 1
  if count is not None:
    if int(count) < 1:
      raise UserError(f"host device count must be >= 1, got {count}")
    environ["XLA_FLAGS"] = _with_flag(flags, int(count))
    return int(count)
  user = flag_value(flags)
  if user is not None:
    return user
  setting = environ.get(ENV, "").strip().lower()
  if setting and setting != "auto":
    try:
      n = int(setting)
    except ValueError:
      n = 0
    if n < 1:
      raise UserError(f"{ENV}={environ.get(ENV)!r}: expected an integer >= 1 or 'auto'")
  elif setting == "auto" or (auto and _cpu_possible(environ)):
    n = cores if cores is not None else usable_cores()
  else:
    return 1
  if n > 1:
    environ["XLA_FLAGS"] = _with_flag(flags, n)
  return n


def device_count_for_batch(global_batch: int, available: int, processes: int = 1) -> int:
  """Largest d <= available such that global_batch splits evenly over d devices in each
  of `processes` processes (global_batch % (d * processes) == 0); 0 when none does."""
  for d in range(min(int(available), int(global_batch)), 0, -1):
    if global_batch % (d * processes) == 0:
      return d
  return 0


def backend_started() -> bool:
  """Whether JAX's backends are already up in this process (the flag then has no effect)."""
  xb = sys.modules.get("jax._src.xla_bridge")
  return bool(xb and getattr(xb, "backends_are_initialized", lambda: False)())
