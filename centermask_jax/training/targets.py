"""Training targets: FCOS location targets (spec §c.3) and RoI matching (spec §d.2).

All functions are pure jnp with static shapes. Layouts:

* FCOS targets are returned *image-first*: `[N, T]` with T = sum_l Hl * Wl, levels
  concatenated in order P3..P7, row-major inside a level (`flatten_levels` gives the
  predictions the same layout). The official loss order (level -> image -> location)
  is only a permutation of this; every FCOS loss term is a sum, so it does not matter.
* `level_hw` are the *canvas* sizes of the feature maps. Locations outside the official
  region (`ops.padding.region_flat`) get `loc_valid = False` and background labels; the
  losses ignore them, so a larger canvas gives the official numbers.
* RoIs: R = P + G per image (proposals, then every GT slot appended), with validity and
  foreground masks; `select_fg` gathers a fixed number of foreground RoIs to the front.
"""
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from centermask_jax.ops import boxes as box_ops
from centermask_jax.ops import padding
from centermask_jax.ops.roi_align import assign_levels

INF = 100000000.0  # the official "no candidate" area sentinel


def _static_locations(level_hw: Sequence[Tuple[int, int]], strides: Sequence[int],
                      sizes_of_interest: Sequence[float]):
  """Static per-location tables over all levels (numpy, concatenated level-first).

  -> xs, ys, stride, size_lo, size_hi, each [T].
  """
  if len(level_hw) != len(strides) or len(sizes_of_interest) != len(strides) - 1:
    raise ValueError("need one (H, W) and stride per level and len(strides) - 1 sizes")
  bounds = [-1.0] + [float(s) for s in sizes_of_interest] + [INF]
  cols = {k: [] for k in ("xs", "ys", "stride", "lo", "hi")}
  for lvl, ((h, w), s) in enumerate(zip(level_hw, strides)):
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    cols["xs"].append((c * s + s // 2).astype(np.float32))
    cols["ys"].append((r * s + s // 2).astype(np.float32))
    cols["stride"].append(np.full(r.shape, s, np.int32))
    cols["lo"].append(np.full(r.shape, bounds[lvl], np.float32))
    cols["hi"].append(np.full(r.shape, bounds[lvl + 1], np.float32))
  return {k: np.concatenate(v) for k, v in cols.items()}


def fcos_locations(level_hw: Sequence[Tuple[int, int]], strides=(8, 16, 32, 64, 128)):
  """Location centres (x, y) = (j*s + s//2, i*s + s//2) -> float32 [T, 2], level-first."""
  t = _static_locations(level_hw, strides, [0.0] * (len(strides) - 1))
  return jnp.asarray(np.stack([t["xs"], t["ys"]], axis=-1))


def flatten_levels(maps):
  """list of [N, Hl, Wl, C] -> [N, T, C] in the layout of `fcos_targets`."""
  return jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)


def split_levels(x, level_hw: Sequence[Tuple[int, int]]):
  """[N, T, ...] -> list of [N, Hl, Wl, ...] (inverse of `flatten_levels`)."""
  out, start = [], 0
  for h, w in level_hw:
    out.append(x[:, start:start + h * w].reshape(x.shape[:1] + (h, w) + x.shape[2:]))
    start += h * w
  return out


def fcos_targets(gt_boxes, gt_classes, gt_valid, level_hw: Sequence[Tuple[int, int]],
                 padded_hw, strides: Sequence[int] = (8, 16, 32, 64, 128),
                 sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
                 center_sample_radius: float = 1.5, num_classes: int = 80):
  """FCOS location targets with center sampling (official `compute_targets_for_locations`).

  gt_boxes [N, G, 4] float32 xyxy, gt_classes [N, G] int, gt_valid [N, G] bool,
  level_hw: static canvas (H, W) per level, padded_hw [N, 2] official padded size ->
  dict(labels [N, T] int32 (num_classes = background),
       reg_targets [N, T, 4] float32 (l, t, r, b) / stride (meaningful where labels < C),
       loc_valid [N, T] bool (inside ceil(padded_hw / stride))).

  Candidates: strictly inside the center-sampling box (radius * stride around the GT box
  centre, clipped to the box) and max(l, t, r, b) within the level's inclusive size
  range; the candidate GT with the smallest *box* area wins (first index on ties).
  Official quirk kept: if the image's first (valid) GT box has centre x == 0, the image
  gets no positive location at all (the official code looks at GT 0; same thing when
  valid GTs are packed first, as the batch contract does).
  """
  tab = _static_locations(level_hw, strides, sizes_of_interest)
  xs, ys = jnp.asarray(tab["xs"]), jnp.asarray(tab["ys"])
  # stride * radius in double, then float32 (as Python float meets a float32 tensor).
  radius = jnp.asarray((tab["stride"] * float(center_sample_radius)).astype(np.float32))
  lo, hi = jnp.asarray(tab["lo"]), jnp.asarray(tab["hi"])
  stride_i = jnp.asarray(tab["stride"])
  stride_f = stride_i.astype(jnp.float32)

  def per_image(boxes, classes, valid, loc_valid):
    boxes = boxes.astype(jnp.float32)
    x0, y0, x1, y1 = (boxes[None, :, k] for k in range(4))  # [1, G]
    x, y = xs[:, None], ys[:, None]  # [T, 1]
    reg = jnp.stack([x - x0, y - y0, x1 - x, y1 - y], axis=-1)  # [T, G, 4]
    cx = (x0 + x1) / 2
    cy = (y0 + y1) / 2
    r = radius[:, None]
    sx0 = jnp.where(cx - r > x0, cx - r, x0)
    sy0 = jnp.where(cy - r > y0, cy - r, y0)
    sx1 = jnp.where(cx + r > x1, x1, cx + r)
    sy1 = jnp.where(cy + r > y1, y1, cy + r)
    inside = jnp.minimum(jnp.minimum(x - sx0, y - sy0), jnp.minimum(sx1 - x, sy1 - y)) > 0
    first = jnp.argmax(valid)
    quirk = valid[first] & (cx[0, first] == 0)
    max_reg = jnp.max(reg, axis=-1)
    cared = (max_reg >= lo[:, None]) & (max_reg <= hi[:, None])
    cand = inside & cared & valid[None, :] & ~quirk
    loc_area = jnp.where(cand, box_ops.area(boxes)[None, :], INF)
    best = jnp.argmin(loc_area, axis=1)  # first index on ties
    min_area = jnp.take_along_axis(loc_area, best[:, None], axis=1)[:, 0]
    labels = jnp.where((min_area == INF) | ~loc_valid, num_classes,
                       classes.astype(jnp.int32)[best])
    reg_t = jnp.take_along_axis(reg, best[:, None, None], axis=1)[:, 0] / stride_f[:, None]
    return labels.astype(jnp.int32), reg_t, loc_valid

  labels, reg_t, loc_valid = jax.vmap(per_image)(
      gt_boxes, gt_classes, gt_valid, padding.region_flat(padded_hw, level_hw, strides))
  return {"labels": labels, "reg_targets": reg_t, "loc_valid": loc_valid}


def match_rois(proposal_boxes, proposal_valid, gt_boxes, gt_classes, gt_valid, image_hw,
               max_fg: int = 128, iou_threshold: float = 0.5,
               rng: Optional[jax.Array] = None):
  """Training RoIs: proposals ++ GT boxes, IoU matching and foreground cap (spec §d.2).

  proposal_boxes [N, P, 4], proposal_valid [N, P], gt_boxes [N, G, 4], gt_classes [N, G],
  gt_valid [N, G], image_hw [N, 2] resized unpadded (h, w) ->
  dict with R = P + G per image, in the official order (proposals, then GT slots):
    boxes [N, R, 4], valid [N, R], iou [N, R] max IoU (-1 if no valid GT),
    matched_idx [N, R] int32 GT index (first max), gt_classes [N, R], gt_boxes [N, R, 4],
    fg [N, R] bool (IoU >= threshold, capped at max_fg per image),
    levels [N, R] int32 pooler level index (0 = P3) by the "ratio" rule.
  The cap keeps a uniformly random subset (`rng`, one key for the batch; fold in the
  device index under pmap) or, without `rng`, the first max_fg in RoI order. detectron2
  draws the subset with `randperm`; with <= max_fg foreground RoIs both keep all of them.
  """
  boxes = jnp.concatenate([proposal_boxes, gt_boxes], axis=1).astype(jnp.float32)
  valid = jnp.concatenate([proposal_valid, gt_valid], axis=1).astype(bool)
  iou = box_ops.pairwise_iou(gt_boxes.astype(jnp.float32), boxes)  # [N, G, R]
  iou = jnp.where(gt_valid[:, :, None], iou, -1.0)
  matched = jnp.argmax(iou, axis=1).astype(jnp.int32)  # first max on ties
  best = jnp.max(iou, axis=1)
  fg = valid & (best >= iou_threshold)
  if rng is None:
    key = jnp.broadcast_to(jnp.arange(boxes.shape[1], dtype=jnp.float32), fg.shape)
  else:
    key = jax.random.uniform(rng, fg.shape)
  key = jnp.where(fg, key, jnp.inf)
  rank = jnp.argsort(jnp.argsort(key, axis=1, stable=True), axis=1, stable=True)
  fg = fg & (rank < max_fg)
  take = lambda a: jnp.take_along_axis(a, matched.reshape(matched.shape + (1,) * (a.ndim - 2)),
                                       axis=1)
  return {
      "boxes": boxes, "valid": valid, "iou": best, "matched_idx": matched,
      "gt_classes": take(gt_classes.astype(jnp.int32)), "gt_boxes": take(gt_boxes),
      "fg": fg, "levels": assign_levels(boxes, image_hw),
  }


def select_fg(rois: dict, k: int):
  """Gathers k RoIs per image, foreground first (RoI order kept): dict of [N, R, ...]
  -> same keys with [N, k, ...]; `fg` marks the real ones (pad rows repeat bg RoIs)."""
  fg = rois["fg"]
  r = fg.shape[1]
  order = jnp.argsort(jnp.where(fg, 0, 1) * r + jnp.arange(r)[None, :], axis=1)[:, :k]
  return {name: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)),
                                    axis=1)
          for name, a in rois.items()}
