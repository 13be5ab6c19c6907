"""Training-side parity (`python -m centermask_jax.tools.parity --train ...`).

Runs our training loss (`training.step.loss_fn`, the code the train step uses) on the
fixture's weights, images and `gt_instances.json`, and compares with
`train_outputs.npz`: FCOS labels and regression targets (exact), the positive count,
the 100 train proposals (as a set), the foreground RoI sets, their 28x28 mask targets
(bit-exact), MaskIoU targets and predictions, and the five losses (rtol 1e-4).
"""
import functools
import json
import os
import re
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from centermask_jax.data import transforms
from centermask_jax.tools.parity_report import Line, compare_candidate_set
from centermask_jax.training import step as step_lib
from centermask_jax.training import targets as T


def load_fixture_gt(fixture: str, g: Optional[int] = None, p: Optional[int] = None,
                    v: Optional[int] = None) -> Dict[str, np.ndarray]:
  """gt_instances.json -> batch-contract GT arrays for the N fixture images.

  g / p / v: padded instances, polygon parts and vertices (default: the data's maxima).
  -> gt_boxes [N, G, 4], gt_classes [N, G], gt_valid [N, G], gt_polys [N, G, P, V, 2],
     gt_poly_len [N, G, P], the exact packed polygons (float64 from the JSON, as
     detectron2 reads them) gt_poly_xy64 [N, G, K, 2, 2], gt_poly_part [N, G, K],
     gt_poly_area64 [N, G, 2], image_hw [N, 2] (resized, unpadded).
  """
  with open(os.path.join(fixture, "gt_instances.json")) as f:
    gj = json.load(f)
  names = sorted((k for k in gj if re.fullmatch(r"img\d+", k)), key=lambda k: int(k[3:]))
  imgs = [gj[k] for k in names]
  g = g or max((len(d["classes"]) for d in imgs), default=1)
  p = p or max((len(polys) for d in imgs for polys in d["polygons"]), default=1)
  v = v or max((len(poly) // 2 for d in imgs for polys in d["polygons"] for poly in polys),
               default=3)
  n = len(imgs)
  gt = {"gt_boxes": np.zeros((n, g, 4), np.float32), "gt_classes": np.zeros((n, g), np.int32),
        "gt_valid": np.zeros((n, g), bool), "gt_polys": np.zeros((n, g, p, v, 2), np.float32),
        "gt_poly_len": np.zeros((n, g, p), np.int32), "image_hw": np.zeros((n, 2), np.int32)}
  kv = max((sum(len(poly) // 2 for poly in polys) for d in imgs for polys in d["polygons"]),
           default=3)
  gt.update(gt_poly_xy64=np.zeros((n, g, kv, 2, 2), np.uint32),
            gt_poly_part=np.full((n, g, kv), -1, np.int32),
            gt_poly_area64=np.zeros((n, g, 2), np.uint32))
  for i, d in enumerate(imgs):
    gt["image_hw"][i] = d["image_hw"]
    for k, (box, cls, polys) in enumerate(zip(d["boxes_xyxy"], d["classes"], d["polygons"])):
      gt["gt_boxes"][i, k], gt["gt_classes"][i, k], gt["gt_valid"][i, k] = box, cls, True
      parts = [np.asarray(poly, np.float64).reshape(-1, 2) for poly in polys]
      for j, xy in enumerate(parts):
        gt["gt_polys"][i, k, j, :len(xy)], gt["gt_poly_len"][i, k, j] = xy, len(xy)
      (gt["gt_poly_xy64"][i, k], gt["gt_poly_part"][i, k],
       gt["gt_poly_area64"][i, k]) = transforms.pack_polygons(parts, kv)
  return gt


def crop_level_first(x: np.ndarray, level_hw: Sequence[Tuple[int, int]],
                     official_hw: Sequence[Tuple[int, int]]) -> np.ndarray:
  """Image-first [N, T, ...] on our canvas -> level-first [sum_l N*hl*wl, ...] cropped to
  the official per-level sizes (level -> image -> row -> col, as train_outputs.npz)."""
  parts = []
  for a, (h, w) in zip(T.split_levels(np.asarray(x), level_hw), official_hw):
    parts.append(a[:, :h, :w].reshape((-1,) + a.shape[3:]))
  return np.concatenate(parts)


def sorted_fg(rois: Dict[str, np.ndarray], i: int, *arrays):
  """Foreground rows of image i (rois["fg"], rois["boxes"] [N, R, ...]) of each array
  [N, R, ...], sorted by (x0, y0, x1, y1): the order of train_outputs.npz."""
  fg = np.asarray(rois["fg"][i])
  boxes = np.asarray(rois["boxes"][i])[fg]
  order = np.lexsort(boxes.T[::-1])
  return [np.asarray(a[i])[fg][order] for a in arrays]


def run_train(rep, cfg, model, variables, images: np.ndarray, image_hw, padded_hw,
              fixture: str):
  """Adds the training stages to `rep` (a parity_report.Report)."""
  tr = np.load(os.path.join(fixture, "train_outputs.npz"))
  gt = load_fixture_gt(fixture)
  n = images.shape[0]
  batch = dict(gt, image=jnp.asarray(images), image_hw=jnp.asarray(image_hw, jnp.int32),
               padded_hw=jnp.asarray(padded_hw, jnp.int32))
  loss = jax.jit(functools.partial(step_lib.loss_fn, model=model, config=cfg, axis_name=None,
                                   capture=True))
  _, aux = jax.device_get(loss(variables["params"], variables["frozen_bn"], batch,
                               jax.random.PRNGKey(0)))
  inter = aux["inter"]
  ev = np.load(os.path.join(fixture, "eval_outputs.npz"))
  official = [tuple(ev[f"fcos_ctrness_{l}"].shape[2:]) for l in ("p3", "p4", "p5", "p6", "p7")]
  strides = tuple(cfg.model.fcos.strides)
  level_hw = [(-(-images.shape[1] // s), -(-images.shape[2] // s)) for s in strides]

  # --- FCOS targets ----------------------------------------------------------
  tg = inter["fcos_targets"]
  labels = crop_level_first(tg["labels"], level_hw, official)
  reg_t = crop_level_first(tg["reg_targets"], level_hw, official)
  ref_labels = tr["fcos_labels_levelfirst"]
  rep.exact("train_fcos_labels", labels, ref_labels)
  pos = ref_labels != cfg.model.num_classes
  if reg_t.shape == tr["fcos_reg_targets_levelfirst"].shape:
    rep.exact("train_fcos_reg_targets_pos", reg_t[pos], tr["fcos_reg_targets_levelfirst"][pos])
  else:
    rep.exact("train_fcos_reg_targets_pos", reg_t, tr["fcos_reg_targets_levelfirst"])
  bg = cfg.model.num_classes
  outside = sum(int(np.sum(a[:, h:] != bg) + np.sum(a[:, :h, w:] != bg))
                for a, (h, w) in zip(T.split_levels(np.asarray(tg["labels"]), level_hw), official))
  rep.add(Line("train_fcos_positives_outside_region", float(outside), 0.0, "exact", outside == 0))
  rep.exact("train_fcos_num_pos", int(round(float(aux["num_pos"]))), int(tr["fcos_num_pos"]))

  # --- proposals, foreground RoIs, mask and MaskIoU targets ------------------
  det = inter["proposals"]
  fg = inter["fg_rois"]
  for i in range(n):
    ref = {k: tr[f"img{i}_train_proposals_{k}"] for k in ("boxes", "scores", "classes")}
    ours = {k: det[k][i] for k in ("boxes", "scores", "classes", "valid")}
    compare_candidate_set(rep, f"img{i}_train_proposals", ours, ref)
    nfg = int(fg["fg"][i].sum())
    ref_n = len(tr[f"img{i}_fg_roi_boxes"])
    rep.exact(f"img{i}_fg_roi_count", nfg, ref_n)
    if nfg != ref_n:
      continue
    boxes, cls, gtb, lvl, mt, prob, iou_t, iou_p = sorted_fg(
        fg, i, fg["boxes"], fg["gt_classes"], fg["gt_boxes"], fg["levels"],
        inter["mask_targets"], inter["mask_prob_gtcls"], inter["maskiou_targets"],
        inter["maskiou_pred_gtcls"])
    rep.close(f"img{i}_fg_roi_boxes", boxes, tr[f"img{i}_fg_roi_boxes"], atol=1e-3)
    rep.exact(f"img{i}_fg_roi_gt_classes", cls, tr[f"img{i}_fg_roi_gt_classes"])
    rep.exact(f"img{i}_fg_roi_gt_boxes", gtb, tr[f"img{i}_fg_roi_gt_boxes"])
    rep.exact(f"img{i}_fg_roi_level", lvl + 3, tr[f"img{i}_fg_roi_level"])
    rep.exact(f"img{i}_fg_roi_mask_targets_28", mt, tr[f"img{i}_fg_roi_mask_targets_28"])
    rep.close(f"img{i}_fg_roi_mask_prob_gtcls", prob, tr[f"img{i}_fg_roi_mask_prob_gtcls"],
              atol=1e-4)
    rep.close(f"img{i}_fg_roi_maskiou_target", iou_t, tr[f"img{i}_fg_roi_maskiou_target"],
              atol=1e-5)
    rep.close(f"img{i}_fg_roi_maskiou_pred_gtcls", iou_p,
              tr[f"img{i}_fg_roi_maskiou_pred_gtcls"], 0.0, 1e-4)

  # --- the five losses ---------------------------------------------------------
  for name in step_lib.LOSS_KEYS:
    ours, ref = float(aux[name]), float(tr[name])
    rel = abs(ours - ref) / max(abs(ref), 1e-12)
    rep.add(Line(f"train_{name}", abs(ours - ref), rel, "rtol 1e-4", rel <= 1e-4,
                 f"ours {ours:.7g} ref {ref:.7g}"))
