"""Shared test helper: the lite fixture's GT (gt_instances.json) as batch-contract arrays."""
import json

import numpy as np


def load_gt(fixture, g=6, p=3, v=20):
  """gt_instances.json -> padded batch-contract GT arrays for the 2 fixture images."""
  gj = json.loads((fixture / "gt_instances.json").read_text())
  gt = {"gt_boxes": np.zeros((2, g, 4), np.float32), "gt_classes": np.zeros((2, g), np.int32),
        "gt_valid": np.zeros((2, g), bool), "gt_polys": np.zeros((2, g, p, v, 2), np.float32),
        "gt_poly_len": np.zeros((2, g, p), np.int32), "image_hw": np.zeros((2, 2), np.int32)}
  for i in range(2):
    d = gj[f"img{i}"]
    gt["image_hw"][i] = d["image_hw"]
    for k, (box, cls, polys) in enumerate(zip(d["boxes_xyxy"], d["classes"], d["polygons"])):
      gt["gt_boxes"][i, k], gt["gt_classes"][i, k], gt["gt_valid"][i, k] = box, cls, True
      for j, poly in enumerate(polys):
        xy = np.asarray(poly).reshape(-1, 2)
        gt["gt_polys"][i, k, j, :len(xy)], gt["gt_poly_len"][i, k, j] = xy, len(xy)
  return gt
