"""Resume guard (issue 12.4): a changed config is named and refused before anything is
built (it printed "resumed from ..." and failed after compiling, naming one parameter)."""
import pathlib
import sys

import numpy as np
import pytest

from centermask_jax.config import load_config
from centermask_jax.training import checkpointing, config_change, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "synthetic_tiny.py")


def _workdir_with_checkpoint(tmp_path, cfg):
  wd = str(tmp_path / "w")
  mgr = checkpointing.make_manager(wd, async_save=False)
  checkpointing.save(mgr, 3, {"step": np.int32(3)}, {"step": 3}, cfg, meta={})
  mgr.wait_until_finished()
  mgr.close()
  return wd


def test_changed_config_is_named_and_refused(tmp_path, monkeypatch):
  saved = load_config(CONFIG, {})
  wd = _workdir_with_checkpoint(tmp_path, saved)
  now = load_config(CONFIG, {"model.fpn_channels": saved.model.fpn_channels * 2,
                             "optim.optimizer": "adamw" if saved.optim.optimizer == "sgd"
                             else "sgd",
                             "train.global_batch": saved.train.global_batch * 2,
                             "train.log_every": 7, "optim.max_iter": 10 ** 6})
  monkeypatch.setattr(trainer, "_train", lambda *a, **k: pytest.fail("built before check"))
  with pytest.raises(config_change.ConfigChangeError) as e:
    trainer.train_and_evaluate(now, wd, num_steps=1, async_checkpoints=False, quiet=True)
  msg = str(e.value)
  for piece in (f"model: model.fpn_channels {saved.model.fpn_channels} -> "
                f"{saved.model.fpn_channels * 2}", "optimiser: optim.optimizer",
                "batch: train.global_batch", "allow_config_change=True"):
    assert piece in msg, msg
  assert "log_every" not in msg and "max_iter" not in msg  # free to change
  # allowed: the check passes and names the differences
  now.train.allow_config_change = True
  got = {k for _, k, _, _ in config_change.check(
      trainer.ckpt_workdir.read_latest_config(wd), now, wd)}
  assert got == {"model.fpn_channels", "optim.optimizer", "train.global_batch"}


def test_train_cli_config_change_is_one_error_line(tmp_path, capsys):
  sys.path.insert(0, str(REPO))
  import train as train_cli
  saved = load_config(CONFIG, {})
  wd = _workdir_with_checkpoint(tmp_path, saved)
  from centermask_jax import cli
  rc = cli.run(train_cli.main, ["--config", CONFIG, "--workdir", wd,
                       f"--config.model.fpn_channels={saved.model.fpn_channels * 2}"])
  err = capsys.readouterr().err
  assert rc == 2 and err.count("error:") == 1 and "model.fpn_channels" in err, err


class _FailingManager:
  """Stand-in orbax manager whose first asynchronous save fails in the background."""

  def __init__(self, fail_retry=False):
    self.saves, self.errors, self.fail_retry = [], [], fail_retry

  def save(self, step, args, force=True):
    self.saves.append(step)
    if len(self.saves) == 1 or self.fail_retry:
      self.errors.append(OSError(28, "No space left on device"))

  def check_for_errors(self):
    if self.errors:
      raise self.errors.pop(0)

  def wait_until_finished(self):
    pass

  def is_saving_in_progress(self):
    return False


def test_failed_async_save_is_reported_at_the_next_step_and_retried_once():
  """Issue 12.4: a failed background save is noticed at the next step (not the next save)
  and retried once; a second failure stops with one message naming the step."""
  said = []
  mgr = _FailingManager()
  saver = checkpointing.Saver(mgr, said.append)
  saver.save(5, {"step": np.int32(5)}, {"step": 5}, {})
  saver.poll(6)
  assert mgr.saves == [5, 5] and "checkpoint 5 failed to save" in said[0]
  assert "noticed at step 6" in said[0] and said[1] == "checkpoint 5 saved on retry"
  saver.poll(7)
  assert mgr.saves == [5, 5]
  bad = checkpointing.Saver(_FailingManager(fail_retry=True), said.append)
  bad.save(5, {"step": np.int32(5)}, {"step": 5}, {})
  with pytest.raises(checkpointing.CheckpointSaveError, match=r"checkpoint 5 .*retry at step 6"):
    bad.poll(6)
