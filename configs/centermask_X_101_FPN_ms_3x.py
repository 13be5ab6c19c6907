"""CenterMask, ResNeXt-101-32x8d backbone (stride in 3x3, pixel std != 1), FPN 256, 3x schedule.

Train:  python train.py --config configs/centermask_X_101_FPN_ms_3x.py --workdir /tmp/centermask_X_101_FPN_ms_3x
Eval:   python eval.py --config configs/centermask_X_101_FPN_ms_3x.py --checkpoint PATH --workdir /tmp/centermask_X_101_FPN_ms_3x_eval
Reference: centermask2 reports no number for this config.
"""
from centermask_jax import config as base


def get_config():
  c = base.base_config()
  c.name = "centermask_X_101_FPN_ms_3x"
  base.resnet(c, 101, num_groups=32, width_per_group=8, stride_in_1x1=False)
  c.input.pixel_std = (57.375, 57.120, 58.395)
  c.lock()
  return c
