"""Exact greedy class-aware NMS with torchvision semantics, static shapes.

Semantics (torchvision `batched_nms` / `nms` CPU kernel): candidates are visited
in descending score order (ties: lower input index first, i.e. a stable sort);
a candidate is dropped when a previously *kept* candidate of the same class has
IoU > iou_threshold with it. IoU = inter / (area_i + area_j - inter) with areas
(x1 - x0) * (y1 - y0) (no +1). Invalid entries are never kept and suppress
nothing.

Implementation: greedy NMS of one class never looks at other classes, so the
candidates are sorted by (valid first, class, score desc, index), which makes
every class contiguous, and walked in blocks of `block_size` rows. A block is
first tested ([B, B] IoU tiles) against the earlier blocks that can hold its
classes, whose keep mask is already final; suppression inside the block is then
solved by iterating keep_i = init_i & ~any_{j<i}(S_ij & keep_j) to its fixed
point (entry i is exact after i iterations, so at most B iterations; in practice
a handful). Blocks after the last valid entry are skipped. The keep mask is
finally re-ordered into the global score-descending order.

With `max_keep` (only the first max_keep survivors are wanted, e.g. FCOS's top-50), the
candidates are walked in global score order instead (every earlier block is a possible
suppressor, any class) and the walk stops as soon as every image has max_keep survivors:
an entry's fate depends only on higher-scored entries, so those first survivors are
exactly the full greedy result's; later entries are left False. With ~80 % of FCOS
candidates surviving, that is one or two blocks instead of all of them.
"""
from functools import partial

import jax
import jax.numpy as jnp

from centermask_jax.ops import boxes as box_ops


def sort_by_score(scores, valid):
  """[..., M] scores, valid -> [..., M] int32 indices: valid first, score desc, stable."""
  m = scores.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), scores.shape)
  invalid = (~valid).astype(jnp.int32)
  neg = jnp.where(valid, -scores, 0.0).astype(scores.dtype)
  _, _, order = jax.lax.sort((invalid, neg, idx), dimension=scores.ndim - 1,
                             num_keys=2, is_stable=True)
  return order


def _nms_blocked(boxes, classes, valid, iou_threshold, block_size, max_keep=None):
  """Greedy NMS on candidates sorted by (valid first, class, score desc), or, with
  `max_keep`, by (valid first, score desc).

  boxes [N, M, 4], classes [N, M], valid [N, M] -> keep [N, M] bool (same order).
  Row block k is tested against the earlier column blocks (class-sorted: from the first
  one holding its smallest class) up to k - 1 (their keep is final), then inside itself.
  With max_keep the walk stops once every image has max_keep kept entries.
  """
  n, m = valid.shape
  b = block_size
  mp = -(-m // b) * b
  pad = mp - m
  boxes = jnp.pad(boxes, ((0, 0), (0, pad), (0, 0)))
  classes = jnp.pad(classes, ((0, 0), (0, pad)))
  valid = jnp.pad(valid, ((0, 0), (0, pad)))
  n_blocks = (jnp.max(jnp.sum(valid, axis=1)) + b - 1) // b
  lower = jnp.tril(jnp.ones((b, b), bool), k=-1)  # [i, j]: j < i
  blk = lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, b, axis=1)

  def suppress_mask(rows, rcls, cols, ccls):
    iou = box_ops.pairwise_iou(rows, cols)                               # [N, B, B]
    return (iou > iou_threshold) & (rcls[:, :, None] == ccls[:, None, :])

  def block_body(carry):
    k, keep = carry
    start = k * b
    rows, rcls, rval = blk(boxes, start), blk(classes, start), blk(valid, start)
    # first column that can share a class with this block (per image), as a block index
    if max_keep is None:
      col_lo = jnp.sum(valid & (classes < rcls[:, :1]), axis=1)
      col_lo = jnp.where(rval[:, 0], col_lo, start)  # nothing to decide in this image
      j0 = jnp.min(col_lo) // b
    else:  # score order: any earlier block can hold a suppressor
      j0 = jnp.int32(0)

    def col_body(c):
      j, sup = c
      cs = j * b
      s = suppress_mask(rows, rcls, blk(boxes, cs), blk(classes, cs)) & blk(keep, cs)[:, None, :]
      return j + 1, sup | jnp.any(s, axis=2)

    _, suppressed = jax.lax.while_loop(lambda c: c[0] < k, col_body,
                                       (j0, jnp.zeros((n, b), bool)))
    init = rval & ~suppressed
    inner = suppress_mask(rows, rcls, rows, rcls) & lower

    def fp_body(c):
      it, kb, _ = c
      new = init & ~jnp.any(inner & kb[:, None, :], axis=2)
      return it + 1, new, jnp.any(new != kb)

    _, kb, _ = jax.lax.while_loop(lambda c: c[2] & (c[0] < b), fp_body,
                                  (jnp.int32(0), init, jnp.array(True)))
    return k + 1, jax.lax.dynamic_update_slice_in_dim(keep, kb, start, axis=1)

  def more(c):
    k, keep = c
    if max_keep is None:
      return k < n_blocks
    return (k < n_blocks) & jnp.any(jnp.sum(keep, axis=1) < max_keep)

  _, keep = jax.lax.while_loop(more, block_body, (jnp.int32(0), jnp.zeros((n, mp), bool)))
  return keep[:, :m]


@partial(jax.jit, static_argnames=("block_size", "max_keep"))
def class_aware_nms(boxes, scores, classes, valid, iou_threshold, block_size=128,
                    max_keep=None):
  """Exact greedy class-aware NMS (torchvision `batched_nms` semantics).

  boxes [..., M, 4], scores [..., M], classes [..., M] int, valid [..., M] bool,
  iou_threshold scalar -> (order [..., M] int32: input indices sorted by score desc
  (valid first, stable for ties), keep [..., M] bool in that sorted order).
  Leading dims are images (handled natively, no vmap needed).
  max_keep (static int): only the first max_keep True entries of keep per image are
  needed; they are exact, entries after them may be False although the full NMS keeps
  them (the walk stops early).
  """
  lead = scores.shape[:-1]
  m = scores.shape[-1]
  boxes = boxes.reshape((-1, m, 4))
  scores = scores.reshape((-1, m))
  classes = classes.reshape((-1, m))
  valid = valid.reshape((-1, m)).astype(bool)
  n = scores.shape[0]
  if max_keep is not None:
    order = sort_by_score(scores, valid)
    keep = _nms_blocked(jnp.take_along_axis(boxes, order[:, :, None], axis=1),
                        jnp.take_along_axis(classes, order, axis=1).astype(jnp.int32),
                        jnp.take_along_axis(valid, order, axis=1),
                        jnp.asarray(iou_threshold, boxes.dtype), min(block_size, max(m, 1)),
                        max_keep=int(max_keep))
    return order.reshape(lead + (m,)), keep.reshape(lead + (m,))
  idx = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (n, m))
  # Greedy NMS per class is independent of the other classes: process in
  # (valid, class, score desc, index) order so each class is contiguous.
  neg = jnp.where(valid, -scores, 0.0).astype(scores.dtype)
  _, cls_sorted, _, corder = jax.lax.sort(
      ((~valid).astype(jnp.int32), classes.astype(jnp.int32), neg, idx),
      dimension=1, num_keys=3, is_stable=True)
  vsorted = jnp.take_along_axis(valid, corder, axis=1)
  bsorted = jnp.take_along_axis(boxes, corder[:, :, None], axis=1)
  keep_c = _nms_blocked(bsorted, cls_sorted, vsorted,
                             jnp.asarray(iou_threshold, boxes.dtype), min(block_size, max(m, 1)))
  keep_in = jnp.zeros((n, m), bool).at[jnp.arange(n)[:, None], corder].set(keep_c)
  order = sort_by_score(scores, valid)
  keep = jnp.take_along_axis(keep_in, order, axis=1)
  return order.reshape(lead + (m,)), keep.reshape(lead + (m,))


def first_k(keep, k):
  """[..., M] bool -> (idx [..., k] int32 positions of the first k True, valid [..., k]).

  Invalid slots point at position 0.
  """
  m = keep.shape[-1]
  k_eff = min(k, m)
  key = jnp.where(keep, m - jnp.arange(m, dtype=jnp.int32), 0)
  vals, idx = jax.lax.top_k(key, k_eff)
  valid = vals > 0
  idx = jnp.where(valid, idx, 0).astype(jnp.int32)
  if k_eff < k:
    padw = [(0, 0)] * (keep.ndim - 1) + [(0, k - k_eff)]
    idx = jnp.pad(idx, padw)
    valid = jnp.pad(valid, padw)
  return idx, valid
