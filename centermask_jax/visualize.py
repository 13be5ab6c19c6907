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
  font = font_for((h, w))
  line_width = max(int(line_width), int(round(max(h, w) / 500)))

  labels, anchors, colors = [], [], []
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
      anchor = (x0, y0, x1, y1)
    elif masks is not None and masks[i].any():
      ys, xs = np.nonzero(masks[i])
      anchor = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
    else:
      continue
    labels.append((i, label))
    anchors.append(anchor)
    colors.append(color)
  # Labels last (on top of every box), placed in score order so that confident
  # detections get the first choice of position.
  pad = max(1, font.size // 8 if hasattr(font, "size") else 1)
  sizes, offsets = [], []
  for _, label in labels:
    tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label, font=font)
    sizes.append((tx1 - tx0 + 2 * pad, ty1 - ty0 + 2 * pad))
    offsets.append((tx0, ty0))
  prio = list(range(len(labels)))
  if scores is not None:
    sc = np.asarray(scores)
    prio.sort(key=lambda j: -float(sc[labels[j][0]]))
  rects = layout_labels([anchors[j] for j in prio], [sizes[j] for j in prio], (h, w))
  for j, (lx0, ly0, lx1, ly1) in zip(prio, rects):
    draw.rectangle([lx0, ly0, lx1 - 1, ly1 - 1], fill=(0, 0, 0))
    draw.text((lx0 + pad - offsets[j][0], ly0 + pad - offsets[j][1]), labels[j][1],
              fill=colors[j], font=font)
  return np.asarray(canvas, dtype=np.uint8)


def font_for(image_hw):
  """A font whose size follows the image (about 1/55 of its longer side, at least 10 px)."""
  size = max(10, int(round(max(image_hw) / 55)))
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _overlap(a, b) -> float:
  return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def layout_labels(anchors, sizes, image_hw):
  """Label rectangles (x0, y0, x1, y1) that avoid each other where the image allows.

  anchors: per label the (x0, y0, x1, y1) box it names, in placement priority order;
  sizes: per label (width, height). Candidates per label: above the box's top-left corner,
  inside it, below it, then the same column moved down / up in label-height steps; the
  first candidate inside the image that overlaps no label placed before wins, else the
  one with the least overlap.
  """
  h, w = image_hw
  placed = []
  for (x0, y0, x1, y1), (tw, th) in zip(anchors, sizes):
    lx = min(max(float(x0), 0.0), max(w - tw, 0.0))
    rx = min(max(float(x1) - tw, 0.0), max(w - tw, 0.0))
    ys = [y0 - th, y0, y1]
    ys += [y0 + k * th for k in range(1, int(max(h, 1) // max(th, 1)) + 1)]
    ys += [y0 - th - k * th for k in range(1, int(max(h, 1) // max(th, 1)) + 1)]
    best, best_cost = None, None
    for x in (lx, rx):
      for y in ys:
        y = float(y)
        if y < 0 or y + th > h:
          continue
        r = (x, y, x + tw, y + th)
        cost = sum(_overlap(r, p) for p in placed)
        if best_cost is None or cost < best_cost:
          best, best_cost = r, cost
        if cost == 0:
          break
      if best_cost == 0:
        break
    if best is None:  # taller than the image: top-left corner
      best = (lx, 0.0, lx + tw, float(th))
    placed.append(tuple(int(round(v)) for v in best))
  return placed
