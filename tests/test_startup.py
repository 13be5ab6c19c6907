"""Start-up as a new user sees it (issue 15.9, issue 12.5): no TensorFlow / oneDNN / absl
notices, no tfds "Downloading ... Unknown size" for a local build, `prepare --help` without
TensorFlow, our own and TensorFlow's warnings still shown, and prepare's user errors as one
`error: ...` line (exit 2) through `cli.run`. Subprocesses run without the test suite's
logging environment (TF_CPP_MIN_LOG_LEVEL, TF_ENABLE_ONEDNN_OPTS), as a user's shell."""
import json
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
NOISE = ("oneDNN", "absl::InitializeLog", "Downloading and preparing", "Unknown size",
         "downloaded and prepared", "CocoInstancesConfig", "cpu_feature_guard",
         "port.cc", "Traceback")


def _env():
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(args, **kw):
  return subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True,
                        timeout=300, cwd=str(REPO), **kw)


def test_prepare_help_does_not_import_tensorflow():
  code = ("import runpy, sys\nsys.argv = ['prepare', '--help']\ntry:\n"
          "  runpy.run_module('centermask_jax.data.prepare', run_name='__main__')\n"
          "except SystemExit:\n  pass\nprint('tensorflow loaded:', 'tensorflow' in sys.modules)")
  r = _run(["-c", code])
  assert "--data-dir" in r.stdout and "tensorflow loaded: False" in r.stdout, r.stdout + r.stderr


def test_prepare_is_quiet_and_reports_user_errors_in_one_line(tmp_path):
  r = _run(["-m", "centermask_jax.data.prepare", "--synthetic", "--num-train", "4",
            "--num-val", "2", "--data-dir", str(tmp_path / "data")])
  out = r.stdout + r.stderr
  assert r.returncode == 0, out
  assert re.search(r"split=train images=4 ", r.stdout) and "report:" in r.stdout, out
  assert not [n for n in NOISE if n in out], out
  # a user error: one line on stderr, exit 2, no traceback
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([1, 2]))
  r = _run(["-m", "centermask_jax.data.prepare", "--name", "x", "--val-json", str(bad),
            "--val-images", str(tmp_path), "--data-dir", str(tmp_path / "out")])
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert "top level is a list" in lines[0] and not (tmp_path / "out").exists()
  r = _run(["-m", "centermask_jax.data.prepare", "--name", "bad/name", "--val-json",
            str(bad), "--val-images", str(tmp_path), "--data-dir", str(tmp_path / "out")])
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "'bad/name'" in lines[0], r.stderr


def test_quiet_startup_keeps_warnings_and_silences_tensorflow_notices():
  code = """
import logging, warnings
from centermask_jax import runlog
runlog.quiet_startup()
import tensorflow as tf
print(int(tf.data.Dataset.range(4).map(lambda x: x * 2).reduce(tf.constant(0, tf.int64),
                                                              lambda a, b: a + b)))
logging.getLogger("centermask_jax.data.pipeline").warning("our warning")
tf.get_logger().warning("tensorflow warning")
warnings.warn("python warning")
"""
  r = _run(["-c", code])
  assert r.returncode == 0 and r.stdout.strip() == "12", r.stdout + r.stderr
  for kept in ("our warning", "tensorflow warning", "python warning"):
    assert kept in r.stderr, r.stderr
  assert not [n for n in NOISE if n in r.stderr], r.stderr


def test_every_entry_point_quiets_start_up():
  """Every script / module with a __main__ block calls runlog.quiet_startup()."""
  files = [*REPO.glob("*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("centermask_jax/**/*.py")]
  mains = [f for f in files if 'if __name__ == "__main__":' in f.read_text()]
  assert len(mains) >= 15
  missing = [str(f.relative_to(REPO)) for f in mains if "runlog.quiet_startup()" not in f.read_text()]
  assert not missing, missing
