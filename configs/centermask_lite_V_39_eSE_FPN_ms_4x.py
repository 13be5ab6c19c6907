"""CenterMask-Lite, VoVNetV2-39 backbone, FPN 128, 4x schedule.

Train:  python train.py --config configs/centermask_lite_V_39_eSE_FPN_ms_4x.py --workdir /tmp/centermask_lite_V_39_eSE_FPN_ms_4x
Eval:   python eval.py --config configs/centermask_lite_V_39_eSE_FPN_ms_4x.py --checkpoint PATH --workdir /tmp/centermask_lite_V_39_eSE_FPN_ms_4x_eval
Reference (centermask2 README, COCO val2017): mask AP 36.7, box AP 40.9.
"""
from centermask_jax import config as base


def get_config():
  c = base.base_config()
  c.name = "centermask_lite_V_39_eSE_FPN_ms_4x"
  base.lite(c)
  base.vovnet(c, "V-39-eSE")
  c.lock()
  return c
