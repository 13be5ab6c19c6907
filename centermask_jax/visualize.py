"""Prediction overlays: semi-transparent class-coloured masks, box outlines, 'name score' labels."""
from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_color(class_id: int) -> tuple[int, int, int]:
  """Deterministic, well-spread RGB colour for a class id (golden-ratio hue steps)."""
  hue = (int(class_id) * 0.618033988749895) % 1.0
  sat = 0.65 + 0.35 * ((int(class_id) * 7) % 3) / 2.0
  r, g, b = colorsys.hsv_to_rgb(hue, sat, 0.95)
  return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def draw_instances(image_rgb, boxes=None, classes=None, scores=None, masks=None,
                   class_names: Sequence[str] | None = None, score_thresh: float = 0.5,
                   alpha: float = 0.5, line_width: int = 2) -> np.ndarray:
  """Draws predictions over an image.

  image_rgb uint8 [H,W,3]; boxes [K,4] xyxy in that image's pixels (or None); classes [K]
  contiguous labels; scores [K] (instances with score < score_thresh are skipped; None keeps
  all); masks bool [K,H,W] or None; class_names indexed by class. -> uint8 [H,W,3].
  """
  img = np.asarray(image_rgb)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
    raise ValueError(f"expected uint8 [H,W,3], got {img.dtype} {img.shape}")
  h, w = img.shape[:2]
  counts = [len(x) for x in (boxes, classes, scores, masks) if x is not None]
  k = counts[0] if counts else 0
  if any(c != k for c in counts):
    raise ValueError(f"instance counts differ: {counts}")
  classes = np.zeros((k,), np.int64) if classes is None else np.asarray(classes).astype(np.int64)
  keep = np.ones((k,), bool) if scores is None else np.asarray(scores) >= score_thresh
  order = np.nonzero(keep)[0]
  if boxes is not None and order.size:
    # Larger instances first so small ones stay visible on top.
    b = np.asarray(boxes, np.float64)
    area = (b[order, 2] - b[order, 0]) * (b[order, 3] - b[order, 1])
    order = order[np.argsort(-area, kind="stable")]

  out = img.astype(np.float32)
  if masks is not None:
    masks = np.asarray(masks)
    if masks.shape[1:] != (h, w):
      raise ValueError(f"masks {masks.shape} do not match image {img.shape}")
    for i in order:
      m = masks[i].astype(bool)
      color = np.asarray(class_color(classes[i]), np.float32)
      out[m] = (1.0 - alpha) * out[m] + alpha * color
  canvas = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()

  for i in order:
    color = class_color(classes[i])
    if class_names is not None and 0 <= classes[i] < len(class_names):
      label = str(class_names[classes[i]])
    else:
      label = str(int(classes[i]))
    if scores is not None:
      label = f"{label} {float(np.asarray(scores)[i]):.2f}"
    if boxes is not None:
      x0, y0, x1, y1 = (float(v) for v in np.asarray(boxes)[i])
      draw.rectangle([x0, y0, x1, y1], outline=color, width=line_width)
      anchor = (x0, y0)
    elif masks is not None and masks[i].any():
      ys, xs = np.nonzero(masks[i])
      anchor = (float(xs.min()), float(ys.min()))
    else:
      continue
    tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label, font=font)
    tw, th = tx1 - tx0, ty1 - ty0
    lx = min(max(anchor[0], 0.0), max(w - tw - 2, 0))
    ly = anchor[1] - th - 2
    if ly < 0:
      ly = min(max(anchor[1], 0.0), max(h - th - 2, 0))
    draw.rectangle([lx, ly, lx + tw + 2, ly + th + 2], fill=(0, 0, 0))
    draw.text((lx + 1 - tx0, ly + 1 - ty0), label, fill=color, font=font)
  return np.asarray(canvas, dtype=np.uint8)
