"""Official-fixture parity of the whole inference path (tools/parity.py)."""
from centermask_jax.tools import parity

CONFIG = "configs/centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py"


def _run(lite_fixture, canvas):
  rep = parity.run(str(parity_config()), str(lite_fixture), canvas)
  failed = [str(l) for l in rep.failed]
  assert not failed, "\n".join(failed)
  # every stored stage was compared (the fixture has 96 + 34 arrays)
  stages = {l.stage for l in rep.lines}
  for must in ("backbone_stage5", "fpn_p7", "fcos_logits_p3", "img0_prenms_boxes",
               "img1_postnms_scores", "img0_det_boxes", "img1_mask_pooled_first6",
               "img0_sam_out_first2", "img0_deconv_out_first2", "img1_mask_probs",
               "img0_maskiou_pred_allcls", "img1_final_masks_flipped_pixels",
               "img0_given_mask_pooled", "img1_given_final_masks_flipped_pixels"):
    assert must in stages, must
  return rep


def parity_config():
  import pathlib
  return pathlib.Path(__file__).resolve().parents[1] / CONFIG


def test_parity_on_official_canvas_canvas_640x1024(lite_fixture):
  """Fixture images (official padding 608x928) inside a 640x1024 canvas with garbage
  outside the official region give the fixture's outputs at every stage."""
  _run(lite_fixture, (640, 1024))


def test_parity_cli_exit_code(lite_fixture, capsys):
  rc = parity.main(["--config", str(parity_config()), "--fixture", str(lite_fixture)])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "FAIL " not in out
