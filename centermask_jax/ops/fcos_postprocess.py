"""FCOS inference post-processing (spec §c.2, §c.5) with static shapes.

Per image and level: cls = sigmoid(logits), ctr = sigmoid(ctrness); candidates
are (location, class) pairs with cls > score_thresh (strict, on cls alone) inside
the official region; the top `pre_nms_topk` candidates by cls * ctr are kept;
box = (x - l*s, y - t*s, x + r*s, y + b*s), score = sqrt(cls * ctr). Levels are
concatenated, class-aware NMS (IoU > nms_thresh) is applied and the first
`post_nms_topk` survivors in score-descending order are returned.

Padding: every candidate list is padded to its static size and carries a valid
mask; padded rows hold zeros. Locations outside `ceil(padded_hw / stride)` of a
larger canvas never become candidates (they do not exist in the official model).

Deviation: detectron2/centermask2 keep every detection whose score ties the
k-th one (`kthvalue` + `>=`), which could give more than k; we return exactly
the first k (spec §h.5).
"""
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp

from centermask_jax.ops.nms import class_aware_nms, first_k
from centermask_jax.ops.padding import region_mask

FINAL_KEYS = ("boxes", "scores", "classes", "locations", "levels", "valid")


def fcos_locations(hw, stride: int):
  """(H, W), stride -> [H*W, 2] float32 (x, y) = (j*s + s//2, i*s + s//2), row-major."""
  h, w = int(hw[0]), int(hw[1])
  xs = jnp.arange(w, dtype=jnp.float32) * stride + stride // 2
  ys = jnp.arange(h, dtype=jnp.float32) * stride + stride // 2
  return jnp.stack([jnp.tile(xs, h), jnp.repeat(ys, w)], axis=-1)


def level_candidates(logits, reg, ctrness, padded_hw, stride: int, score_thresh,
                     pre_nms_topk: int):
  """Candidates of one level.

  logits [N, H, W, C], reg [N, H, W, 4] (l, t, r, b in stride units), ctrness
  [N, H, W, 1] raw, padded_hw [N, 2] -> dict of [N, k] arrays (k = min(pre_nms_topk,
  H*W*C)): boxes [.., 4], scores (sqrt(cls*ctr)), classes int32, locations [.., 2],
  valid bool. Order: cls*ctr descending (ties: lower flat index), invalid rows last.
  """
  n, h, w, c = logits.shape
  k = min(pre_nms_topk, h * w * c)
  cls = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(n, h * w, c)
  ctr = jax.nn.sigmoid(ctrness.astype(jnp.float32)).reshape(n, h * w)
  inside = region_mask(padded_hw, (h, w), stride).reshape(n, h * w) > 0
  cand = (cls > score_thresh) & inside[:, :, None]
  prod = cls * ctr[:, :, None]
  # cls * ctr >= 0, so -1 puts every non-candidate behind every candidate.
  _, idx = jax.lax.top_k(jnp.where(cand, prod, -1.0).reshape(n, h * w * c), k)
  take = lambda x: jnp.take_along_axis(x, idx, axis=1)
  valid = take(cand.reshape(n, -1))
  score = jnp.sqrt(take(prod.reshape(n, -1)))
  loc_idx = idx // c
  classes = (idx % c).astype(jnp.int32)
  locs = fcos_locations((h, w), stride)[loc_idx]                         # [N, k, 2]
  r = jnp.take_along_axis(reg.astype(jnp.float32).reshape(n, h * w, 4),
                          loc_idx[:, :, None], axis=1) * float(stride)
  boxes = jnp.concatenate([locs - r[..., :2], locs + r[..., 2:]], axis=-1)
  zero = lambda x: jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x,
                             jnp.zeros((), x.dtype))
  return {"boxes": zero(boxes), "scores": zero(score), "classes": zero(classes),
          "locations": zero(locs), "valid": valid}


@partial(jax.jit, static_argnames=("strides", "pre_nms_topk", "post_nms_topk",
                                   "return_intermediates"))
def fcos_inference(logits, reg, ctrness, padded_hw, strides: Sequence[int] = (8, 16, 32, 64, 128),
                   score_thresh=0.05, pre_nms_topk: int = 1000, nms_thresh=0.6,
                   post_nms_topk: int = 50, return_intermediates: bool = False):
  """FCOS detections of a batch (test: post_nms_topk 50, train proposals: 100).

  logits / reg / ctrness: lists over levels of [N, Hl, Wl, C] / [N, Hl, Wl, 4]
  (ReLU'd, stride units, l t r b) / [N, Hl, Wl, 1] (raw logits); padded_hw [N, 2].
  -> dict, K = post_nms_topk, score-descending, padded rows zero and invalid:
    boxes [N, K, 4] (unclipped, resized-image px), scores [N, K] = sqrt(cls*ctr),
    classes [N, K] int32, locations [N, K, 2], levels [N, K] int32 (0 = first
    level), valid [N, K] bool.
  With return_intermediates also (M = sum_l min(pre_nms_topk, Hl*Wl*C)):
    prenms_{boxes,scores,classes,locations,levels,valid} [N, M, ...] (levels
    concatenated, arbitrary order inside a level) and postnms_{...} [N, M, ...]
    (NMS survivors first, score-descending, then zero padding; postnms_valid).
  """
  padded_hw = jnp.asarray(padded_hw, jnp.int32)
  per_level = [level_candidates(lg, rg, ct, padded_hw, int(s), score_thresh, pre_nms_topk)
               for lg, rg, ct, s in zip(logits, reg, ctrness, strides)]
  for lvl, d in enumerate(per_level):
    d["levels"] = jnp.where(d["valid"], lvl, 0).astype(jnp.int32)
  pre = {key: jnp.concatenate([d[key] for d in per_level], axis=1) for key in FINAL_KEYS}

  # Only the top post_nms_topk survivors are used unless the full set is returned.
  order, keep = class_aware_nms(pre["boxes"], pre["scores"], pre["classes"], pre["valid"],
                                nms_thresh,
                                max_keep=None if return_intermediates else post_nms_topk)
  gather = lambda x, i: jnp.take_along_axis(x, i.reshape(i.shape + (1,) * (x.ndim - 2)), axis=1)
  post = {key: gather(pre[key], order) for key in FINAL_KEYS}
  post["valid"] = keep

  pos, ok = first_k(keep, post_nms_topk)
  out = {}
  for key in FINAL_KEYS:
    x = gather(post[key], pos)
    out[key] = jnp.where(ok.reshape(ok.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))
  out["valid"] = ok
  if return_intermediates:
    m = keep.shape[1]
    pos_all, ok_all = first_k(keep, m)  # survivors first, score-descending
    for key in FINAL_KEYS:
      out[f"prenms_{key}"] = pre[key]
      x = gather(post[key], pos_all)
      out[f"postnms_{key}"] = jnp.where(ok_all.reshape(ok_all.shape + (1,) * (x.ndim - 2)), x,
                                        jnp.zeros((), x.dtype))
    out["postnms_valid"] = ok_all
  return out
