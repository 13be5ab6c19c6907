"""COCO results writer + evaluation against pycocotools on tiny_coco val."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from centermask_jax.evaluation.coco import (ResultsWriter, evaluate, format_table,
                                            write_metrics)

SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def gt(tiny_coco):
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(str(tiny_coco / "annotations" / "instances_val2017.json"))


@pytest.fixture(scope="module")
def cat_ids(gt):
  return sorted(gt.getCatIds())


def gt_instances(coco, cat_ids, img_id):
  """Non-crowd GT of one image -> boxes xyxy [K,4], contiguous classes [K], masks bool [K,H,W]."""
  img = coco.imgs[img_id]
  anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])) if not a["iscrowd"]]
  boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                     a["bbox"][1] + a["bbox"][3]] for a in anns], np.float64).reshape(-1, 4)
  contiguous = {c: i for i, c in enumerate(cat_ids)}
  classes = np.array([contiguous[a["category_id"]] for a in anns], np.int32)
  masks = np.zeros((len(anns), img["height"], img["width"]), bool)
  for i, a in enumerate(anns):
    masks[i] = coco.annToMask(a).astype(bool)
  return anns, boxes, classes, masks


def gt_as_predictions(coco, cat_ids, pad=2):
  """Writer holding the GT as predictions (score 1, mask score 1) plus invalid padding rows."""
  w = ResultsWriter(cat_ids)
  for img_id in coco.getImgIds():
    _, boxes, classes, masks = gt_instances(coco, cat_ids, img_id)
    k = len(boxes)
    h0, w0 = masks.shape[1:]
    # Padding rows with garbage content: must be dropped through `valid`.
    boxes = np.concatenate([boxes, np.tile([[1., 2., 50., 60.]], (pad, 1))])
    classes = np.concatenate([classes, np.zeros((pad,), np.int32)])
    masks = np.concatenate([masks, np.ones((pad, h0, w0), bool)])
    valid = np.arange(k + pad) < k
    scores = np.where(valid, 1.0, 0.7)
    w.add(img_id, boxes, scores, classes, masks, scores.copy(), valid)
  return w


@pytest.fixture(scope="module")
def gt_writer(gt, cat_ids):
  return gt_as_predictions(gt, cat_ids)


@pytest.fixture(scope="module")
def gt_metrics(gt, gt_writer):
  return evaluate(gt, gt_writer, verbose=False)


def test_gt_as_predictions_scores_ap_100(gt, gt_metrics):
  for t in ("bbox", "segm"):
    m = gt_metrics[t]
    for k in SUMMARY:
      assert m[k] == pytest.approx(100.0, abs=1e-9), (t, k, m[k])
    used = {a["category_id"] for a in gt.dataset["annotations"] if not a["iscrowd"]}
    for cid, cat in gt.cats.items():
      v = m[f"AP-{cat['name']}"]
      if cid in used:
        assert v == pytest.approx(100.0, abs=1e-9), (t, cat["name"], v)
      else:
        assert math.isnan(v), (t, cat["name"], v)


def test_results_json_roundtrip(gt, cat_ids, gt_writer, tmp_path):
  paths = gt_writer.write(tmp_path)
  n_gt = sum(1 for a in gt.dataset["annotations"] if not a["iscrowd"])
  assert len(gt_writer.bbox_results) == n_gt and len(gt_writer.segm_results) == n_gt
  with open(paths["segm"]) as f:
    segm = json.load(f)
  with open(paths["bbox"]) as f:
    bbox = json.load(f)
  assert all(isinstance(r["segmentation"]["counts"], str) for r in segm)
  with contextlib.redirect_stdout(io.StringIO()):
    dt_bbox = gt.loadRes(str(paths["bbox"]))
    dt_segm = gt.loadRes(segm)
  assert len(dt_bbox.getAnnIds()) == n_gt and len(dt_segm.getAnnIds()) == n_gt

  # Category ids and boxes round-trip: same multiset as the non-crowd GT.
  def key(image_id, cat, box):
    return (image_id, cat, tuple(round(v, 3) for v in box))
  want = sorted(key(a["image_id"], a["category_id"], a["bbox"])
                for a in gt.dataset["annotations"] if not a["iscrowd"])
  got = sorted(key(r["image_id"], r["category_id"], r["bbox"]) for r in bbox)
  assert got == want
  assert {r["category_id"] for r in bbox} <= set(cat_ids)

  # RLE decodes back to annToMask exactly, in the writer's order per image.
  img_id = max(gt.getImgIds(), key=lambda i: len(gt.getAnnIds(imgIds=[i], iscrowd=False)))
  anns, _, _, masks = gt_instances(gt, cat_ids, img_id)
  mine = [r for r in segm if r["image_id"] == img_id]
  assert len(mine) == len(anns) > 1
  for r, a, m in zip(mine, anns, masks):
    assert r["category_id"] == a["category_id"]
    dec = mask_util.decode({"size": r["segmentation"]["size"],
                            "counts": r["segmentation"]["counts"].encode()})
    np.testing.assert_array_equal(dec.astype(bool), m)

  # Metrics from the JSON files equal the in-memory ones.
  again = evaluate(gt, {"bbox": bbox, "segm": segm}, verbose=False)
  assert again["bbox"]["AP"] == pytest.approx(100.0) and again["segm"]["AP"] == pytest.approx(100.0)


def test_contiguous_mapping_as_dict(gt, cat_ids):
  img_id = gt.getImgIds()[0]
  anns, boxes, classes, masks = gt_instances(gt, cat_ids, img_id)
  w = ResultsWriter({i: c for i, c in enumerate(cat_ids)})
  w.add(img_id, boxes, np.ones(len(boxes)), classes, masks, np.ones(len(boxes)))
  assert [r["category_id"] for r in w.bbox_results] == [a["category_id"] for a in anns]


def test_zero_detections_ap_zero(gt, cat_ids):
  w = ResultsWriter(cat_ids)
  for img_id in gt.getImgIds():
    h0, w0 = gt.imgs[img_id]["height"], gt.imgs[img_id]["width"]
    w.add(img_id, np.zeros((3, 4)), np.zeros(3), np.zeros(3, np.int32),
          np.zeros((3, h0, w0), bool), np.zeros(3), np.zeros(3, bool))
  assert w.bbox_results == [] and w.segm_results == []
  m = evaluate(gt, w, verbose=False)
  for t in ("bbox", "segm"):
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
      assert m[t][k] == 0.0, (t, k, m[t][k])
  # Also from plain empty lists.
  m2 = evaluate(gt, {"bbox": [], "segm": []}, verbose=False)
  assert m2["bbox"]["AP"] == 0.0 and m2["segm"]["AP"] == 0.0


def test_box_ap_uses_scores_and_mask_ap_uses_mask_scores(gt, cat_ids):
  """Each GT plus a wrong duplicate ranked first by box score but last by mask score."""
  w = ResultsWriter(cat_ids)
  for img_id in gt.getImgIds():
    _, boxes, classes, masks = gt_instances(gt, cat_ids, img_id)
    k = len(boxes)
    h0, w0 = masks.shape[1:]
    wrong_boxes = boxes.copy()
    bw = boxes[:, 2] - boxes[:, 0]
    wrong_boxes[:, [0, 2]] += bw[:, None] * 1.5  # no overlap with its own GT
    wrong_masks = np.zeros_like(masks)
    wrong_masks[:, :2, :2] = True
    w.add(img_id, np.concatenate([boxes, wrong_boxes]),
          np.concatenate([np.full(k, 0.9), np.full(k, 0.95)]),
          np.concatenate([classes, classes]), np.concatenate([masks, wrong_masks]),
          np.concatenate([np.full(k, 0.9), np.full(k, 0.1)]))
  m = evaluate(gt, w, verbose=False)
  assert 0.0 < m["bbox"]["AP"] < 90.0, m["bbox"]["AP"]
  assert m["segm"]["AP"] == pytest.approx(100.0, abs=1e-9), m["segm"]["AP"]


def test_perturbed_predictions_ap_below_one(gt, cat_ids):
  rng = np.random.default_rng(0)
  w = ResultsWriter(cat_ids)
  for img_id in gt.getImgIds():
    _, boxes, classes, masks = gt_instances(gt, cat_ids, img_id)
    k = len(boxes)
    wh = boxes[:, 2:] - boxes[:, :2]
    jitter = rng.uniform(-0.25, 0.25, (k, 2)) * wh
    boxes = boxes + np.concatenate([jitter, jitter], axis=1)
    shifted = np.stack([np.roll(m, (int(round(j[1])), int(round(j[0]))), axis=(0, 1))
                        for m, j in zip(masks, jitter)]) if k else masks
    scores = rng.uniform(0.5, 1.0, k)
    w.add(img_id, boxes, scores, classes, shifted, scores)
  m = evaluate(gt, w, verbose=False)
  for t in ("bbox", "segm"):
    assert 5.0 < m[t]["AP"] < 95.0, (t, m[t]["AP"])
    assert m[t]["AP50"] > m[t]["AP75"], (t, m[t])


def test_images_without_results(gt, cat_ids):
  img_ids = sorted(gt.getImgIds())
  half = set(img_ids[::2])
  w = ResultsWriter(cat_ids)
  for img_id in half:
    _, boxes, classes, masks = gt_instances(gt, cat_ids, img_id)
    w.add(img_id, boxes, np.ones(len(boxes)), classes, masks, np.ones(len(boxes)))
  m = evaluate(gt, w, verbose=False)
  for t in ("bbox", "segm"):
    assert 0.0 < m[t]["AP"] < 100.0, (t, m[t]["AP"])
  sub = evaluate(gt, w, img_ids=half, verbose=False)
  for t in ("bbox", "segm"):
    assert sub[t]["AP"] == pytest.approx(100.0, abs=1e-9), (t, sub[t]["AP"])


def parse_pipe_rows(block):
  rows = []
  for line in block.strip().splitlines():
    if not line.startswith("|") or set(line) <= set("|:- "):
      continue
    rows.append([c.strip() for c in line.strip().strip("|").split("|")])
  return rows


def test_format_table_lists_every_category(gt, gt_metrics):
  text = format_table(gt_metrics)
  assert "Evaluation results for bbox" in text and "Evaluation results for segm" in text
  used = {gt.cats[a["category_id"]]["name"]
          for a in gt.dataset["annotations"] if not a["iscrowd"]}
  names = {c["name"] for c in gt.cats.values()}
  for t in ("bbox", "segm"):
    section = text.split(f"Evaluation results for {t}:")[1].split("Evaluation results for")[0]
    summary, per_cat = section.split("Per-category")
    rows = parse_pipe_rows(summary)
    assert rows[0] == list(SUMMARY)
    assert [float(v) for v in rows[1]] == pytest.approx([100.0] * 6)
    found = {}
    for row in parse_pipe_rows(per_cat.split("\n", 1)[1])[1:]:
      for name, val in zip(row[::2], row[1::2]):
        if name:
          found[name] = float(val)
    assert set(found) == names
    for name, v in found.items():
      if name in used:
        assert v == pytest.approx(100.0), (t, name, v)
      else:
        assert math.isnan(v), (t, name, v)


def test_write_metrics(gt_metrics, tmp_path):
  path = write_metrics(tmp_path, gt_metrics)
  with open(path) as f:
    text = f.read()
  assert "NaN" not in text
  loaded = json.loads(text)
  assert set(loaded) == {"bbox", "segm"}
  for t in ("bbox", "segm"):
    for k, v in gt_metrics[t].items():
      if math.isnan(v):
        assert loaded[t][k] is None
      else:
        assert loaded[t][k] == pytest.approx(v)
