"""CenterMask, VoVNetV2-39 backbone, FPN 256, 3x schedule.

Train:  python train.py --config configs/centermask_V_39_eSE_FPN_ms_3x.py --workdir /tmp/centermask_V_39_eSE_FPN_ms_3x
Eval:   python eval.py --config configs/centermask_V_39_eSE_FPN_ms_3x.py --checkpoint PATH --workdir /tmp/centermask_V_39_eSE_FPN_ms_3x_eval
Reference (centermask2 README, COCO val2017): mask AP 39.7, box AP 44.2, 0.050 s/img on V100.
"""
from centermask_jax import config as base


def get_config():
  c = base.base_config()
  c.name = "centermask_V_39_eSE_FPN_ms_3x"
  base.vovnet(c, "V-39-eSE")
  c.lock()
  return c
