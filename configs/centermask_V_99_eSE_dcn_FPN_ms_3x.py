"""CenterMask, VoVNetV2-99 backbone with modulated deformable convs (DCNv2) in stages 3-5,
FPN 256, 3x schedule.

Train:  python train.py --config configs/centermask_V_99_eSE_dcn_FPN_ms_3x.py --workdir /tmp/centermask_V_99_eSE_dcn_FPN_ms_3x
Eval:   python eval.py --config configs/centermask_V_99_eSE_dcn_FPN_ms_3x.py --checkpoint PATH --workdir /tmp/centermask_V_99_eSE_dcn_FPN_ms_3x_eval
Reference (centermask2 README, COCO val2017): mask AP 42.0, box AP 46.9, 0.110 s/img on V100.
"""
from centermask_jax import config as base


def get_config():
  c = base.base_config()
  c.name = "centermask_V_99_eSE_dcn_FPN_ms_3x"
  base.vovnet(c, "V-99-eSE", dcn=True)
  c.lock()
  return c
