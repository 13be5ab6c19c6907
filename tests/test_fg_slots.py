"""Foreground slot buckets picked on the host (training.step.FgSlotPicker): the mask branch
runs on the smallest bucket holding the recent foreground count; a step whose count
overflows its bucket leaves the state unchanged and runs again on more slots."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from centermask_jax.models.centermask import CenterMask
from centermask_jax.training import optimizer as O
from centermask_jax.training import step as S
from centermask_jax.training import trainer
from test_train import FakeIterator, make_batch, tiny_config


def test_picker_policy_and_state():
  p = S.FgSlotPicker((16, 32, 64, 118), window=3)
  assert p.pick() == 118  # no count seen yet: all slots
  assert p.observe(118, 20) is None and p.pick() == 32
  assert p.observe(32, 40) == 64 and p.reruns == 1  # overflow: not recorded, run again
  assert p.pick() == 32
  assert p.observe(64, 40) is None and p.pick() == 64
  assert p.observe(64, 3) is None and p.observe(64, 5) is None
  assert p.pick() == 64  # 40 still in the window of 3
  assert p.observe(16, 9) is None and p.pick() == 16  # the window moved past 40
  assert p.bucket(500) == 118 and p.bucket(0) == 16
  q = S.FgSlotPicker((16, 32, 64, 118), window=3)
  rest = q.set_state({"step": 7, **p.state()})
  assert rest == {"step": 7} and q.recent == p.recent and q.pick() == p.pick()


def test_fg_slot_mode_and_buckets():
  c = tiny_config()
  assert S.fg_slot_mode(c) == "host"  # "auto" on CPU
  c.train.fg_slot_buckets = "off"
  assert S.fg_slot_mode(c) == "off"
  c.train.fg_slot_buckets = "switch"
  with pytest.raises(ValueError, match="fg_slot_buckets"):
    S.fg_slot_mode(c)
  c.model.roi.max_fg_per_image = 128
  c.model.fcos.post_nms_topk_train = 100
  c.data.max_instances = 18
  assert S.fg_buckets(c) == (16, 32, 64, 118)  # vs_reference's Lite train_b2
  c.model.roi.max_fg_per_image = 32
  assert S.fg_buckets(c) == (16, 32)


def test_trainer_reruns_an_overflowing_step_and_checkpoints_the_history(tmp_path,
                                                                        monkeypatch):
  """Trainer with buckets (1, 20) and a picker forced to try 1 slot first: every step
  overflows it, leaves params, optimiser state and step counter as they were, and runs
  again on 20 slots; each applied count fits its slots and the checkpoint keeps the
  picker's history for a resume."""
  monkeypatch.setattr(S, "FG_BUCKETS", (1,))
  monkeypatch.setattr(S.FgSlotPicker, "pick", lambda self: self.buckets[0])
  real = S.make_train_step
  calls = []  # (slots, state before (host copy of two leaves), state after, metrics)

  def recording(model, config, tx, lr_fn, devices=None, fg_slots=None):
    step = real(model, config, tx, lr_fn, devices=devices, fg_slots=fg_slots)

    def run(state, batch, rng):  # no .lower(): the trainer calls it (pmap compiles)
      leaves = lambda s: [np.asarray(s["step"])] + [np.asarray(x) for x in (  # noqa: E731
          jax.tree_util.tree_leaves(s["params"])[0], jax.tree_util.tree_leaves(
              s["opt_state"])[0])]
      before = leaves(state)  # copied now: the step donates its input state
      new, m = step(state, batch, rng)
      calls.append((fg_slots, before, leaves(new), jax.device_get(m)))
      return new, m
    return run
  monkeypatch.setattr(S, "make_train_step", recording)
  c = tiny_config()
  c.optim.max_iter = 2
  c.train.eval_every = -1
  assert S.fg_buckets(c) == (1, 20)
  work = str(tmp_path / "w")
  out = trainer.train_and_evaluate(c, work, FakeIterator(4, 1), async_checkpoints=False,
                                   quiet=True)
  assert out["step"] == 2 and int(np.asarray(out["state"]["step"])) == 2
  assert [k for k, *_ in calls] == [1, 20, 1, 20]
  for k, before, after, m in calls:
    fg_max = float(np.max(m["fg_max"]))
    if k == 1:  # overflowed: nothing applied
      assert fg_max > 1 and float(np.max(m["fg_overflow"])) == 1
      for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    else:
      assert fg_max <= 20 and np.all(after[0] == before[0] + 1)
      assert not np.array_equal(after[1], before[1])
  log = open(os.path.join(work, "log.txt")).read()
  assert log.count("run again on 20") == 2
  rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
  assert rows[-1]["fg_reruns_total"] == 2
  applied = [int(np.max(m["fg_max"])) for k, _, _, m in calls if k == 20]
  assert [int(r["fg_max"]) for r in rows] == applied
  data = json.load(open(os.path.join(work, "checkpoints", "2", "data", "metadata")))
  assert data["fg_recent"] == applied
