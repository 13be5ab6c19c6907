"""What a training run tells its user, seen from outside: Ctrl-C (SIGINT in a subprocess)
writes a checkpoint of the current step, prints one line and exits promptly; without a
terminal the run prints a line per log step; log.txt, metrics.jsonl and config.json are in
the workdir."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# The real trainer loop, checkpointing and run log around a stand-in update step (sleeps
# 50 ms, counts the step): what is tested is the loop's behaviour, not the model, and the
# subprocess needs no model compilation.
DRIVER = """
import sys, time
import numpy as np
from test_train import FakeIterator, tiny_config
from centermask_jax.training import step as S, trainer

def make_train_step(model, config, tx, lr_fn, devices=None, fg_slots=None):
  def p_step(state, batch, rng):
    time.sleep(0.05)
    state = dict(state, step=state["step"] + 1)
    n = len(devices)
    metrics = {k: np.full((n,), 0.25, np.float32) for k in S.LOSS_KEYS}
    metrics.update(total_loss=np.full((n,), 1.25, np.float32), lr=np.full((n,), 1e-3))
    return state, metrics
  return p_step

S.make_train_step = make_train_step
trainer.init_variables = lambda model, config, rng: {
    "params": {"head": {"kernel": np.ones((3, 4), np.float32)}}, "frozen_bn": {}}
c = tiny_config()
c.optim.max_iter = 100000
c.train.checkpoint_every = 100000
c.train.eval_every = -1
r = trainer.train_and_evaluate(c, sys.argv[1], FakeIterator(4, 1))
sys.exit(130 if r["interrupted"] else 0)
"""


def _metrics(workdir):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_sigint_saves_the_current_step_prints_one_line_and_exits(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(workdir)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
      if len(_metrics(workdir)) >= 5:  # the first step (announced as compiling) + timed ones
        break
      time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    out, err = proc.communicate(timeout=120)
    waited = time.time() - t0
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, (out, err)
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
  last = out.strip().splitlines()[-1]
  assert last.startswith("  interrupted at step "), out
  step = int(last.split("interrupted at step ")[1].split(":")[0])
  assert f"checkpoint saved to {workdir / 'checkpoints'}/{step};" in last
  assert (workdir / "checkpoints" / str(step)).is_dir()
  records = _metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, step + 1))
  assert records[-1]["images_per_s"] > 0 and records[-1]["eta_s"] > 0
  assert records[0]["images_per_s"] is None  # the compile step is not timed
  # no terminal: a plain line per log step (log_every = 1), the compile announced + timed
  assert "compiling the train step for canvas 128x128 (1)..." in out
  assert "compiled and ran step 1 for canvas 128x128 in " in out
  assert "  step 2/100000: loss 1.2500 (fcos_cls 0.2500, " in out and " img/s, ETA " in out
  log = (workdir / "log.txt").read_text()
  assert "resolved config:" in log and "step 2/100000: loss" in log and last.strip() in log
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["optim"]["max_iter"] == 100000 and cfg["model"]["num_classes"] == 5
  print(f"SIGINT to exit: {waited:.1f} s (step {step})")
  assert waited < 30


def test_evaluation_tables_go_to_log_txt_headed_by_their_step(tmp_path, monkeypatch, capsys):
  """The trainer's evaluation hook (COCO evaluation itself stubbed: what is tested is where
  its output goes): the table printed by the evaluation is in log.txt under a line naming
  the step, and metrics.jsonl gets the summary."""
  from centermask_jax import runlog
  from centermask_jax.evaluation import evaluator as ev_lib
  from centermask_jax.training import trainer

  seen = {}

  def fake_run_evaluation(config, variables, workdir=None, title=None, **kw):
    seen.update(kw, workdir=workdir)
    print(title)
    print("|   AP   |  AP50  |\n| 12.500 | 30.000 |")
    return {"bbox": {"AP": 12.5, "AP50": 30.0, "AP-person": 1.0}, "segm": {"AP": 10.0}}

  monkeypatch.setattr(ev_lib, "run_evaluation", fake_run_evaluation)
  monkeypatch.setattr(ev_lib, "Evaluator", lambda config, devices=None: "evaluator")
  rl = runlog.RunLog(str(tmp_path))
  hook = trainer._EvalHook(None, str(tmp_path), [None], None, rl)
  hook.run(40, {"params": {}, "frozen_bn": {}})
  rl.close()
  log = (tmp_path / "log.txt").read_text()
  assert f"COCO evaluation of the step 40 weights ({tmp_path / 'eval' / 'step_40'}):\n" in log
  assert "| 12.500 | 30.000 |" in log.split("step 40 weights")[1]
  assert "| 12.500 | 30.000 |" in capsys.readouterr().out  # still printed
  rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert rec["step"] == 40 and rec["eval"] == {"bbox": {"AP": 12.5, "AP50": 30.0},
                                                "segm": {"AP": 10.0}}
  assert hook.results[40]["bbox"]["AP"] == 12.5 and seen["evaluator"] == "evaluator"


def test_resume_banner_restore_and_finished_run(tmp_path, monkeypatch):
  """Stand-in update step (as above; the real step's resume exactness is test_train's):
  a rerun restores the checkpoint through an abstract (eval_shape) template and says so in
  the init banner; metrics.jsonl continues; a finished workdir stops at once."""
  import numpy as np
  sys.path.insert(0, str(REPO / "tests"))
  from test_train import FakeIterator, tiny_config
  from centermask_jax.training import step as S, trainer

  import jax
  # one jitted program for the parameter update (eagerly, a compile per leaf shape)
  bump = jax.jit(lambda params: jax.tree_util.tree_map(lambda p: p + 1.0, params))

  def make_train_step(model, config, tx, lr_fn, devices=None, fg_slots=None):
    def p_step(state, batch, rng):
      state = dict(state, step=state["step"] + 1, params=bump(state["params"]))
      n = len(devices)
      m = {k: np.full((n,), 0.25, np.float32) for k in S.LOSS_KEYS}
      m.update(total_loss=np.full((n,), 1.25, np.float32), lr=np.full((n,), 1e-3))
      return state, m
    return p_step

  monkeypatch.setattr(S, "make_train_step", make_train_step)
  c = tiny_config()
  c.optim.max_iter = 5
  c.train.eval_every = -1
  work = str(tmp_path / "w")
  first = trainer.train_and_evaluate(c, work, FakeIterator(4, 1), num_steps=3,
                                     async_checkpoints=False, quiet=True)
  assert first["step"] == 3
  again = trainer.train_and_evaluate(c, work, FakeIterator(4, 1), async_checkpoints=False,
                                     quiet=True)
  assert again["step"] == 5 and not again["interrupted"]
  for a, b in zip(jax.tree_util.tree_leaves(first["state"]["params"]),
                  jax.tree_util.tree_leaves(again["state"]["params"])):
    np.testing.assert_array_equal(b, a + 2.0)  # restored values, then 2 more steps
  log = (tmp_path / "w" / "log.txt").read_text()
  assert "init: from scratch" in log and "init: resuming from step 3 of " in log
  assert "restored " in log and "(data position {'step': 3})" in log
  steps = [json.loads(l)["step"] for l in (tmp_path / "w" / "metrics.jsonl").read_text()
           .splitlines()]
  assert steps == [1, 2, 3, 4, 5]
  t0 = time.perf_counter()
  done = trainer.train_and_evaluate(c, work, FakeIterator(4, 1), quiet=True)
  assert done["step"] == 5 and done["state"] is None and time.perf_counter() - t0 < 5
  assert "already at step 5 (optim.max_iter = 5), nothing to do" in (
      tmp_path / "w" / "log.txt").read_text()
