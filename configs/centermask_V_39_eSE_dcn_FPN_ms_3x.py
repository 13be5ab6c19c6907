"""CenterMask, VoVNetV2-39 backbone with modulated deformable convs (DCNv2) in stages 3-5,
FPN 256, 3x schedule.

Train:  python train.py --config configs/centermask_V_39_eSE_dcn_FPN_ms_3x.py --workdir /tmp/centermask_V_39_eSE_dcn_FPN_ms_3x
Eval:   python eval.py --config configs/centermask_V_39_eSE_dcn_FPN_ms_3x.py --checkpoint PATH --workdir /tmp/centermask_V_39_eSE_dcn_FPN_ms_3x_eval
Reference (centermask2 README, COCO val2017): mask AP 40.3, box AP 45.1, 0.061 s/img on V100.
"""
from centermask_jax import config as base


def get_config():
  c = base.base_config()
  c.name = "centermask_V_39_eSE_dcn_FPN_ms_3x"
  base.vovnet(c, "V-39-eSE", dcn=True)
  c.lock()
  return c
