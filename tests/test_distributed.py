"""Multi-process training: 2 jax.distributed processes on localhost (gloo CPU collectives)."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from centermask_jax.training import trainer
from conftest import TINY_COCO, exclusive
from test_train import FakeIterator, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_end_with_identical_params(tmp_path):
  """2 processes x 2 devices, 2 steps: both end with bit-identical params, equal to one
  process training on 4 devices with the same global batches (the same program as
  test_train's resume test: one of the two reads it from the run's cache). With tiny_coco
  present, the evaluation hook then runs at max_iter on 4 real images sharded over both
  processes."""
  data_args = []
  if TINY_COCO.exists():
    from test_overfit import prepare_four
    data_args = [prepare_four(TINY_COCO, tmp_path)[0]]
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["MALLOC_ARENA_MAX"] = "2"  # compile threads' freed heap reused, not kept per thread
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  log_files = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]  # files: no pipe stalls
  with exclusive():  # two training processes: every core and ~4 GB, alone
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), str(port),
                               str(i), "2", str(tmp_path / "run"), str(tmp_path / f"p{i}.npz"),
                               *data_args],
                              env=env, stdout=log_files[i], stderr=subprocess.STDOUT)
             for i in range(2)]
    for p in procs:
      try:
        p.wait(timeout=420)
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        raise
  for f in log_files:
    f.close()
  logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert "process 0/2, 2 local devices" in logs[0] and "4 total" in logs[0]
  r0, r1 = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "p1.npz")
  assert int(r0["step"]) == int(r1["step"]) == 2
  meta = ("step", "loss", "evaluated")
  keys = [k for k in r0.files if k not in meta]
  assert len(keys) > 50 and set(keys) == set(r1.files) - set(meta)
  for k in keys:
    np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
  assert float(r0["loss"]) == float(r1["loss"])
  if data_args:
    assert list(r0["evaluated"]) == list(r1["evaluated"]) == [2]
    assert "FAILED" not in logs[0] + logs[1], logs[0][-3000:]
    import json
    with open(tmp_path / "run" / "eval" / "step_2" / "metrics.json") as f:
      metrics = json.load(f)
    assert set(metrics) == {"bbox", "segm"}

  # Same global batches on one process with 4 local devices (initialised as the workers).
  c = tiny_config()
  assert c.train.global_batch == 4 == len(jax.local_devices())
  ref = trainer.train_and_evaluate(c, str(tmp_path / "single"), FakeIterator(4, 1), num_steps=2,
                                   async_checkpoints=False, quiet=True)
  from flax import traverse_util
  flat = traverse_util.flatten_dict(ref["state"]["params"], sep="/")
  scale = max(float(np.abs(np.asarray(v)).max()) for v in flat.values())
  for k in keys:
    np.testing.assert_allclose(r0[k], np.asarray(flat[k]), rtol=1e-5, atol=1e-6 * scale,
                               err_msg=k)
