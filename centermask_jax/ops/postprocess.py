"""Detector post-processing (spec §c.6) and MaskIoU rescoring (spec §e, inference).

Everything is batched over leading dims with a validity mask instead of dropping rows:
  detector_postprocess: resized-image boxes -> original-image boxes, scaled, clipped,
    `valid &= nonempty`;
  select_class_masks: mask-head logits (NHWC, classes last) -> predicted-class channel;
  maxpool2x2: 28x28 mask probabilities -> 14x14 MaskIoU input channel;
  maskiou_rescore: mask_scores = score * maskiou[predicted class];
  postprocess_detections: all of the above plus mask paste-back onto a static canvas.
"""
import functools
from typing import Tuple

import jax
import jax.numpy as jnp

from centermask_jax.ops import boxes as box_ops
from centermask_jax.ops import masks as mask_ops


def _prefix(x, ndim: int):
  """x [*lead] -> [*lead, 1, ..., 1] with `ndim` dims (lead = prefix of the batch dims)."""
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


@jax.jit
def detector_postprocess(boxes, valid, image_hw, orig_hw):
  """boxes [N, K, 4] (resized px), valid [N, K], image_hw [N, 2], orig_hw [N, 2] -> (boxes, valid).

  detectron2 `detector_postprocess`: x *= W0 / w, y *= H0 / h (scale factors rounded to
  float32, as torch multiplies a float32 tensor by a Python scalar), clip to
  [0, W0] x [0, H0], and rows with width <= 0 or height <= 0 become invalid. Works for any
  leading dims: image_hw / orig_hw [*lead, 2] with `lead` a prefix of boxes' leading dims.
  """
  boxes = boxes.astype(jnp.float32)
  image_hw = jnp.asarray(image_hw, jnp.float32)
  orig_hw = jnp.asarray(orig_hw, jnp.float32)
  nd = boxes.ndim - 1
  sx = _prefix(orig_hw[..., 1] / image_hw[..., 1], nd)
  sy = _prefix(orig_hw[..., 0] / image_hw[..., 0], nd)
  out = box_ops.scale(boxes, sx, sy)
  out = box_ops.clip(out, _prefix(orig_hw[..., 0], nd), _prefix(orig_hw[..., 1], nd))
  return out, jnp.asarray(valid, bool) & box_ops.nonempty(out)


@jax.jit
def select_class_masks(mask_logits, classes):
  """mask_logits [..., M, M, C] (NHWC mask head), classes int [...] -> [..., M, M].

  Out-of-range classes (e.g. -1 on padded rows) are clipped into [0, C-1].
  """
  idx = jnp.asarray(classes, jnp.int32)[..., None, None, None]
  return jnp.take_along_axis(mask_logits, idx, axis=-1, mode="clip")[..., 0]


@jax.jit
def maxpool2x2(x):
  """x [..., H, W] (H, W even) -> [..., H/2, W/2]: 2x2 stride-2 max-pool (MaskIoU input)."""
  h, w = x.shape[-2:]
  x = x.reshape(x.shape[:-2] + (h // 2, 2, w // 2, 2))
  return x.max(axis=(-3, -1))


@jax.jit
def maskiou_rescore(scores, maskiou, classes):
  """scores [..., K], maskiou [..., K, C] (raw head output), classes int [..., K] -> [..., K].

  mask_scores = score * maskiou[predicted class] (no clamp, may be negative).
  Out-of-range classes (padded rows) are clipped into [0, C-1].
  """
  idx = jnp.asarray(classes, jnp.int32)[..., None]
  return scores * jnp.take_along_axis(maskiou, idx, axis=-1, mode="clip")[..., 0]


@functools.partial(jax.jit, static_argnames=("canvas_hw",))
def postprocess_detections(boxes, scores, classes, valid, mask_probs, maskiou, image_hw,
                           orig_hw, canvas_hw: Tuple[int, int], mask_threshold=0.5):
  """Final per-image results on a static canvas (>= every original image size).

  boxes [N, K, 4] resized px, scores [N, K], classes [N, K], valid [N, K],
  mask_probs [N, K, M, M] (predicted class), maskiou [N, K, C], image_hw / orig_hw [N, 2]
  -> dict(boxes [N, K, 4] original px, scores, classes, valid, mask_scores [N, K],
  masks bool [N, K, Hc, Wc]; pixels beyond orig_hw and rows with valid False are False).
  """
  out_boxes, out_valid = detector_postprocess(boxes, valid, image_hw, orig_hw)
  masks = mask_ops.paste_masks(mask_probs, out_boxes, canvas_hw, mask_threshold,
                               image_hw=orig_hw)
  masks = masks & out_valid[..., None, None]
  return dict(boxes=out_boxes, scores=scores, classes=classes, valid=out_valid,
              mask_scores=maskiou_rescore(scores, maskiou, classes), masks=masks)
