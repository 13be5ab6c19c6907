"""CenterMask, ResNet-101 backbone, FPN 256, 3x schedule.

Train:  python train.py --config configs/centermask_R_101_FPN_ms_3x.py --workdir /tmp/centermask_R_101_FPN_ms_3x
Eval:   python eval.py --config configs/centermask_R_101_FPN_ms_3x.py --checkpoint PATH --workdir /tmp/centermask_R_101_FPN_ms_3x_eval
Reference: centermask2 reports no number for this config.
"""
from centermask_jax import config as base


def get_config():
  c = base.base_config()
  c.name = "centermask_R_101_FPN_ms_3x"
  base.resnet(c, 101)
  c.lock()
  return c
