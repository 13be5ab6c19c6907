"""Host-side (numpy / PIL) image and annotation transforms, detectron2 semantics.

Everything here runs inside `tf.numpy_function` in the pipelines and is also called eagerly
by tests. Facts (spec §h.2, detectron2 `DatasetMapper`):
* images are decoded with PIL, EXIF orientation applied, converted to RGB, then to the
  model's channel order;
* `ResizeShortestEdge.get_output_shape`: scale = short / min(h, w); if the longer side then
  exceeds max_size, scale both by max_size / longer; round with int(x + 0.5);
* resampling is `PIL.Image.resize(BILINEAR)` on the uint8 array (antialiased when shrinking);
* boxes: xywh -> xyxy, scaled, flipped (x -> W - x, corners re-sorted), clipped to [0, W/H];
* polygons: x * (new_w / w), y * (new_h / h), flip x -> W - x (float64; `gt_polys` is
  their float32 cast, the packed `gt_poly_xy64` keeps the float64 bits for exact targets).
"""
import io
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

# EXIF orientation tag value -> PIL transpose that undoes it (EXIF 2.3 orientation table).
_EXIF_ORIENTATION_TAG = 0x0112
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def get_output_shape(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
  """Original (h, w), target short edge and max size -> resized (newh, neww)."""
  h, w = float(h), float(w)
  scale = short / min(h, w)
  newh, neww = h * scale, w * scale
  if max(newh, neww) > max_size:
    s = max_size * 1.0 / max(newh, neww)
    newh, neww = newh * s, neww * s
  return int(newh + 0.5), int(neww + 0.5)


def open_image(data: bytes) -> Image.Image:
  """Encoded bytes -> fully loaded PIL image (EXIF orientation applied, RGB).

  Raises on corrupt / truncated data (PIL's own errors).
  """
  img = Image.open(io.BytesIO(data))
  try:
    orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  except Exception:  # broken EXIF block: treat as unrotated, like a reader that ignores it
    orientation = 1
  img.load()
  if orientation in _EXIF_TRANSPOSE:
    img = img.transpose(_EXIF_TRANSPOSE[orientation])
  return img.convert("RGB")


def decode_image(data: bytes, channel_order: str = "BGR") -> np.ndarray:
  """Encoded bytes -> uint8 [H, W, 3] in the given channel order ('BGR' or 'RGB')."""
  arr = np.asarray(open_image(data))
  if channel_order == "BGR":
    arr = arr[:, :, ::-1]
  elif channel_order != "RGB":
    raise ValueError(f"unsupported channel order {channel_order!r}")
  return np.ascontiguousarray(arr)


def resize_uint8(img: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, 3], (h, w) -> uint8 [h, w, 3] with PIL BILINEAR (detectron2 ResizeTransform)."""
  h, w = out_hw
  if img.shape[:2] == (h, w):
    return img
  return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def transform_boxes(boxes_xywh: np.ndarray, in_hw, out_hw, flip: bool) -> np.ndarray:
  """COCO boxes [N, 4] xywh (original pixels) -> [N, 4] float64 xyxy in resized pixels."""
  b = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
  sy, sx = out_hw[0] / in_hw[0], out_hw[1] / in_hw[1]
  x0, y0 = b[:, 0] * sx, b[:, 1] * sy
  x1, y1 = (b[:, 0] + b[:, 2]) * sx, (b[:, 1] + b[:, 3]) * sy
  if flip:
    x0, x1 = out_hw[1] - x1, out_hw[1] - x0
  out = np.stack([x0, y0, x1, y1], axis=1).clip(min=0)
  return np.minimum(out, np.array([out_hw[1], out_hw[0], out_hw[1], out_hw[0]], np.float64))


def transform_points(xy: np.ndarray, in_hw, out_hw, flip: bool) -> np.ndarray:
  """Points [K, 2] (x, y) original pixels -> [K, 2] float64 resized (and flipped) pixels."""
  p = np.asarray(xy, np.float64).reshape(-1, 2)
  x = p[:, 0] * (out_hw[1] / in_hw[1])
  y = p[:, 1] * (out_hw[0] / in_hw[0])
  if flip:
    x = out_hw[1] - x
  return np.stack([x, y], axis=1)


def _resample_polygon(xy: np.ndarray, n: int) -> np.ndarray:
  """[K, 2] -> [n, 2] (K > n): n vertices picked evenly along the vertex list."""
  idx = np.floor(np.arange(n) * (len(xy) / n)).astype(np.int64)
  return xy[idx]


def _shoelace(xy: np.ndarray) -> float:
  x, y = xy[:, 0], xy[:, 1]
  return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def polygon_area(parts) -> float:
  """Summed shoelace area of an instance's parts (float64 [n, 2] each), computed as
  detectron2's `PolygonMasks.area` does (flat x/y views, np.dot, Python sum)."""
  area = 0.0
  for xy in parts:
    p = np.ascontiguousarray(xy, np.float64).reshape(-1)
    x, y = p[0::2], p[1::2]
    area += 0.5 * np.abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
  return float(area)


def pack_polygons(parts, k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Parts (float64 [n_j, 2]), k -> packed exact polygon fields of one instance:
  (xy64 uint32 [k, 2, 2] float64 bits, part int32 [k] (-1 unused), area64 uint32 [2]).
  Raises if the parts hold more than k vertices."""
  xy = np.zeros((k, 2), np.float64)
  part = np.full((k,), -1, np.int32)
  i = 0
  for j, p in enumerate(parts):
    n = len(p)
    if i + n > k:
      raise ValueError(f"{sum(len(q) for q in parts)} polygon vertices exceed {k}")
    xy[i:i + n], part[i:i + n] = p, j
    i += n
  area = np.asarray([polygon_area(parts)], np.float64)
  return xy.view(np.uint32).reshape(k, 2, 2), part, area.view(np.uint32)


def _fit_vertices(parts, k: int):
  """Resamples parts (each to at least 3 vertices) so that they hold <= k in all."""
  total = sum(len(p) for p in parts)
  if total <= k:
    return parts, False
  return [_resample_polygon(p, max(3, len(p) * k // total)) if len(p) > 3 else p
          for p in parts], True


def instance_targets(
    *, in_hw, out_hw, flip: bool, bbox, label, is_crowd, num_parts, poly_len, poly_xy,
    max_instances: int, max_parts: int, max_vertices: int, max_instance_vertices: int = 0,
) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
  """Stored per-image annotations -> padded GT arrays of the batch contract, overflow counts.

  bbox [N, 4] xywh, label [N], is_crowd [N], num_parts [N] (0 = no polygon, e.g. RLE),
  poly_len [sum parts], poly_xy [sum vertices, 2] (original pixels, object-major order).
  Crowd instances and non-crowd instances without polygons are excluded.
  Returns ({gt_boxes [M, 4] f32, gt_classes [M] i32, gt_valid [M] bool,
  gt_polys [M, P, V, 2] f32, gt_poly_len [M, P] i32, and the exact packed polygons
  gt_poly_xy64 [M, K, 2, 2] u32 (float64 bits), gt_poly_part [M, K] i32 (-1 unused),
  gt_poly_area64 [M, 2] u32 (float64 bits of the detectron2 shoelace area)},
  counts [4] int32 = (instances over M, parts over P (smallest dropped), parts resampled
  to V (or instances resampled to K vertices in all), no-polygon instances)).
  K = max_instance_vertices (0: P * V, nothing resampled for K).
  """
  m, p, v = max_instances, max_parts, max_vertices
  kv = int(max_instance_vertices) or p * v
  if kv < 3 * p:
    raise ValueError(f"max_instance_vertices {kv} < 3 * max_polygon_parts {p}")
  out = dict(
      gt_boxes=np.zeros((m, 4), np.float32), gt_classes=np.zeros((m,), np.int32),
      gt_valid=np.zeros((m,), bool), gt_polys=np.zeros((m, p, v, 2), np.float32),
      gt_poly_len=np.zeros((m, p), np.int32),
      gt_poly_xy64=np.zeros((m, kv, 2, 2), np.uint32),
      gt_poly_part=np.full((m, kv), -1, np.int32), gt_poly_area64=np.zeros((m, 2), np.uint32))
  counts = np.zeros((4,), np.int32)
  num_parts = np.asarray(num_parts, np.int64).reshape(-1)
  poly_len = np.asarray(poly_len, np.int64).reshape(-1)
  poly_xy = np.asarray(poly_xy, np.float64).reshape(-1, 2)
  part_start = np.concatenate([[0], np.cumsum(num_parts)])
  vert_start = np.concatenate([[0], np.cumsum(poly_len)])
  boxes = transform_boxes(bbox, in_hw, out_hw, flip)
  k = 0
  for i in range(len(num_parts)):
    if is_crowd[i]:
      continue
    if num_parts[i] == 0:
      counts[3] += 1
      continue
    if k >= m:
      counts[0] += 1
      continue
    parts = []
    for j in range(part_start[i], part_start[i + 1]):
      xy = transform_points(poly_xy[vert_start[j]:vert_start[j + 1]], in_hw, out_hw, flip)
      parts.append(xy)
    if len(parts) > p:
      counts[1] += len(parts) - p
      order = sorted(range(len(parts)), key=lambda q: -_shoelace(parts[q]))[:p]
      parts = [parts[q] for q in sorted(order)]
    for j, xy in enumerate(parts):
      if len(xy) > v:
        counts[2] += 1
        parts[j] = _resample_polygon(xy, v)
    parts, resampled = _fit_vertices(parts, kv)
    counts[2] += int(resampled)
    for j, xy in enumerate(parts):
      out["gt_polys"][k, j, :len(xy)] = xy
      out["gt_poly_len"][k, j] = len(xy)
    (out["gt_poly_xy64"][k], out["gt_poly_part"][k],
     out["gt_poly_area64"][k]) = pack_polygons(parts, kv)
    out["gt_boxes"][k] = boxes[i]
    out["gt_classes"][k] = label[i]
    out["gt_valid"][k] = True
    k += 1
  return out, counts


def polygons_to_mask(polys: np.ndarray, poly_len: np.ndarray, hw) -> np.ndarray:
  """Padded polygons [P, V, 2], lengths [P] -> bool [h, w] mask (pycocotools union)."""
  from pycocotools import mask as mask_util
  h, w = hw
  parts = [polys[j, :n].astype(np.float64).reshape(-1).tolist()
           for j, n in enumerate(poly_len) if n > 0]
  if not parts:
    return np.zeros((h, w), bool)
  rles = mask_util.frPyObjects(parts, h, w)
  return mask_util.decode(mask_util.merge(rles)).astype(bool)


def resized_image_and_hw(data: bytes, short: int, max_size: int, channel_order: str
                         ) -> Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]:
  """Encoded bytes -> (resized uint8 [h, w, 3] (maybe a strided view), (H0, W0), (h, w)).

  Resizes the RGB PIL image and reverses channels afterwards: bilinear resampling acts on
  each channel alone, so this equals resizing the BGR array (and saves two copies).
  """
  if channel_order not in ("BGR", "RGB"):
    raise ValueError(f"unsupported channel order {channel_order!r}")
  img = open_image(data)
  h0, w0 = img.height, img.width
  hw = get_output_shape(h0, w0, short, max_size)
  if (h0, w0) != hw:
    img = img.resize((hw[1], hw[0]), Image.BILINEAR)
  arr = np.asarray(img)
  return (arr[:, :, ::-1] if channel_order == "BGR" else arr), (h0, w0), hw


def canvas_hw(max_short: int, max_size: int, landscape: bool, multiple: int = 128,
              override: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
  """Static canvas (Hc, Wc) holding every resized image of an aspect-ratio group."""
  if override:
    return int(override[0]), int(override[1])
  a = -(-int(max_short) // multiple) * multiple
  b = -(-int(max_size) // multiple) * multiple
  return (a, b) if landscape else (b, a)
