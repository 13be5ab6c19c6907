"""CenterMask-Lite with a ResNet-50 backbone (the paper's Lite R-50 row; centermask2 has no config for it: Lite settings, R-50, FREEZE_AT 2).

Train:  python train.py --config configs/centermask_lite_R_50_FPN_ms_4x.py --workdir /tmp/centermask_lite_R_50_FPN_ms_4x
Eval:   python eval.py --config configs/centermask_lite_R_50_FPN_ms_4x.py --checkpoint PATH --workdir /tmp/centermask_lite_R_50_FPN_ms_4x_eval
Reference: the CenterMask paper reports its Lite R-50 row (maskrcnn-benchmark implementation); no centermask2 number exists.
"""
from centermask_jax import config as base


def get_config():
  c = base.base_config()
  c.name = "centermask_lite_R_50_FPN_ms_4x"
  base.lite(c)
  base.resnet(c, 50)
  c.lock()
  return c
