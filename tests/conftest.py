"""Test setup: 4 host CPU devices (set before JAX is imported anywhere)."""
import contextlib
import os
import pathlib
import threading

from centermask_jax.compilation_cache import MAX_BYTES  # imports nothing from jax

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Persistent compilation cache shared by one run's xdist workers and every subprocess they
# start (train.py, eval.py, workers): many tests compile the same programs. A fresh
# directory per run (made by the first process, which removes it at exit), so every run
# still compiles each program once; CENTERMASK_JAX_CACHE_DIR=DIR keeps one, "none" turns it
# off. Bounded, so jax locks the directory (compilation_cache.MAX_BYTES): unbounded, a worker
# could read an executable the other was still writing. Compile counts are unaffected
# (conftest.Compiles sees cache hits as compiles); tests that check the cache itself set
# their own directory.
if "CENTERMASK_JAX_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _run_cache = tempfile.mkdtemp(prefix="centermask-jax-tests-xla-")
  os.environ["CENTERMASK_JAX_CACHE_DIR"] = _run_cache  # inherited by workers, subprocesses
  atexit.register(shutil.rmtree, _run_cache, True)
_CACHE = os.environ["CENTERMASK_JAX_CACHE_DIR"]
if _CACHE.lower() not in ("none", "off"):
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_BYTES))

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
  (recorded for every backend compile request, persistent-cache hit or not). A program read
  from the persistent cache counts with the compile time stored beside it (whole seconds),
  so `longer_than` finds the expensive programs whether this process compiled or read them."""
  EVENT = "/jax/core/compile/backend_compile_duration"
  SAVED = "/jax/compilation_cache/compile_time_saved_sec"  # a hit, before EVENT
  RETRIEVAL = "/jax/compilation_cache/cache_retrieval_time_sec"
  names: list = []
  seconds: list = []  # the compile time of each (for a cache hit, the stored one)
  hits: list = []  # whether each was read from the persistent cache
  _pending = threading.local()  # this thread's hit: saved + retrieval = stored compile time

  @classmethod
  def _listener(cls, event, duration, **kw):
    p = cls._pending
    if event in (cls.SAVED, cls.RETRIEVAL):
      p.stored = getattr(p, "stored", 0.0) + float(duration)
      p.hit = True
    elif event == cls.EVENT:
      hit = getattr(p, "hit", False)
      cls.names.append(str(kw.get("fun_name", "")))
      cls.seconds.append(p.stored if hit else float(duration))
      cls.hits.append(hit)
      p.stored, p.hit = 0.0, False

  @classmethod
  def since(cls, mark: int) -> list:
    return cls.names[mark:]

  @classmethod
  def longer_than(cls, mark: int, seconds: float) -> list:
    """Names of the compilations since `mark` that took (or, read from the persistent
    cache, had taken) more than `seconds`."""
    return [n for n, s in zip(cls.names[mark:], cls.seconds[mark:]) if s > seconds]


jax.monitoring.register_event_duration_secs_listener(Compiles._listener)


@pytest.fixture
def compiles():
  """-> Compiles (use `mark = len(compiles.names)`, then `compiles.since(mark)`)."""
  return Compiles


# Seconds per test file in the README's test command on the CI machine (e7d0bde, 2 xdist
# workers; rounded, from --durations), longest first. Files not listed take well under a
# minute. Only the order in which files are handed to the workers depends on it.
FILE_SECONDS = {
    "test_train.py": 490, "test_model.py": 300, "test_distributed.py": 270,
    "test_parity.py": 220, "test_overfit.py": 205, "test_eval_cli.py": 200,
    "test_export.py": 120, "test_dcn_models.py": 110, "test_nonfinite.py": 95,
    "test_predictor.py": 90, "test_predictor_batch.py": 75, "test_run_ux.py": 70,
    "test_freeze.py": 40, "test_demo_video.py": 40,
}


def pytest_configure(config):
  """`-n 2 --dist loadfile`: hand the files out in FILE_SECONDS order (longest first, then
  collection order) instead of pytest-xdist's default (most tests first), which left the
  two longest files, with one test each, for the end, often queued on one worker."""
  if getattr(config.option, "dist", "no") == "loadfile" and hasattr(config.option,
                                                                     "loadscopereorder"):
    config.option.loadscopereorder = False


# Files of small programs only (each test well under 1.5 GB RSS in a fresh process): their
# tests neither wait for nor hold the gate below, so the other worker runs them while
# test_distributed's exclusive section runs instead of idling (about two minutes of them).
LIGHT_FILES = (
    "test_nms.py", "test_deform_conv.py", "test_masks.py", "test_roi_align.py",
    "test_polygon_raster.py", "test_padding.py", "test_cli_errors.py", "test_startup.py",
    "test_imagenet_init.py", "test_fcos_postprocess.py", "test_data_transforms_synthetic.py",
    "test_evaluation.py", "test_postprocess.py", "test_structure.py", "test_train_order.py",
    "test_classes.py", "test_cli.py", "test_visualize.py", "test_host_memory.py",
    "test_host_devices.py", "test_fg_slots.py", "test_xla_flags.py")
# Handed out before every other file, in this order: test_distributed's exclusive section
# (two training processes) runs while the other worker is fresh and takes the light files.
FIRST_FILES = ("test_distributed.py",) + LIGHT_FILES


def pytest_collection_modifyitems(session, config, items):
  order = {}
  for it in items:
    order.setdefault(it.path.name, len(order))
  first = {name: i for i, name in enumerate(FIRST_FILES)}
  items.sort(key=lambda it: (first.get(it.path.name, len(first)),
                             -FILE_SECONDS.get(it.path.name, 0), order[it.path.name]))


class _Gate:
  """Cross-worker gate of one pytest-xdist run (flock on two files in the temp dir): every
  test holds `main` shared; an exclusive section takes the `turnstile` (so that no worker
  starts another test) and then `main` exclusively (waiting for the running tests to end)."""

  def __init__(self, run_id: str):
    import tempfile
    base = os.path.join(tempfile.gettempdir(), f"centermask_tests_{run_id}")
    self.turnstile = os.open(base + ".turnstile", os.O_RDWR | os.O_CREAT, 0o600)
    self.main = os.open(base + ".main", os.O_RDWR | os.O_CREAT, 0o600)


_GATE = []


def _gate():
  """The run's gate, or None outside pytest-xdist (one process: nothing to wait for)."""
  run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if not run_id:
    return None
  if not _GATE:
    _GATE.append(_Gate(run_id))
  return _GATE[0]


@pytest.fixture(autouse=True)
def _yield_to_exclusive_sections(request):
  """Each test (but those of LIGHT_FILES) waits while another worker is inside
  `exclusive()`, first dropping its compiled programs (the section needs the memory), and
  holds the gate shared while it runs."""
  import fcntl
  gate = _gate()
  if gate is None or request.node.path.name in LIGHT_FILES:
    yield
    return
  try:
    fcntl.flock(gate.turnstile, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    _drop_programs()
    fcntl.flock(gate.turnstile, fcntl.LOCK_EX)
  fcntl.flock(gate.turnstile, fcntl.LOCK_UN)
  fcntl.flock(gate.main, fcntl.LOCK_SH)
  try:
    yield
  finally:
    fcntl.flock(gate.main, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive():
  """Within the block no other worker runs a test (it waits at its next one): for a test
  whose subprocesses need every core and most of the suite's memory budget."""
  import fcntl
  gate = _gate()
  if gate is None:
    yield
    return
  fcntl.flock(gate.turnstile, fcntl.LOCK_EX)
  try:
    fcntl.flock(gate.main, fcntl.LOCK_EX)  # converts this test's shared hold
    try:
      yield
    finally:
      fcntl.flock(gate.main, fcntl.LOCK_SH)
  finally:
    fcntl.flock(gate.turnstile, fcntl.LOCK_UN)


def _rss_kib() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _peak_kib() -> int:
  """VmHWM: this process's peak RSS since start or since the last `_reset_peak()`."""
  with open("/proc/self/status") as f:
    return int(next(l for l in f if l.startswith("VmHWM:")).split()[1])


def _reset_peak():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
  except OSError:
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With CENTERMASK_TEST_RSS_LOG=DIR: one line per test to DIR/rss.<pid>.tsv (nodeid, wall s,
  process CPU s, RSS after, peak RSS during the test (set-up and tear-down included), peak
  RSS of the largest finished subprocess so far; KiB; start time, Unix s; then the test's
  XLA compiles in this process: count, persistent-cache hits, seconds compiled, and the
  slowest as name:seconds, h for a hit), to find which tests set the suite's time and memory
  peaks and which programs compile in more than one place. Off by default."""
  log_dir = os.environ.get("CENTERMASK_TEST_RSS_LOG")
  if not log_dir:
    yield
    return
  import resource
  import time
  _reset_peak()
  start = time.time()
  mark = len(Compiles.names)
  t0, c0 = time.perf_counter(), time.process_time()
  yield
  kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  made = list(zip(Compiles.names[mark:], Compiles.seconds[mark:], Compiles.hits[mark:]))
  slow = sorted(made, key=lambda x: -x[1])[:4]
  with open(os.path.join(log_dir, f"rss.{os.getpid()}.tsv"), "a") as f:
    f.write(f"{item.nodeid}\t{time.perf_counter() - t0:.1f}\t{time.process_time() - c0:.1f}"
            f"\t{_rss_kib()}\t{_peak_kib()}\t{kids}\t{start:.1f}\t{len(made)}"
            f"\t{sum(h for *_, h in made)}\t{sum(t for _, t, h in made if not h):.1f}\t"
            + " ".join(f"{n}:{t:.0f}{'h' if h else ''}" for n, t, h in slow) + "\n")


def _drop_programs():
  from centermask_jax import parallel
  parallel.drop_compiled_programs()


@pytest.fixture(autouse=True)
def _drop_programs_after_last_use(request):
  """`@pytest.mark.drop_programs` on a test: its programs (and those of the tests before it
  in the file) are not used again, so they are dropped after it instead of at the end of the
  module; a file's held programs then stay those of one group of tests (suite memory)."""
  yield
  if request.node.get_closest_marker("drop_programs"):
    _drop_programs()


@pytest.fixture(autouse=True)
def _return_freed_heap():
  """After each test of a process above 1 GiB RSS: the C heap it freed goes back to the OS
  (`malloc_trim`, 0.1-0.3 s at 2-5 GiB; an XLA compile frees ~1 GiB that glibc otherwise
  keeps mapped), so the next test's peak adds to what the process holds, not to what it
  once held (test_train: 2.9 -> 2.0 GiB held after its first test)."""
  yield
  if _rss_kib() > 1 << 20:
    from centermask_jax import host_memory
    host_memory.release_host_memory()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """After each test module: drop jax's compiled executables and traces (kept for the
  whole process otherwise) and hand freed heap back to the OS, so the suite's memory stays
  that of its largest module rather than the sum of all of them."""
  yield
  _drop_programs()


@pytest.fixture(autouse=True, scope="session")
def _trainer_keeps_earlier_programs():
  """The trainer drops every compiled program before a process's first update step (what a
  process that trains once compiled before it ran once). A test process runs many trainers
  among other tests, whose files share programs between tests (dropped per module above and
  by `drop_programs`): here the trainer keeps them, as it does for a process's later runs.
  test_overfit checks the drop itself."""
  from centermask_jax.training import trainer
  trainer._STEP_COMPILED_IN_PROCESS = True
  yield
