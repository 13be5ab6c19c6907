"""CenterMask, VoVNetV2-57 backbone with modulated deformable convs (DCNv2) in stages 3-5,
FPN 256, 3x schedule.

Train:  python train.py --config configs/centermask_V_57_eSE_dcn_FPN_ms_3x.py --workdir /tmp/centermask_V_57_eSE_dcn_FPN_ms_3x
Eval:   python eval.py --config configs/centermask_V_57_eSE_dcn_FPN_ms_3x.py --checkpoint PATH --workdir /tmp/centermask_V_57_eSE_dcn_FPN_ms_3x_eval
Reference (centermask2 README, COCO val2017): mask AP 40.9, box AP 45.5, 0.071 s/img on V100.
"""
from centermask_jax import config as base


def get_config():
  c = base.base_config()
  c.name = "centermask_V_57_eSE_dcn_FPN_ms_3x"
  base.vovnet(c, "V-57-eSE", dcn=True)
  c.lock()
  return c
