"""Mask-branch targets exactly as the official code (spec §d.6, §e).

Two implementations (`config.model.mask_head.target_impl`), equal bit for bit:
* 'device' (default, `device_mask_targets`): `ops/polygon_raster`, inside the step;
* 'pycocotools' (`mask_targets`): a host `jax.pure_callback` into pycocotools (static
  output shapes; works under jit, vmap and pmap), the reference.

Both read the packed exact polygons of the batch (`gt_poly_xy64` float64 bits,
`gt_poly_part`, `gt_poly_area64`: what detectron2 rasterises, float64 from the JSON
through resize and flip); without them, the float32 `gt_polys` / `gt_poly_len`.

* 28x28 target of a foreground RoI (detectron2 `rasterize_polygons_within_box`): the
  matched GT's polygon parts (float64) shifted by the box's (x0, y0), scaled by
  `S / max(w, 0.1)` in x and `S / max(h, 0.1)` in y (w, h and the ratios in float32, as
  numpy computes them from the float32 box), `frPyObjects` -> `merge` -> `decode`.
* MaskIoU ratio (centermask2 `mask_rcnn_loss`): sum over the parts of the COCO-rasterised
  area of each part shifted by (x0, y0) on an unscaled `int(h) x int(w)` canvas (parts are
  not merged), divided by the summed shoelace area of the parts, clamped to [0, 1]
  (then `losses.maskiou_targets` applies max(ratio, 1e-10)). A zero shoelace area gives 0.

float32 polygons are not detectron2's float64 ones: a coordinate that is not
float32-representable can, in rare borderline cases, flip a rasterised pixel.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pycocotools.mask as mask_util

from centermask_jax.data import transforms
from centermask_jax.ops import polygon_raster


def _instance_parts(polys, lens):
  """polys [P, V, 2] float64, lens [P] -> list of flat [x0, y0, x1, y1, ...] parts."""
  return [polys[p, :n].reshape(-1) for p, n in enumerate(lens) if n > 0]


def _shoelace(parts):
  return transforms.polygon_area([p.reshape(-1, 2) for p in parts])


def _roi_target(parts, box, mask_size):
  """One RoI: float32 box [4] -> (bool [S, S] target, float64 ratio)."""
  w, h = box[2] - box[0], box[3] - box[1]  # float32
  shifted = []
  for p in parts:
    q = p.copy()
    q[0::2] = q[0::2] - box[0]
    q[1::2] = q[1::2] - box[1]
    shifted.append(q)
  # Ratio numerator: unscaled canvas of truncated size, per-part areas summed.
  hi, wi = max(int(h), 0), max(int(w), 0)
  crop_area = float(mask_util.area(mask_util.frPyObjects(shifted, hi, wi)).sum())
  full = _shoelace(parts)
  ratio = min(max(crop_area / full, 0.0), 1.0) if full > 0 else 0.0
  # Python max(x, 0.1) keeps the float32 x unless 0.1 > x; int / float32 stays float32.
  ratio_h = mask_size / 0.1 if 0.1 > h else np.float32(mask_size) / h
  ratio_w = mask_size / 0.1 if 0.1 > w else np.float32(mask_size) / w
  scaled = []
  for q in shifted:
    q = q.copy()
    q[0::2] *= ratio_w
    q[1::2] *= ratio_h
    scaled.append(q)
  rle = mask_util.merge(mask_util.frPyObjects(scaled, mask_size, mask_size))
  with warnings.catch_warnings():  # pycocotools' decode trips a numpy-2 copy= warning
    warnings.simplefilter("ignore", DeprecationWarning)
    mask = mask_util.decode(rle)
  return mask.astype(bool), ratio


def float64_words(x):
  """float64 numpy array [...] -> uint32 [..., 2], its bit pattern (host-side helper)."""
  x = np.ascontiguousarray(x, np.float64)
  return x.view(np.uint32).reshape(x.shape + (2,))


def _polys_float64(gt_polys):
  """float32 [..., V, 2] or uint32 words [..., V, 2, 2] -> float64 [..., V, 2]."""
  gt_polys = np.asarray(gt_polys)
  if gt_polys.dtype == np.uint32:
    return np.ascontiguousarray(gt_polys).view(np.float64)[..., 0]
  return gt_polys.astype(np.float32).astype(np.float64)


def _host_mask_targets(boxes, matched_idx, roi_valid, gt_polys, gt_poly_len, mask_size):
  """Numpy body of `mask_targets`; any leading dims [..., N] are flattened."""
  boxes = np.asarray(boxes, np.float32)
  lead = boxes.shape[:-2]
  r = boxes.shape[-2]
  boxes = boxes.reshape((-1, r, 4))
  matched_idx = np.asarray(matched_idx).reshape((-1, r))
  roi_valid = np.asarray(roi_valid).reshape((-1, r))
  gt_polys = _polys_float64(gt_polys)
  gt_polys = gt_polys.reshape((-1,) + gt_polys.shape[-4:])
  gt_poly_len = np.asarray(gt_poly_len)
  gt_poly_len = gt_poly_len.reshape((-1,) + gt_poly_len.shape[-2:])
  targets = np.zeros(boxes.shape[:2] + (mask_size, mask_size), bool)
  ratios = np.zeros(boxes.shape[:2], np.float32)
  for n, r_idx in zip(*np.nonzero(roi_valid)):
    g = int(matched_idx[n, r_idx])
    parts = _instance_parts(gt_polys[n, g], gt_poly_len[n, g])
    if not parts:
      continue
    targets[n, r_idx], ratios[n, r_idx] = _roi_target(parts, boxes[n, r_idx], mask_size)
  return (targets.reshape(lead + (r, mask_size, mask_size)), ratios.reshape(lead + (r,)))


def _packed_parts(xy_words, part):
  """Packed uint32 [K, 2, 2] float64 words, part [K] -> list of flat float64 parts."""
  xy = np.ascontiguousarray(xy_words).view(np.float64)[..., 0]
  return [xy[part == j].reshape(-1) for j in range(int(part.max()) + 1) if np.any(part == j)]


def _host_packed_targets(boxes, matched_idx, roi_valid, xy_words, part, mask_size):
  """Numpy body of `mask_targets_packed` ([N, R] RoIs, [N, M, K, ...] packed GT)."""
  boxes = np.asarray(boxes, np.float32)
  targets = np.zeros(boxes.shape[:2] + (mask_size, mask_size), bool)
  ratios = np.zeros(boxes.shape[:2], np.float32)
  for n, r_idx in zip(*np.nonzero(np.asarray(roi_valid))):
    g = int(matched_idx[n, r_idx])
    parts = _packed_parts(xy_words[n, g], part[n, g])
    if parts:
      targets[n, r_idx], ratios[n, r_idx] = _roi_target(parts, boxes[n, r_idx], mask_size)
  return targets, ratios


def mask_targets_packed(roi_boxes, matched_idx, roi_valid, gt_poly_xy64, gt_poly_part,
                        mask_size: int = 28):
  """`mask_targets` on the packed exact polygons (host callback, pycocotools).

  roi_boxes [N, R, 4], matched_idx [N, R], roi_valid [N, R], gt_poly_xy64 uint32
  [N, M, K, 2, 2], gt_poly_part [N, M, K] -> (bool [N, R, S, S], float32 [N, R])."""
  n, r = roi_boxes.shape[:2]
  out = (jax.ShapeDtypeStruct((n, r, mask_size, mask_size), jnp.bool_),
         jax.ShapeDtypeStruct((n, r), jnp.float32))
  args = [jax.lax.stop_gradient(a) for a in (
      jnp.asarray(roi_boxes, jnp.float32), jnp.asarray(matched_idx, jnp.int32),
      jnp.asarray(roi_valid, bool), jnp.asarray(gt_poly_xy64, jnp.uint32),
      jnp.asarray(gt_poly_part, jnp.int32))]
  return jax.pure_callback(
      lambda *a: _host_packed_targets(*(np.asarray(x) for x in a), mask_size=mask_size),
      out, *args, vmap_method="sequential")


def _device_fallback_polys(gt_polys, gt_poly_len):
  """float32 [N, M, P, V, 2], [N, M, P] -> packed (xy f32 [N, M, P*V, 2], part [N, M, P*V],
  area float32-input shoelace in float64 [N, M]) for batches without the exact fields."""
  n, m, p, v = gt_polys.shape[:4]
  live = jnp.arange(v)[None, None, None, :] < gt_poly_len[..., None]
  part = jnp.where(live, jnp.arange(p)[None, None, :, None], -1).reshape(n, m, p * v)
  with jax.enable_x64(True):
    xy = gt_polys.astype(jnp.float64)
    last = jnp.maximum(gt_poly_len - 1, 0)
    prev_idx = jnp.where(jnp.arange(v) == 0, last[..., None], jnp.arange(v) - 1)
    prev = jnp.take_along_axis(xy, jnp.broadcast_to(prev_idx[..., None], xy.shape), axis=3)
    cross = jnp.where(live, xy[..., 0] * prev[..., 1] - xy[..., 1] * prev[..., 0], 0.0)
    area = jnp.sum(0.5 * jnp.abs(jnp.sum(cross, axis=-1)), axis=-1)
  return gt_polys.reshape(n, m, p * v, 2), part, area


def device_mask_targets(roi_boxes, matched_idx, roi_valid, batch, mask_size: int = 28,
                        num_parts: int = 16):
  """On-device exact targets (`ops/polygon_raster`): roi_boxes [N, R, 4], matched_idx
  [N, R], roi_valid [N, R], batch with the packed exact polygon fields (or the float32
  ones) -> (targets bool [N, R, S, S], ratio float32 [N, R], overflow bool [])."""
  if "gt_poly_xy64" in batch:
    xy, part, area = batch["gt_poly_xy64"], batch["gt_poly_part"], batch["gt_poly_area64"]
  else:
    xy, part, area = _device_fallback_polys(batch["gt_polys"], batch["gt_poly_len"])
    num_parts = batch["gt_polys"].shape[2]
  idx = jnp.asarray(matched_idx, jnp.int32)

  def per_roi(a):  # [N, M, ...] -> [N, R, ...] rows of the matched GT
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1,
                               mode="clip")
  boxes = jax.lax.stop_gradient(jnp.asarray(roi_boxes, jnp.float32))
  return polygon_raster.roi_mask_targets(
      boxes, per_roi(xy), per_roi(part), per_roi(area), jnp.asarray(roi_valid, bool),
      mask_size=mask_size, num_parts=num_parts)


def mask_targets(roi_boxes, matched_idx, roi_valid, gt_polys, gt_poly_len,
                 mask_size: int = 28):
  """Official 28x28 mask targets and MaskIoU area ratios via pycocotools (host callback).

  roi_boxes [N, R, 4] float32 (proposal boxes, resized pixels), matched_idx [N, R] int
  (GT index), roi_valid [N, R] bool (foreground RoIs), gt_polys [N, M, P, V, 2] float32
  (or uint32 [N, M, P, V, 2, 2] `float64_words`), gt_poly_len [N, M, P] ->
  (targets bool [N, R, S, S], ratio float32 [N, R]); rows with roi_valid False are zeros.
  No gradient (targets are constants).
  """
  n, r = roi_boxes.shape[:2]
  out = (jax.ShapeDtypeStruct((n, r, mask_size, mask_size), jnp.bool_),
         jax.ShapeDtypeStruct((n, r), jnp.float32))
  words = jnp.asarray(gt_polys).dtype == jnp.uint32
  polys = jnp.asarray(gt_polys, jnp.uint32 if words else jnp.float32)
  args = [jax.lax.stop_gradient(a) for a in (
      jnp.asarray(roi_boxes, jnp.float32), jnp.asarray(matched_idx, jnp.int32),
      jnp.asarray(roi_valid, bool), polys, jnp.asarray(gt_poly_len, jnp.int32))]
  return jax.pure_callback(lambda *a: _host_mask_targets(*a, mask_size=mask_size), out, *args,
                           vmap_method="broadcast_all")
