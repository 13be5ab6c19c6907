"""RoIAlign (torchvision CPU-kernel semantics) and CenterMask pyramid-level assignment.

Static-shape, exact form: the bilinear sample weights of RoIAlign are separable in y
and x (and so is the "sample outside [-1, H] x [-1, W] contributes 0" rule), so the
output of one RoI is

    pooled[p, q, c] = sum_{h, w} Ay[p, h] F[h, w, c] Ax[q, w] / count,

where Ay [S, Hc] (Ax [S, Wc]) accumulates, for output row p (column q), the 1-D
bilinear weights of every in-range sample of that bin. The adaptive sampling grid
(`ceil(roi_h / S)` samples per bin) is handled without data-dependent shapes: per bin
only the in-range samples matter, they are contiguous in the sample index and spaced
by > 0.5 feature cells (or there is a single one), so at most ~2 Hc + 3 of them exist;
we walk a static window of G samples starting at the first in-range one, mask the
rest, and scatter-add the weights into Ay / Ax. `count = max(gh * gw, 1)` uses the
true (unbounded) grid sizes.

Features live on a static canvas [N, Hc, Wc, C] that may be larger than the official
map; the official map size (the kernel's H, W) is `padding.official_map_hw` per image.
Canvas content outside it never influences the result (it is also masked, so even
inf/NaN there is harmless).

Cost per level: two batched matmuls, dominated by N * R * S * Hc * Wc * C MACs
(e.g. 50 RoIs on a 80x128x128 P3 canvas: 0.92 GMAC per image), with an intermediate
[N, R, S, min(Hc, Wc), C]. Matmuls run at Precision.HIGHEST (no TF32 on GPU).
"""
import functools

import jax
import jax.numpy as jnp

from centermask_jax.ops import boxes as box_ops
from centermask_jax.ops import padding
from centermask_jax.ops.numerics import exact_div

HIGHEST = jax.lax.Precision.HIGHEST


def assign_levels(boxes, image_hw, k_min: int = 3, k_max: int = 5):
  """CenterMask "ratio" level rule (paper Eq. 2), spec d.3.

  boxes [N, R, 4] resized-image pixels, image_hw [N, 2] resized unpadded (h, w)
  -> int32 [N, R] level index in 0..k_max-k_min (0 = P{k_min}).
  k = clamp(ceil(k_max - log2(r)), k_min, k_max) with r = A_img / A_box (float32), written
  as comparisons on r: k <= k_max - d  iff  r >= 2**d, so k = k_max - #{d : r >= 2**d}
  (r >= 4 -> P3, r >= 2 -> P4, else P5 for levels 3..5). No log2 is evaluated, so no
  backend's log rounding can move a box. Boxes of zero (or negative, i.e.
  invalid/padding) area go to level 0.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  image_hw = jnp.asarray(image_hw)
  img_area = (image_hw[..., 0] * image_hw[..., 1]).astype(jnp.float32)[..., None]
  box_area = box_ops.area(boxes)
  positive = box_area > 0
  ratio = exact_div(img_area, jnp.where(positive, box_area, 1.0))
  steps = sum((ratio >= jnp.float32(2.0 ** d)).astype(jnp.int32)
              for d in range(1, k_max - k_min + 1))
  return jnp.where(positive, k_max - k_min - steps, 0).astype(jnp.int32)


def _axis_weights(lo, hi, size, canvas: int, scale, output_size: int,
                  sampling_ratio: int, aligned: bool, max_grid=None):
  """1-D RoIAlign weights along one axis.

  lo, hi [N, R] box coordinates (pixels); size [N] official map length (int).
  -> (A [N, R, S, canvas] summed in-range bilinear weights per bin, grid [N, R] float
  samples per bin as the kernel computes them; <= 0 means an empty RoI).
  """
  f32 = jnp.float32
  S = output_size
  offset = f32(0.5) if aligned else f32(0.0)
  # Float32 ops in the kernel's order. (XLA may contract `a + b * c` into an FMA, as
  # nvcc does in the CUDA kernel: sample positions can then differ by 1 ulp.)
  start = lo * scale - offset
  end = hi * scale - offset
  length = end - start
  if not aligned:
    length = jnp.maximum(length, f32(1.0))
  bin_size = exact_div(length, f32(S))                       # [N, R]
  if sampling_ratio > 0:
    grid = jnp.full_like(bin_size, f32(sampling_ratio))
    n_steps = sampling_ratio
  else:
    grid = jnp.ceil(bin_size)
    # In-range samples of one bin: 1 if grid == 1, else spacing > 0.5 -> <= 2H + 2;
    # + slack for starting the window up to 3 indices before the first in-range one.
    n_steps = 2 * canvas + 6 if max_grid is None else max_grid
  size_f = size.astype(f32)[:, None, None, None]                # [N, 1, 1, 1]
  ph = jnp.arange(S, dtype=f32)[None, None, :, None]            # [1, 1, S, 1]
  base = start[..., None, None] + ph * bin_size[..., None, None]  # [N, R, S, 1]
  gridb = grid[..., None, None]
  binb = bin_size[..., None, None]
  k = jnp.arange(n_steps, dtype=f32)[None, None, None, :]       # [1, 1, 1, G]
  if sampling_ratio > 0:
    idx = k
  else:
    # Start just before the first sample index with coordinate >= -1 (estimated; the
    # exact in-range test below decides), clamped to [0, grid - 1].
    safe_bin = jnp.where(binb > 0, binb, f32(1.0))
    first = jnp.floor((f32(-1.0) - base) * gridb / safe_bin - f32(0.5)) - f32(1.0)
    first = jnp.where(binb > 0, jnp.clip(first, 0.0, jnp.maximum(gridb - 1, 0.0)), 0.0)
    idx = first + k
  valid = idx < gridb
  safe_grid = jnp.where(gridb > 0, gridb, f32(1.0))
  # Same float order as the kernel: start + ph*bin + (i + .5) * bin / grid.
  y = base + exact_div((idx + f32(0.5)) * binb, safe_grid)     # [N, R, S, G]
  valid &= (y >= -1.0) & (y <= size_f)
  y = jnp.maximum(y, 0.0)
  y_low = jnp.floor(y)
  at_end = y_low >= size_f - 1
  y_low = jnp.where(at_end, size_f - 1, y_low)
  y = jnp.where(at_end, y_low, y)
  y_high = jnp.where(at_end, y_low, y_low + 1)
  ly = y - y_low
  hy = f32(1.0) - ly
  w_low = jnp.where(valid, hy, 0.0)
  w_high = jnp.where(valid, ly, 0.0)
  i_low = jnp.clip(y_low, 0, canvas - 1).astype(jnp.int32)
  i_high = jnp.clip(y_high, 0, canvas - 1).astype(jnp.int32)

  def scatter(il, ih, wl, wh):  # [G] -> [canvas]
    return jnp.zeros((canvas,), f32).at[il].add(wl).at[ih].add(wh)

  scat = scatter
  for _ in range(3):
    scat = jax.vmap(scat)
  return scat(i_low, i_high, w_low, w_high), grid


def roi_align(features, boxes, padded_hw, stride: int, output_size: int = 14,
              sampling_ratio: int = 0, aligned: bool = True, max_grid=None,
              precision=HIGHEST):
  """torchvision `roi_align` (CPU kernel) on one pyramid level, batched per image.

  features [N, Hc, Wc, C] (canvas; official map = ceil(padded_hw / stride)),
  boxes [N, R, 4] xyxy resized-image pixels (no gradient flows to them),
  padded_hw [N, 2] official padded input size -> [N, R, S, S, C] (S = output_size).
  sampling_ratio 0 = adaptive grid ceil(roi / S) per bin; > 0 = fixed grid.
  max_grid: optional static window of samples per bin and axis for sampling_ratio 0
  (default 2 * canvas + 6, exact for any box; lower only if grids are known small).
  """
  features = jnp.asarray(features)
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  padded_hw = jnp.asarray(padded_hw, jnp.int32)
  _, hc, wc, _ = features.shape
  map_hw = padding.official_map_hw(padded_hw, stride)         # [N, 2]
  scale = jnp.float32(1.0 / stride)
  common = dict(scale=scale, output_size=output_size, sampling_ratio=sampling_ratio,
                aligned=aligned, max_grid=max_grid)
  ay, gh = _axis_weights(boxes[..., 1], boxes[..., 3], map_hw[:, 0], hc, **common)
  ax, gw = _axis_weights(boxes[..., 0], boxes[..., 2], map_hw[:, 1], wc, **common)
  count = jnp.maximum(gh * gw, 1.0)
  nonempty = (gh > 0) & (gw > 0)
  inv = jnp.where(nonempty, 1.0 / count, 0.0)[..., None, None]  # [N, R, 1, 1]
  ay = ay * inv
  feats = padding.apply_mask(features, padding.hw_mask(map_hw, (hc, wc))[..., None])
  ay = ay.astype(feats.dtype)
  ax = ax.astype(feats.dtype)
  # Contract the longer canvas axis first: the intermediate is [N, R, S, min(Hc, Wc), C].
  # Both contractions are written so that XLA needs no transpose of the (large)
  # intermediate, forward or backward: the first is one GEMM per image with the
  # intermediate in its natural [N, R*S, (canvas, C)] layout, the second a batch over
  # (N, R, S) of small GEMMs [S, canvas] @ [canvas, C] whose output is already
  # [N, R, S, S, C] (the other axis' weights broadcast over the batch, S x smaller).
  s = ay.shape[2]
  if hc >= wc:
    t = jnp.einsum("nrph,nhwc->nrpwc", ay, feats, precision=precision)
    axb = jnp.broadcast_to(ax[:, :, None], ax.shape[:2] + (s,) + ax.shape[2:])
    return jnp.einsum("nrpqw,nrpwc->nrpqc", axb, t, precision=precision)
  t = jnp.einsum("nrqw,nwhc->nrqhc", ax, jnp.swapaxes(feats, 1, 2), precision=precision)
  ayb = jnp.broadcast_to(ay[:, :, None], ay.shape[:2] + (s,) + ay.shape[2:])
  return jnp.swapaxes(jnp.einsum("nrqph,nrqhc->nrqpc", ayb, t, precision=precision), 2, 3)


def multilevel_roi_align(features_list, boxes, levels, padded_hw, strides=(8, 16, 32),
                         output_size: int = 14, sampling_ratio: int = 0, aligned: bool = True,
                         precision=HIGHEST, skip_empty_levels: bool = False):
  """RoIAlign of each RoI on its assigned level (detectron2 ROIPooler).

  features_list: L arrays [N, Hc_l, Wc_l, C]; boxes [N, R, 4]; levels [N, R] int in
  0..L-1 (from `assign_levels`); padded_hw [N, 2] -> [N, R, S, S, C].
  Pools every RoI on every level and selects (cost ~1.31x the P3 pass for strides
  8/16/32; L outputs of [N, R, S, S, C] live at once). skip_empty_levels: a level that no
  RoI of the batch is assigned to is not pooled (`lax.cond`; same result, since none of its
  rows is selected). Worth it for inference (Lite V-19-slim-DW predict -2 %, V-39 -1.6 % when
  the 50 detections all sit on P3); in the train step, where foreground RoIs fill every
  level, it only adds XLA temporaries (+21 MiB for Lite V-19-slim-DW), so there it is off.
  """
  if len(features_list) != len(strides):
    raise ValueError("one stride per feature level expected")
  levels = jnp.asarray(levels, jnp.int32)
  out = None
  for lvl, (feats, stride) in enumerate(zip(features_list, strides)):
    pool = functools.partial(roi_align, feats, boxes, padded_hw, stride,
                             output_size=output_size, sampling_ratio=sampling_ratio,
                             aligned=aligned, precision=precision)
    sel = levels == lvl
    if skip_empty_levels:
      shape = jax.eval_shape(pool)
      pooled = jax.lax.cond(jnp.any(sel), pool, lambda: jnp.zeros(shape.shape, shape.dtype))
    else:
      pooled = pool()
    sel = sel[..., None, None, None]
    out = jnp.where(sel, pooled, 0.0) if out is None else jnp.where(sel, pooled, out)
  return out
