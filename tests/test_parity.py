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


TRAIN_STAGES = ("train_fcos_labels", "train_fcos_reg_targets_pos", "train_fcos_num_pos",
                "img0_train_proposals_boxes", "img1_fg_roi_count", "img0_fg_roi_boxes",
                "img1_fg_roi_mask_targets_28", "img0_fg_roi_maskiou_target",
                "img1_fg_roi_maskiou_pred_gtcls", "train_loss_fcos_cls", "train_loss_fcos_loc",
                "train_loss_fcos_ctr", "train_loss_mask", "train_loss_maskiou")


def test_train_parity_cli(lite_fixture, capsys):
  """`parity --train` on a larger canvas: targets, RoIs, mask targets, losses all PASS."""
  rc = parity.main(["--config", str(parity_config()), "--fixture", str(lite_fixture),
                    "--train", "--canvas", "640,1024"])
  out = capsys.readouterr().out
  assert rc == 0, out
  for stage in TRAIN_STAGES:
    assert f"PASS  {stage} " in out, stage
  assert "parity stages: 35 PASS, 0 FAIL" in out


def test_train_parity_detects_a_wrong_reference(lite_fixture, tmp_path, capsys):
  """A copy of the fixture with one mask-target pixel and one loss changed fails."""
  import numpy as np
  for f in lite_fixture.iterdir():
    if f.name != "train_outputs.npz":
      (tmp_path / f.name).symlink_to(f)
  tr = dict(np.load(lite_fixture / "train_outputs.npz"))
  tr["img1_fg_roi_mask_targets_28"][0, 14, 14] ^= True
  tr["loss_mask"] = tr["loss_mask"] * (1 + 3e-4)
  np.savez(tmp_path / "train_outputs.npz", **tr)
  rc = parity.main(["--config", str(parity_config()), "--fixture", str(tmp_path), "--train"])
  out = capsys.readouterr().out
  assert rc == 1
  assert "FAIL  img1_fg_roi_mask_targets_28 " in out and "FAIL  train_loss_mask " in out
  assert "parity stages: 33 PASS, 2 FAIL" in out


def test_candidate_sets_match_by_class_then_nearest_box(capsys):
  """Rows in another order with near-equal keys still match; a moved box is named as one
  extra and one missing row; a 2e-3 px error is a _boxes FAIL, not a set mismatch."""
  import numpy as np
  rng = np.random.default_rng(0)
  rb = rng.uniform(0, 500, (40, 4)).astype(np.float32)
  rb[:, 2:] += rb[:, :2]
  rs = np.full(40, 0.3, np.float32)  # all keys equal: any canonical order is arbitrary
  rc = rng.integers(0, 3, 40)
  perm = rng.permutation(40)
  ref = {"boxes": rb, "scores": rs, "classes": rc}
  ours = {"boxes": rb[perm] + 1e-4, "scores": rs[perm], "classes": rc[perm],
          "valid": np.ones(40, bool)}
  rep = parity.Report()
  parity.compare_candidate_set(rep, "a", ours, ref)
  assert not rep.failed
  ours["boxes"] = ours["boxes"].copy()
  ours["boxes"][3] += 50.0
  ours["boxes"][5, 0] += 2e-3
  rep = parity.Report()
  parity.compare_candidate_set(rep, "b", ours, ref)
  failed = {l.stage: l for l in rep.failed}
  assert set(failed) == {"b_classes", "b_boxes"}
  assert "extra (ours only) 1: #3 " in failed["b_classes"].note
  assert f"missing (reference only) 1: #{perm[3]} " in failed["b_classes"].note
  assert abs(failed["b_boxes"].err - 2.1e-3) < 1e-4
