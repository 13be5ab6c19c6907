"""CenterMask training losses: FCOS (spec §c.4), mask BCE (§d.6) and MaskIoU (§e).

Normalisation across devices (`axis_name`, inside pmap / shard_map):
* FCOS: exactly as the official multi-GPU code: `num_pos_avg = max(psum(num_pos) / D, 1)`
  and the GIoU normaliser `max(psum(sum ctr targets) / D, 1e-6)`; each device's loss is
  its local sum over that normaliser, and `pmean` of the gradients gives the official ones.
* Mask / MaskIoU: detectron2 computes them as *per-device* means (DDP then averages the
  gradients). `axis_name=None` reproduces that (the training default,
  `train.mask_loss_norm = "per_device"`). With `axis_name` the denominators become the
  all-device average counts (as FCOS does; "global"), which makes the pmean-ed gradient
  independent of how the batch is split over devices (differs from detectron2 only when
  devices hold different numbers of foreground RoIs).
All normalisers carry no gradient.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from centermask_jax.training.targets import flatten_levels


def bce_with_logits(x, t):
  """Elementwise binary cross-entropy on logits (numerically stable)."""
  return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """fvcore sigmoid focal loss, elementwise: logits, targets [...] -> [...]."""
  p = jax.nn.sigmoid(logits)
  ce = bce_with_logits(logits, targets)
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


def _safe_div(a, b, ok):
  return jnp.where(ok, a / jnp.where(ok, b, 1.0), 0.0)


def centerness_targets(reg_targets, positive):
  """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)): [..., 4], [...] bool -> [...] (0 where
  not positive; denominators guarded so padding never yields NaN)."""
  l, t, r, b = (reg_targets[..., k] for k in range(4))
  lr = _safe_div(jnp.minimum(l, r), jnp.maximum(l, r), positive)
  tb = _safe_div(jnp.minimum(t, b), jnp.maximum(t, b), positive)
  return jnp.where(positive, jnp.sqrt(jnp.maximum(lr * tb, 0.0)), 0.0)


def iou_loss(pred, target, positive, loss_type: str = "giou"):
  """Official IOULoss per location on (l, t, r, b) distances: [..., 4] x2 -> [...].

  IoU is +1 smoothed: (I + 1) / (U + 1). 'giou' -> 1 - GIoU, 'iou' -> -log IoU,
  'linear_iou' -> 1 - IoU. Non-positive entries give 0 (and finite gradients).
  """
  pl, pt, pr, pb = (pred[..., k] for k in range(4))
  tl, tt, tr, tb = (target[..., k] for k in range(4))
  target_area = (tl + tr) * (tt + tb)
  pred_area = (pl + pr) * (pt + pb)
  w_inter = jnp.minimum(pl, tl) + jnp.minimum(pr, tr)
  h_inter = jnp.minimum(pb, tb) + jnp.minimum(pt, tt)
  enclose = (jnp.maximum(pl, tl) + jnp.maximum(pr, tr)) * (
      jnp.maximum(pb, tb) + jnp.maximum(pt, tt))
  inter = w_inter * h_inter
  union = target_area + pred_area - inter
  ious = _safe_div(inter + 1.0, union + 1.0, positive)
  if loss_type == "giou":
    losses = 1 - (ious - _safe_div(enclose - union, enclose, positive))
  elif loss_type == "iou":
    losses = -jnp.log(jnp.where(positive, ious, 1.0))
  elif loss_type == "linear_iou":
    losses = 1 - ious
  else:
    raise ValueError(f"unknown loss_type {loss_type!r}")
  return jnp.where(positive, losses, 0.0)


def _device_mean(x, axis_name):
  """Sum over devices / number of devices (identity without axis_name)."""
  if axis_name is None:
    return x
  return jax.lax.psum(x, axis_name) / jax.lax.psum(1, axis_name)


def fcos_losses(logits, reg, ctrness, labels, reg_targets, loc_valid,
                axis_name: Optional[str] = None, focal_alpha: float = 0.25,
                focal_gamma: float = 2.0, loc_loss_type: str = "giou"):
  """FCOS losses (official `fcos_losses`).

  logits / reg / ctrness: lists over levels of [N, Hl, Wl, C] / [N, Hl, Wl, 4] (ReLU'd,
  stride units) / [N, Hl, Wl, 1], or already flattened [N, T, .]; labels [N, T],
  reg_targets [N, T, 4], loc_valid [N, T] from `fcos_targets` ->
  dict(loss_fcos_cls, loss_fcos_loc, loss_fcos_ctr, num_pos) (scalars, float32;
  num_pos is this device's positive count, for logging).
  """
  if isinstance(logits, (list, tuple)):
    logits, reg, ctrness = flatten_levels(logits), flatten_levels(reg), flatten_levels(ctrness)
  logits = logits.astype(jnp.float32)
  reg = reg.astype(jnp.float32)
  ctrness = ctrness.astype(jnp.float32)[..., 0]
  num_classes = logits.shape[-1]
  loc_valid = loc_valid.astype(bool)
  pos = loc_valid & (labels < num_classes)
  num_pos = jnp.sum(pos).astype(jnp.float32)
  num_pos_avg = jax.lax.stop_gradient(jnp.maximum(_device_mean(num_pos, axis_name), 1.0))

  onehot = (labels[..., None] == jnp.arange(num_classes)[None, None, :]).astype(jnp.float32)
  focal = sigmoid_focal_loss(logits, onehot, focal_alpha, focal_gamma)
  cls_loss = jnp.sum(jnp.where(loc_valid[..., None], focal, 0.0)) / num_pos_avg

  reg_targets = jax.lax.stop_gradient(reg_targets.astype(jnp.float32))
  ctr_t = centerness_targets(reg_targets, pos)
  ctr_norm = jax.lax.stop_gradient(
      jnp.maximum(_device_mean(jnp.sum(ctr_t), axis_name), 1e-6))
  loc_loss = jnp.sum(iou_loss(reg, reg_targets, pos, loc_loss_type) * ctr_t) / ctr_norm
  ctr_loss = jnp.sum(jnp.where(pos, bce_with_logits(ctrness, ctr_t), 0.0)) / num_pos_avg
  return {"loss_fcos_cls": cls_loss, "loss_fcos_loc": loc_loss, "loss_fcos_ctr": ctr_loss,
          "num_pos": num_pos}


def _count_normaliser(count, axis_name):
  """(normaliser, any) with normaliser = (device-mean of) count, 1 where that is 0."""
  avg = jax.lax.stop_gradient(_device_mean(count, axis_name))
  return jnp.where(avg > 0, avg, 1.0), avg > 0


def normalised(sums, axis_name: Optional[str] = None):
  """(total, count, zero) partial sums of this device -> total / (device-mean of count),
  or `zero` (0 * sum of the predictions, keeps the graph) when every count is 0.
  Split from the sums so that they may come from per-device branches (lax.switch) and
  the collective runs outside them."""
  total, count, zero = sums
  norm, has = _count_normaliser(count, axis_name)
  return jnp.where(has, total / norm, zero)


def mask_loss_sums(mask_logits, mask_targets, fg_valid):
  """`mask_loss` before normalisation -> (BCE total, pixel count, 0 * sum(logits))."""
  logits = mask_logits.astype(jnp.float32)
  fg = fg_valid.astype(bool)
  bce = bce_with_logits(logits, mask_targets.astype(jnp.float32))
  total = jnp.sum(jnp.where(fg[..., None, None], bce, 0.0))
  count = jnp.sum(fg).astype(jnp.float32) * logits.shape[-1] * logits.shape[-2]
  return total, count, 0.0 * jnp.sum(logits)


def mask_loss(mask_logits, mask_targets, fg_valid, axis_name: Optional[str] = None):
  """Mean BCE over the foreground RoIs' 28x28 pixels (spec §d.6).

  mask_logits [N, R, S, S] (GT-class channel), mask_targets [N, R, S, S] bool/0-1,
  fg_valid [N, R] bool -> scalar. No foreground RoI -> 0 * sum(logits) (keeps the graph).
  """
  return normalised(mask_loss_sums(mask_logits, mask_targets, fg_valid), axis_name)


def maskiou_targets(mask_logits, mask_targets, ratio, fg_valid):
  """MaskIoU regression targets (spec §e), no gradient.

  mask_logits [N, R, S, S] (GT-class channel), mask_targets [N, R, S, S] bool,
  ratio [N, R] (fraction of the GT mask inside the RoI, from `mask_targets.py`),
  fg_valid [N, R] -> [N, R] float32 overlap / union, 0 for non-foreground rows.
  """
  pred = jax.lax.stop_gradient(mask_logits) > 0
  gt = mask_targets.astype(bool)
  ratio = jnp.maximum(ratio.astype(jnp.float32), 1e-10)
  full_area = jnp.sum(gt, axis=(-2, -1)).astype(jnp.float32) / ratio
  overlap = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
  union = jnp.maximum(jnp.sum(pred, axis=(-2, -1)).astype(jnp.float32) + full_area - overlap,
                      1.0)
  return jnp.where(fg_valid.astype(bool), overlap / union, 0.0)


def maskiou_loss(maskiou_pred, targets, fg_valid, axis_name: Optional[str] = None,
                 loss_weight: float = 1.0):
  """0.5 (pred - target)^2 averaged over foreground RoIs with target > 0 (spec §e).

  maskiou_pred [N, R] (GT-class output), targets [N, R], fg_valid [N, R] -> scalar;
  0 * sum(pred) when no RoI has a positive target.
  """
  return loss_weight * normalised(maskiou_loss_sums(maskiou_pred, targets, fg_valid),
                                  axis_name)


def maskiou_loss_sums(maskiou_pred, targets, fg_valid):
  """`maskiou_loss` before normalisation -> (total, count, 0 * sum(pred))."""
  pred = maskiou_pred.astype(jnp.float32)
  targets = jax.lax.stop_gradient(targets.astype(jnp.float32))
  sel = fg_valid.astype(bool) & (targets > 0)
  total = jnp.sum(jnp.where(sel, 0.5 * jnp.square(pred - targets), 0.0))
  return total, jnp.sum(sel).astype(jnp.float32), 0.0 * jnp.sum(pred)


def maskiou_targets_and_loss(mask_logits, mask_targets, ratio, maskiou_pred, fg_valid,
                             axis_name: Optional[str] = None, loss_weight: float = 1.0):
  """(loss scalar, targets [N, R]) = `maskiou_loss` of `maskiou_targets` (shapes there)."""
  t = maskiou_targets(mask_logits, mask_targets, ratio, fg_valid)
  return maskiou_loss(maskiou_pred, t, fg_valid, axis_name, loss_weight), t
