"""Foreground slot buckets picked on the host (training.step.FgSlotPicker): the mask branch
runs on the smallest bucket holding the recent foreground count; a step whose count
overflows its bucket leaves the state unchanged and runs again on more slots (that trainer
run is test_train's, where it shares the compiled update step)."""
import pytest

from centermask_jax.training import step as S
from test_train import tiny_config


def test_picker_policy_and_state():
  p = S.FgSlotPicker((16, 32, 64, 118), window=3)
  assert p.pick() == 118  # no count seen yet and no count program: all slots
  assert p.pick(lambda: 20) == 32  # no count seen yet: the bucket of the batch's own count
  assert p.observe(118, 20) is None and p.pick() == 32
  assert p.observe(32, 40) == 64 and p.reruns == 1  # overflow: not recorded, run again
  assert p.pick() == 32
  assert p.observe(64, 40) is None and p.pick() == 64
  assert p.observe(64, 3) is None and p.observe(64, 5) is None
  assert p.pick() == 64  # 40 still in the window of 3
  assert p.pick(lambda: 1 / 0) == 64  # counts seen: the count program is not run
  assert p.observe(16, 9) is None and p.pick() == 16  # the window moved past 40
  assert p.bucket(500) == 118 and p.bucket(0) == 16
  assert p.step_slots(118) is None and p.step_slots(32) == 32  # the largest: plain step
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
