"""Mask paste-back (detectron2 aligned `paste_masks_in_image`) and COCO RLE helpers.

Paste semantics (spec §d.7): output pixel (px, py) samples the M x M soft mask with
bilinear `grid_sample(align_corners=False, padding_mode="zeros")` at
  gx = (px + 0.5 - x0) / (x1 - x0) * 2 - 1   (same for y),
i.e. mask-cell coordinate  sx = (gx + 1) * M / 2 - 0.5, and a pixel is foreground iff
the sampled value is >= threshold (0.5).

Bilinear sampling with zero padding is separable: value = Wy @ mask @ Wx^T with per-box
interpolation matrices Wy [H, M], Wx [W, M] holding the two bilinear tap weights of every
output row / column (taps outside [0, M-1] get no weight = zero padding). This is exact
(up to float rounding order) and static-shape. Matmuls run at HIGHEST precision so that
accelerators do not use TF32/bf16 passes.

Boxes with width <= 0 or height <= 0 paste to all-False (detectron2 drops them first).
"""
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from centermask_jax.ops import boxes as box_ops
from centermask_jax.ops import padding

_HIGHEST = jax.lax.Precision.HIGHEST


def _interp_weights(lo, hi, n_out: int, m: int):
  """Box extent lo, hi [...] on one axis -> [..., n_out, m] bilinear tap weights.

  Row p of the result holds the weights of mask cells 0..m-1 for output pixel p
  (centre p + 0.5). Empty extents (hi <= lo) give finite garbage; callers mask them.
  """
  lo = lo[..., None]
  extent = hi[..., None] - lo
  extent = jnp.where(extent > 0, extent, jnp.ones_like(extent))
  p = jnp.arange(n_out, dtype=jnp.float32) + 0.5
  num = p - lo
  # The barriers keep XLA from rewriting the division into a reciprocal multiply and from
  # folding "* 2 - 1" with "+ 1": both change rounding versus PyTorch's grid computation.
  num, den = jax.lax.optimization_barrier((num, jnp.broadcast_to(extent, num.shape)))
  g = jax.lax.optimization_barrier(num / den * 2.0 - 1.0)  # normalised grid coordinate
  s = (g + 1.0) * (m / 2.0) - 0.5  # unnormalised source coordinate (align_corners=False)
  s0 = jnp.floor(s)
  frac = (s - s0)[..., None]
  cell = jnp.arange(m, dtype=jnp.float32)
  s0 = s0[..., None]
  return jnp.where(cell == s0, 1.0 - frac, jnp.where(cell == s0 + 1.0, frac, 0.0))


def paste_mask_probs(mask_probs, boxes, out_hw: Tuple[int, int]):
  """Soft paste: mask_probs [..., M, M], boxes [..., 4] (output pixels) -> [..., H, W] float32.

  Bilinear grid_sample values before thresholding (no emptiness masking).
  """
  h, w = out_hw
  m_h, m_w = mask_probs.shape[-2:]
  mask_probs = mask_probs.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  wy = _interp_weights(boxes[..., 1], boxes[..., 3], h, m_h)  # [..., H, M]
  wx = _interp_weights(boxes[..., 0], boxes[..., 2], w, m_w)  # [..., W, M]
  cols = jnp.einsum("...ij,...xj->...ix", mask_probs, wx, precision=_HIGHEST)  # [..., M, W]
  return jnp.einsum("...yi,...ix->...yx", wy, cols, precision=_HIGHEST)


def _expand_prefix(x, ndim: int):
  """x [*lead, 2] -> [*lead, 1, ..., 1, 2] with `ndim` dims (lead = prefix of the batch dims)."""
  while x.ndim < ndim:
    x = x[..., None, :]
  return x


@functools.partial(jax.jit, static_argnames=("out_hw",))
def paste_masks(mask_probs, boxes, out_hw: Tuple[int, int], threshold=0.5, image_hw=None):
  """mask_probs [..., M, M], boxes [..., 4], static out_hw (H, W) -> bool [..., H, W].

  detectron2 `paste_masks_in_image` with `threshold`: value >= threshold is foreground.
  Boxes must be in output-pixel coordinates (scaled and clipped, as in
  `detector_postprocess`). Empty boxes give all-False masks. `image_hw` (optional,
  int [*lead, 2] with `lead` a prefix of boxes' leading dims, e.g. [N, 2] for boxes
  [N, K, 4]): real image size when (H, W) is a larger static canvas; pixels at rows >= h
  or cols >= w are False.
  """
  probs = paste_mask_probs(mask_probs, boxes, out_hw)
  fg = probs >= threshold
  fg = fg & box_ops.nonempty(boxes.astype(jnp.float32))[..., None, None]
  if image_hw is not None:
    fg = fg & padding.hw_mask(_expand_prefix(jnp.asarray(image_hw, jnp.int32), boxes.ndim),
                              out_hw)
  return fg


def paste_masks_on_canvas(mask_probs, boxes, image_hw, canvas_hw: Tuple[int, int],
                          threshold=0.5):
  """Pastes onto a static canvas: [..., M, M], [..., 4], image_hw int [..., 2] -> bool [..., Hc, Wc].

  Equals `paste_masks(..., out_hw=image_hw)` in the top-left (h, w) corner, False elsewhere,
  so one compilation serves every image size up to canvas_hw.
  """
  return paste_masks(mask_probs, boxes, tuple(int(v) for v in canvas_hw), threshold,
                     image_hw=image_hw)


def encode_masks(masks, hw: Optional[Sequence[int]] = None):
  """NumPy bool masks [R, H, W] -> list of R COCO RLE dicts {'size': [h, w], 'counts': str}.

  `hw` = (h, w) crops a canvas to the real image first. Same encoding as detectron2's
  `instances_to_coco_json` (pycocotools `encode` on Fortran-ordered uint8).
  """
  from pycocotools import mask as mask_util  # host-only dependency

  masks = np.asarray(masks)
  if hw is not None:
    masks = masks[:, :int(hw[0]), :int(hw[1])]
  if masks.shape[0] == 0:
    return []
  rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  for rle in rles:
    rle["counts"] = rle["counts"].decode("utf-8")
  return rles


def decode_masks(rles):
  """List of RLE dicts (str or bytes counts) -> NumPy bool [R, H, W] (pycocotools decode)."""
  from pycocotools import mask as mask_util

  out = []
  for rle in rles:
    counts = rle["counts"]
    rle = {"size": list(rle["size"]),
           "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}
    out.append(mask_util.decode(rle).astype(bool))
  return np.stack(out) if out else np.zeros((0, 0, 0), bool)
