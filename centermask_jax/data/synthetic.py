"""Built-in synthetic COCO-format instance segmentation data (no download needed).

Images of about 256 px with 1-5 filled shapes of 5 classes (circle, rectangle, triangle,
ellipse, star) in random colours / textures (solid, stripes, checker) on a textured
background. Later shapes occlude earlier ones; every annotation is the *visible* region as
COCO polygons (the full outline minus the convex pieces of every shape drawn above it), so
occluded objects have multi-part polygons. Each image is a pure function of (seed, split,
index). `prepare()` writes JSON + JPEGs to `<data_dir>/synthetic_src/seed<seed>/` (never into
the repo) and builds them through the same tfds builder as real data.
"""
import json
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "rectangle", "triangle", "ellipse", "star")
IMAGE_SIZES = ((256, 256), (224, 320), (320, 224))  # (h, w)
MIN_VISIBLE = 0.45  # an occluded shape keeps at least this fraction of its area
MAX_PARTS = 8


def _signed_area(p: np.ndarray) -> float:
  x, y = p[:, 0], p[:, 1]
  return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _clip_halfplane(poly: np.ndarray, a: np.ndarray, b: np.ndarray, keep_left: bool):
  """Sutherland-Hodgman: part of poly [K, 2] on the left (or right) of the line a->b."""
  if len(poly) == 0:
    return poly
  d = b - a
  s = d[0] * (poly[:, 1] - a[1]) - d[1] * (poly[:, 0] - a[0])
  if not keep_left:
    s = -s
  out = []
  n = len(poly)
  for i in range(n):
    j = (i + 1) % n
    if s[i] >= 0:
      out.append(poly[i])
    if (s[i] >= 0) != (s[j] >= 0):
      t = s[i] / (s[i] - s[j])
      out.append(poly[i] + t * (poly[j] - poly[i]))
  return np.asarray(out).reshape(-1, 2)


def subtract_convex(poly: np.ndarray, convex: np.ndarray) -> List[np.ndarray]:
  """poly [K, 2] minus a convex polygon [Q, 2] -> list of disjoint polygon pieces."""
  q = convex if _signed_area(convex) > 0 else convex[::-1]
  pieces = []
  inside = poly
  for k in range(len(q)):
    a, b = q[k], q[(k + 1) % len(q)]
    out = _clip_halfplane(inside, a, b, keep_left=False)  # outside edge k, inside edges < k
    if len(out) >= 3 and abs(_signed_area(out)) > 1e-6:
      pieces.append(out)
    inside = _clip_halfplane(inside, a, b, keep_left=True)
    if len(inside) < 3:
      break
  return pieces


def _shape(rng, cls: str, h: int, w: int):
  """-> (outline [K, 2], convex parts [[Q, 2]...]) of one random shape."""
  r = rng.uniform(26, 62)
  cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
  rot = rng.uniform(0, 2 * math.pi)
  def place(p):
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * p[:, 0] - s * p[:, 1], cy + s * p[:, 0] + c * p[:, 1]], 1)
  t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
  if cls == "circle":
    outline = place(np.stack([r * np.cos(t), r * np.sin(t)], 1))
  elif cls == "ellipse":
    outline = place(np.stack([r * 1.15 * np.cos(t), r * rng.uniform(0.4, 0.55) * np.sin(t)], 1))
  elif cls == "rectangle":
    hw, hh = r * rng.uniform(0.8, 1.0), r * rng.uniform(0.5, 0.8)
    outline = place(np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]]))
  elif cls == "triangle":
    a = np.array([-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3])
    a = a + rng.uniform(-0.2, 0.2, 3)
    outline = place(np.stack([r * 1.1 * np.cos(a), r * 1.1 * np.sin(a)], 1))
  elif cls == "star":
    a = np.arange(10) * math.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45)
    outline = place(np.stack([rad * np.cos(a), rad * np.sin(a)], 1))
    inner = outline[1::2]
    tips = [np.stack([outline[(2 * k - 1) % 10], outline[2 * k], outline[2 * k + 1]])
            for k in range(5)]
    return outline, [inner] + tips
  else:
    raise ValueError(cls)
  return outline, [outline]


def _texture(rng, h, w, mode=None):
  """-> uint8 [h, w, 3] fill pattern (solid, stripes or checker) of random colours."""
  c1 = rng.integers(0, 256, 3)
  mode = mode if mode is not None else rng.choice(["solid", "solid", "stripes", "checker"])
  if mode == "solid":
    return np.broadcast_to(c1.astype(np.uint8), (h, w, 3))
  c2 = np.clip(c1 + rng.choice([-1, 1], 3) * rng.integers(50, 110, 3), 0, 255)
  yy, xx = np.mgrid[0:h, 0:w]
  period = int(rng.integers(6, 14))
  if mode == "stripes":
    ang = rng.uniform(0, math.pi)
    sel = ((xx * math.cos(ang) + yy * math.sin(ang)) // period).astype(int) % 2 == 0
  else:
    sel = ((xx // period) + (yy // period)) % 2 == 0
  return np.where(sel[..., None], c1, c2).astype(np.uint8)


def _background(rng, h, w):
  """-> uint8 [h, w, 3]: low-contrast gradient plus noise."""
  c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
  g = np.linspace(0, 1, w if rng.random() < 0.5 else h)
  g = g[None, :, None] if len(g) == w else g[:, None, None]
  img = c0 + (c1 - c0) * g + rng.normal(0, 8, (h, w, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def make_image(seed: int, split_index: int, index: int):
  """-> (uint8 RGB image [h, w, 3], [(class index, [visible polygon pieces])])."""
  rng = np.random.default_rng([seed, split_index, index])
  h, w = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
  n = int(rng.integers(1, 6))
  shapes = []  # (class, outline, convex parts, visible pieces)
  for _ in range(n):
    for _try in range(20):
      cls = int(rng.integers(len(CLASSES)))
      outline, convex = _shape(rng, CLASSES[cls], h, w)
      outline = np.clip(outline, 0, [w, h])
      new_vis = []
      ok = abs(_signed_area(outline)) > 600
      for _, o, _, vis in shapes:
        for cp in convex:
          vis = [q for piece in vis for q in subtract_convex(piece, cp)]
        area = sum(abs(_signed_area(q)) for q in vis)
        if area < MIN_VISIBLE * abs(_signed_area(o)) or len(vis) > MAX_PARTS:
          ok = False
          break
        new_vis.append(vis)
      if ok:
        shapes = [(c, o, cv, v) for (c, o, cv, _), v in zip(shapes, new_vis)]
        shapes.append((cls, outline, convex, [outline]))
        break
  img = _background(rng, h, w)
  for _, outline, _, _ in shapes:
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).polygon([tuple(p) for p in outline], fill=255)
    sel = np.asarray(m) > 127
    img[sel] = _texture(rng, h, w)[sel]
  objs = [(c, [q for q in vis if abs(_signed_area(q)) >= 4.0]) for c, _, _, vis in shapes]
  return img, [(c, v) for c, v in objs if v]


def write_split(out_dir: str, split: str, seed: int, split_index: int, num_images: int,
                start_id: int = 1) -> str:
  """Writes <out_dir>/<split>/*.jpg and annotations/instances_<split>.json -> JSON path."""
  from pycocotools import mask as mask_util
  img_dir = os.path.join(out_dir, split)
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
  images, anns = [], []
  ann_id = 1
  for i in range(num_images):
    img, objs = make_image(seed, split_index, i)
    h, w = img.shape[:2]
    iid = start_id + i
    fname = f"{iid:08d}.jpg"
    Image.fromarray(img).save(os.path.join(img_dir, fname), quality=92)
    images.append(dict(id=iid, file_name=fname, height=h, width=w))
    for cls, pieces in objs:
      segm = [np.round(q, 2).reshape(-1).tolist() for q in pieces]
      rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
      x0, y0, bw, bh = [float(v) for v in mask_util.toBbox(rle)]
      area = float(mask_util.area(rle))
      if area <= 0 or bw <= 0 or bh <= 0:
        continue
      anns.append(dict(id=ann_id, image_id=iid, category_id=cls + 1, segmentation=segm,
                       area=area, bbox=[x0, y0, bw, bh], iscrowd=0))
      ann_id += 1
  cats = [dict(id=k + 1, name=n, supercategory="shape") for k, n in enumerate(CLASSES)]
  path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
  with open(path, "w") as f:
    json.dump(dict(info=dict(description=f"centermask-jax synthetic shapes, seed {seed}"),
                   images=images, annotations=anns, categories=cats), f)
  return path


def generate(out_dir: str, seed: int = 0, num_train: int = 400, num_val: int = 100):
  """Writes both splits -> ((split, json, image_dir), ...) ready for build_dataset."""
  out = []
  for k, (split, n) in enumerate((("train", num_train), ("val", num_val))):
    js = write_split(out_dir, split, seed, k, n, start_id=1 + k * 1_000_000)
    out.append((split, js, os.path.join(out_dir, split)))
  return tuple(out)

