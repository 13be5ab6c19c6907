"""What a run tells its user: console lines, WORKDIR/log.txt and WORKDIR/metrics.jsonl.

`RunLog(workdir)` sends every banner / message line to stdout (process 0) and appends it to
`log.txt`; `metrics(record)` appends one JSON object per line to `metrics.jsonl`;
`tee_stdout()` copies everything printed meanwhile (e.g. COCO tables) into `log.txt`.
`quiet_startup()` (called by every entry point before TensorFlow / JAX are imported)
filters TensorFlow's C++ and absl INFO lines.
"""
import contextlib
import datetime
import json
import logging
import os
import sys
from typing import Optional

LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"


def quiet_startup():
  """Call before TensorFlow is imported: TensorFlow's C++ INFO lines off, absl / TF / tfds
  Python loggers at WARNING (their warnings and ours still show). Explicit environment
  settings win.

  TF 2.21 logs its oneDNN notice ('oneDNN custom operations are on ...', preceded by
  'WARNING: All log messages before absl::InitializeLog() ...') through absl, which
  ignores TF_CPP_MIN_LOG_LEVEL; TF_ENABLE_ONEDNN_OPTS=0 removes it. TensorFlow only runs
  the tf.data input pipeline here (parsing, no TF math), so its numbers do not change.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  for name in ("absl", "tensorflow", "tensorflow_datasets", "jax._src.xla_bridge", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropConfigDumps) for f in absl_logger.filters):
    absl_logger.addFilter(_DropConfigDumps())
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:  # pragma: no cover - absl is a dependency
    pass


class _DropConfigDumps(logging.Filter):
  """tfds logs its whole builder config at WARNING on every build ('Using custom data
  configuration: CocoInstancesConfig(...)')."""

  def filter(self, record):
    return not str(record.msg).startswith("Using custom data configuration")


def format_seconds(s: float) -> str:
  """3725 -> '1h02m', 125 -> '2m05s', 7.2 -> '7.2s'."""
  if s < 60:
    return f"{s:.1f}s"
  m, sec = divmod(int(round(s)), 60)
  if m < 60:
    return f"{m}m{sec:02d}s"
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m"


class _Tee:
  def __init__(self, *streams):
    self.streams = streams

  def write(self, s):
    for st in self.streams:
      st.write(s)
    return len(s)

  def flush(self):
    for st in self.streams:
      st.flush()

  def isatty(self):
    return False


class RunLog:
  """Console + log.txt + metrics.jsonl of one run (only process 0 writes anything)."""

  def __init__(self, workdir: Optional[str], enabled: bool = True, echo: bool = True):
    self.enabled, self.echo = enabled, echo
    self._file = self._metrics = None
    if enabled and workdir:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(os.path.join(workdir, LOG_FILE), "a", buffering=1)
      self._metrics = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
      self._file.write(f"\n# run started {datetime.datetime.now().isoformat(timespec='seconds')}"
                       f" (pid {os.getpid()})\n")

  def say(self, msg: str, indent: str = "  "):
    """One line to stdout and log.txt."""
    if not self.enabled:
      return
    if self.echo:
      print(indent + msg, flush=True)
    if self._file:
      self._file.write(indent + msg + "\n")

  def banner(self, title: str):
    self.say(f"==== {title} " + "=" * max(0, 66 - len(title)), indent="")

  def to_file(self, text: str):
    """Text for log.txt only (e.g. the resolved config)."""
    if self.enabled and self._file:
      self._file.write(text.rstrip("\n") + "\n")

  def metrics(self, record: dict):
    if self.enabled and self._metrics:
      self._metrics.write(json.dumps(record, sort_keys=False) + "\n")

  @contextlib.contextmanager
  def tee_stdout(self):
    """Copies what is printed inside the block into log.txt as well."""
    if not (self.enabled and self._file):
      yield
      return
    old = sys.stdout
    sys.stdout = _Tee(old, self._file)
    try:
      yield
    finally:
      sys.stdout = old

  def close(self):
    for f in (self._file, self._metrics):
      if f:
        f.close()
    self._file = self._metrics = None
