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


def _interp_weights(lo, hi, n_out: int, m: int, start=0):
  """Box extent lo, hi [...] on one axis -> [..., n_out, m] bilinear tap weights.

  Row p of the result holds the weights of mask cells 0..m-1 for output pixel start + p
  (centre start + p + 0.5; `start` int, a scalar or [...] like lo, may be traced). Empty
  extents (hi <= lo) give finite garbage; callers mask them.
  """
  lo = lo[..., None]
  extent = hi[..., None] - lo
  extent = jnp.where(extent > 0, extent, jnp.ones_like(extent))
  start = jnp.asarray(start, jnp.int32)[..., None]
  p = (jnp.arange(n_out, dtype=jnp.int32) + start).astype(jnp.float32) + 0.5
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


def paste_mask_probs(mask_probs, boxes, out_hw: Tuple[int, int], origin=(0, 0)):
  """Soft paste: mask_probs [..., M, M], boxes [..., 4] (output pixels) -> [..., H, W] float32.

  Bilinear grid_sample values before thresholding (no emptiness masking). `origin`
  (y, x), ints or int arrays [...]: the output window starts at that pixel of the image
  (tiles; same values).
  """
  h, w = out_hw
  m_h, m_w = mask_probs.shape[-2:]
  mask_probs = mask_probs.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  wy = _interp_weights(boxes[..., 1], boxes[..., 3], h, m_h, origin[0])  # [..., H, M]
  wx = _interp_weights(boxes[..., 0], boxes[..., 2], w, m_w, origin[1])  # [..., W, M]
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


PASTE_TILE = (128, 128)
PASTE_CHUNK = 32  # (row, tile) patches per device call


@functools.partial(jax.jit, static_argnames=("tile_hw",))
def _paste_tile(mask_probs, boxes, origins, threshold, tile_hw):
  """[P, M, M], [P, 4], origins int32 [P, 2] (y, x) -> bool [P, th, tw]: patch p holds the
  pixels origins[p] + [0, th) x [0, tw) of `paste_masks` for its row (same arithmetic)."""
  fg = paste_mask_probs(mask_probs, boxes, tile_hw, (origins[:, 0], origins[:, 1])) >= threshold
  return fg & box_ops.nonempty(boxes.astype(jnp.float32))[..., None, None]


def _near_tiles(lo, hi, m: int, tile: int, count: int):
  """Box extents lo, hi [R] (float64, pixels) on one axis, mask size m, `count` tiles of
  `tile` px -> (tile starts [count], bool [R, count]: the tile meets the extent widened by
  more than one mask cell, outside which no pixel gets a bilinear tap)."""
  margin = np.ceil((hi - lo) / m) + 2
  starts = np.arange(count) * tile
  near = ((np.ceil(hi + margin)[:, None] > starts)
          & (np.floor(lo - margin)[:, None] < starts + tile))
  return starts, near


def paste_masks_tiled(mask_probs, boxes, out_hw: Tuple[int, int], threshold=0.5,
                      rows=None, tile_hw: Tuple[int, int] = PASTE_TILE) -> np.ndarray:
  """`paste_masks` for any output size and detection count without compiling per size:
  mask_probs [K, M, M], boxes [K, 4] (output pixels), out_hw (H, W) -> NumPy bool [R, H, W]
  for the row indices `rows` (default all K).

  The image is cut into fixed tiles; only the (row, tile) pairs where the row's box comes
  near the tile are computed, PASTE_CHUNK pairs per call of one compiled function (whatever
  K, H, W). Elsewhere every sampled value is exactly 0 (a pixel more than one mask cell
  outside its box gets no bilinear tap), so for any threshold > 0 the result equals
  `paste_masks` pixel for pixel.
  """
  if not threshold > 0:
    raise ValueError(f"paste threshold must be > 0, got {threshold}")
  h, w = int(out_hw[0]), int(out_hw[1])
  th, tw = tile_hw
  nty, ntx = -(-h // th), -(-w // tw)
  probs = np.asarray(mask_probs, np.float32)
  bx = np.asarray(boxes, np.float32).reshape(-1, 4)
  rows = np.arange(bx.shape[0]) if rows is None else np.asarray(rows, np.int64).reshape(-1)
  full = np.zeros((len(rows), nty, th, ntx, tw), bool)
  out = full.reshape(len(rows), nty * th, ntx * tw)[:, :h, :w]
  b = bx[rows].astype(np.float64)
  ty, near_y = _near_tiles(b[:, 1], b[:, 3], probs.shape[-2], th, nty)
  tx, near_x = _near_tiles(b[:, 0], b[:, 2], probs.shape[-1], tw, ntx)
  nonempty = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
  j, iy, ix = np.nonzero(near_y[:, :, None] & near_x[:, None, :] & nonempty[:, None, None])
  if not len(j):
    return out
  n = -(-len(j) // PASTE_CHUNK) * PASTE_CHUNK  # pad to whole chunks (repeats of pair 0)
  pick = np.concatenate([np.arange(len(j)), np.zeros(n - len(j), np.int64)])
  src = rows[j[pick]]
  origins = np.stack([ty[iy[pick]], tx[ix[pick]]], 1).astype(np.int32)
  thr = jnp.float32(threshold)
  patches = np.empty((n, th, tw), bool)
  for c in range(0, n, PASTE_CHUNK):
    s = slice(c, c + PASTE_CHUNK)
    patches[s] = np.asarray(_paste_tile(probs[src[s]], bx[src[s]], origins[s], thr, tile_hw))
  full[j, iy, :, ix, :] = patches[:len(j)]
  return out


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
