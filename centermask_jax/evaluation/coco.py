"""COCO results encoding and evaluation (pycocotools COCOeval), detectron2-style reports.

Box AP is computed from the detection `scores`; mask AP from the MaskIoU-rescored `mask_scores`
(centermask2's evaluator replaces each segm result's score by its mask score, spec §c.6).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from typing import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class ResultsWriter:
  """Accumulates per-image predictions as COCO result dicts, encoding each batch at once.

  `contiguous_to_coco_id`: sequence (index = contiguous label) or mapping contiguous -> COCO
  category id; with a mapping, detections of labels it lacks are dropped (evaluating a
  model's classes mapped onto a dataset's by name). Only the encoded results (xywh boxes,
  RLE masks) are kept in host memory.
  """

  def __init__(self, contiguous_to_coco_id):
    if isinstance(contiguous_to_coco_id, Mapping):
      self._cat = {int(k): int(v) for k, v in contiguous_to_coco_id.items()}
    else:
      self._cat = {i: int(v) for i, v in enumerate(contiguous_to_coco_id)}
    self.bbox_results: list[dict] = []
    self.segm_results: list[dict] = []
    self.image_ids: set[int] = set()

  def add(self, image_id, boxes_xyxy, scores, classes, masks=None, mask_scores=None,
          valid=None):
    """Encodes one image's detections.

    boxes_xyxy [K,4] in original-image pixels, scores [K], classes [K] contiguous labels,
    masks bool [K,H0,W0] or None, mask_scores [K] or None (segm score falls back to `scores`),
    valid bool [K] or None (all valid).
    """
    image_id = int(image_id)
    self.image_ids.add(image_id)
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    k = boxes.shape[0]
    keep = np.ones((k,), bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    keep = keep & np.array([int(c) in self._cat for c in classes], bool).reshape(-1)
    idx = np.nonzero(keep)[0]
    if idx.size == 0:
      return
    xywh = boxes[idx].copy()
    xywh[:, 2:] -= xywh[:, :2]
    cats = [self._cat[int(c)] for c in classes[idx]]
    for j, i in enumerate(idx):
      self.bbox_results.append({
          "image_id": image_id,
          "category_id": cats[j],
          "bbox": [float(v) for v in xywh[j]],
          "score": float(scores[i]),
      })
    if masks is None:
      return
    masks = np.asarray(masks)[idx].astype(np.uint8)
    mscores = scores if mask_scores is None else np.asarray(mask_scores, np.float64).reshape(-1)
    # pycocotools wants a Fortran-ordered [H, W, N] uint8 array.
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for j, i in enumerate(idx):
      rle = rles[j]
      counts = rle["counts"]
      self.segm_results.append({
          "image_id": image_id,
          "category_id": cats[j],
          "segmentation": {
              "size": [int(s) for s in rle["size"]],
              "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
          },
          "score": float(mscores[i]),
      })

  def write(self, out_dir) -> dict[str, str]:
    """Writes bbox_results.json and segm_results.json into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, res in (("bbox", self.bbox_results), ("segm", self.segm_results)):
      path = os.path.join(out_dir, f"{name}_results.json")
      with open(path, "w") as f:
        json.dump(res, f)
      paths[name] = path
    return paths


def _load_gt(gt) -> COCO:
  if isinstance(gt, COCO):
    return gt
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(os.fspath(gt))


def _empty_results(coco_gt: COCO) -> COCO:
  """A results COCO with no annotations (COCO.loadRes cannot take an empty list)."""
  res = COCO()
  res.dataset["images"] = list(coco_gt.dataset["images"])
  res.dataset["categories"] = copy.deepcopy(coco_gt.dataset.get("categories", []))
  res.dataset["annotations"] = []
  with contextlib.redirect_stdout(io.StringIO()):
    res.createIndex()
  return res


def _to_percent(x) -> float:
  x = float(x)
  return x * 100.0 if x >= 0 else float("nan")


def evaluate_one(coco_gt: COCO, results: Sequence[dict], iou_type: str,
                 img_ids=None, verbose: bool = True) -> dict[str, float]:
  """Runs COCOeval for one iou type -> {AP, AP50, AP75, APs, APm, APl, AP-<category>} in %."""
  if iou_type not in ("bbox", "segm"):
    raise ValueError(f"unsupported iou_type {iou_type!r}")
  results = list(results)
  if iou_type == "segm":
    # A 'bbox' key would make loadRes take the box area instead of the mask area.
    results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    if img_ids is not None:
      ev.params.imgIds = sorted(int(i) for i in img_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  if verbose:
    print(f"COCOeval ({iou_type}):\n" + log.getvalue(), end="")
  metrics = {k: _to_percent(ev.stats[i]) for i, k in enumerate(SUMMARY_KEYS)}
  # precision: [T iou thresholds, R recall thresholds, K categories, A areas, M max dets]
  precision = ev.eval["precision"]
  cat_ids = ev.params.catIds
  for k, cat_id in enumerate(cat_ids):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    name = coco_gt.cats[cat_id]["name"]
    metrics[f"AP-{name}"] = float(np.mean(p) * 100.0) if p.size else float("nan")
  return metrics


def evaluate(gt, results: Mapping[str, Sequence[dict]] | ResultsWriter,
             iou_types=("bbox", "segm"), img_ids=None, verbose: bool = True
             ) -> dict[str, dict[str, float]]:
  """COCO metrics per iou type.

  gt: path to a COCO annotations JSON or a `COCO` object. results: a ResultsWriter or a mapping
  iou_type -> list of result dicts. img_ids: restrict evaluation to these images (default: all
  ground-truth images; images without results count as having no detections).
  Returns {iou_type: {AP, AP50, AP75, APs, APm, APl, AP-<name>...}} in percent (NaN where
  COCOeval has nothing to average, as detectron2).
  """
  coco_gt = _load_gt(gt)
  if isinstance(results, ResultsWriter):
    results = {"bbox": results.bbox_results, "segm": results.segm_results}
  return {t: evaluate_one(coco_gt, results.get(t, []), t, img_ids=img_ids, verbose=verbose)
          for t in iou_types}


def _fmt(v) -> str:
  if isinstance(v, (float, np.floating)):
    return f"{float(v):.3f}"
  return str(v)


def _pipe_table(header: Sequence[str], rows: Sequence[Sequence], center: bool) -> str:
  """A markdown pipe table (the layout detectron2 prints with tabulate 'pipe')."""
  cells = [[_fmt(v) for v in r] for r in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

  def line(vals):
    out = []
    for i, v in enumerate(vals):
      if center:
        out.append(v.center(widths[i]))
      elif i % 2 == 1:
        out.append(v.rjust(widths[i]))
      else:
        out.append(v.ljust(widths[i]))
    return "| " + " | ".join(out) + " |"

  if center:
    sep = "|" + "|".join(":" + "-" * w + ":" for w in widths) + "|"
  else:
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i % 2 == 1 else (":" + "-" * (w + 1))
                         for i, w in enumerate(widths)) + "|"
  return "\n".join([line(header), sep] + [line(r) for r in cells])


def format_table(metrics: Mapping, iou_type: str | None = None, n_cols: int = 3) -> str:
  """detectron2-style report: the summary row and the per-category AP table (n_cols pairs).

  metrics: the output of `evaluate` (all types) or one type's dict (give `iou_type` for the
  title).
  """
  if metrics and all(isinstance(v, Mapping) for v in metrics.values()):
    return "\n\n".join(format_table(m, t, n_cols) for t, m in metrics.items())
  title = f" for {iou_type}" if iou_type else ""
  summary = [k for k in SUMMARY_KEYS if k in metrics]
  parts = [f"Evaluation results{title}:",
           _pipe_table(summary, [[metrics[k] for k in summary]], center=True)]
  per_cat = [(k[3:], v) for k, v in metrics.items() if k.startswith("AP-")]
  if per_cat:
    flat = [x for pair in per_cat for x in pair]
    width = 2 * min(n_cols, len(per_cat))
    rows = [flat[i:i + width] for i in range(0, len(flat), width)]
    rows[-1] = rows[-1] + [""] * (width - len(rows[-1]))
    parts += [f"Per-category {iou_type or ''} AP:".replace("  ", " "),
              _pipe_table(["category", "AP"] * (width // 2), rows, center=False)]
  return "\n".join(parts)


def write_metrics(out_dir, metrics: Mapping) -> str:
  """Writes `metrics.json` (NaN written as null so the file is strict JSON); returns the path."""

  def clean(x):
    if isinstance(x, Mapping):
      return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (float, np.floating)):
      return float(x) if math.isfinite(float(x)) else None
    return x

  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "metrics.json")
  with open(path, "w") as f:
    json.dump(clean(metrics), f, indent=2)
  return path
