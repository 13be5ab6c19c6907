"""Test setup: 4 host CPU devices (set before JAX is imported anywhere)."""
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Persistent compilation cache: off unless CENTERMASK_JAX_CACHE_DIR names a directory. A
# full-suite run with it on aborted (SIGABRT) reading back an executable in
# test_shard_map_step_equals_pmap_step (jax 0.10.2, XLA:CPU, 4 host devices), and CI
# starts from an empty cache anyway; tests that check the cache set it up themselves.
_CACHE = os.environ.setdefault("CENTERMASK_JAX_CACHE_DIR", "none")  # subprocesses too
if _CACHE.lower() not in ("none", "off"):
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
LITE_FIXTURE = FIXTURES / "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x"
TINY_COCO = SHARED / "data" / "tiny_coco"
STATE_DICT_KEYS = FIXTURES / "state_dict_keys"


def require(path: pathlib.Path):
  """Skips the calling test when a ../shared resource is absent."""
  if not path.exists():
    pytest.skip(f"{path} not available")
  return path


@pytest.fixture(scope="session")
def lite_fixture():
  return require(LITE_FIXTURE)


@pytest.fixture(scope="session")
def tiny_coco():
  return require(TINY_COCO)


class Compiles:
  """XLA compilations of this process by function name, from jax's own monitoring event
  (recorded for every backend compile request, persistent-cache hit or not)."""
  EVENT = "/jax/core/compile/backend_compile_duration"
  names: list = []

  @classmethod
  def _listener(cls, event, duration, **kw):
    if event == cls.EVENT:
      cls.names.append(str(kw.get("fun_name", "")))

  @classmethod
  def since(cls, mark: int) -> list:
    return cls.names[mark:]


jax.monitoring.register_event_duration_secs_listener(Compiles._listener)


@pytest.fixture
def compiles():
  """-> Compiles (use `mark = len(compiles.names)`, then `compiles.since(mark)`)."""
  return Compiles


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """After each test module: drop jax's compiled executables and traces (kept for the
  whole process otherwise) and hand freed heap back to the OS, so the suite's memory stays
  that of its largest module rather than the sum of all of them."""
  yield
  import gc
  from centermask_jax import parallel
  jax.clear_caches()
  gc.collect()
  parallel.release_host_memory()
