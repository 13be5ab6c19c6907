"""COCO polygon rasterisation (pycocotools `rleFrPoly`) on the device, bit-exact.

What pycocotools does with one polygon on an h x w canvas (re-derived from its C code):
vertices go to a 5x grid as `(int)(5 * x + .5)` (float64, truncation); each edge is
walked one grid step at a time along its major axis, the minor coordinate rounded as
`(int)(start + s * t + .5)` with `s = delta_minor / delta_major` (float64), from the
lower endpoint; every step of the walk between grid columns u = 5c+2 and 5c+3 (c in
[0, w)) is a crossing of pixel column c at row `clamp(ceil((min(v, v') - 2) / 5), 0, h)`,
and a pixel is inside when an odd number of its column's crossings lie at or above it.
`merge` of several polygons is their union.

Here every (edge, column) crossing is computed directly (an edge's walk is monotone, so
it crosses a column at most once), in crossing *slots*: each edge of each RoI gets as many
slots as columns it spans, laid out by a prefix sum over all RoIs; the slot count is a
static bucket picked by `lax.switch` from the real total (so a step pays for the crossings
it has, not for a worst case), up to a cap beyond which the RoIs are flagged. The
float64 steps run under a local `jax.enable_x64` scope on coordinates carried as float64
bits (uint32 pairs), so the result does not depend on the caller's x64 setting. Rounding
ties of the minor coordinate are decided by evaluating pycocotools' own float64 expression
at the candidate steps. Assumes no fused multiply-add contraction of float64 `a * b + c`
(true on XLA:CPU; on GPU, LLVM may contract and flip a rare exact tie).

Polygons of one instance are packed: xy [K, 2] float64 (as uint32 words [K, 2, 2]) and a
part id per vertex [K] (parts contiguous, -1 = unused slot).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

_BIG = 1 << 21  # key packing (part, column, row) in int64; columns/rows are < 2^21


def words_to_f64(w):
  """uint32 [..., 2] (little-endian float64 words, e.g. `np.view(np.uint32)`) -> f64 [...].

  Call inside an x64 scope."""
  lo = w[..., 0].astype(jnp.uint64)
  hi = w[..., 1].astype(jnp.uint64)
  return lax.bitcast_convert_type(lo | (hi << 32), jnp.float64)


def _trunc_i64(x):
  return jnp.trunc(x).astype(jnp.int64)


def _rounded(x):
  """A float64 product kept rounded: XLA contracts `a * b + c` into a fused multiply-add
  (XLA:CPU does; an optimisation barrier does not stop it), which moves exact ties. The
  NaN-guarding select sits between the multiply and the add, so nothing can fuse them."""
  return jnp.where(x == x, x, 0.0)


def _grid(q):
  """float64 coordinate -> pycocotools' 5x grid integer `(int)(5 * q + .5)`."""
  return _trunc_i64(_rounded(5.0 * q) + 0.5)


def _edge_ends(part):
  """part [K] -> index of each vertex's edge end [K] (next vertex of its part, cyclic)."""
  k = part.shape[0]
  idx = jnp.arange(k)
  prev_differs = jnp.concatenate([jnp.ones((1,), bool), part[1:] != part[:-1]])
  next_differs = jnp.concatenate([part[1:] != part[:-1], jnp.ones((1,), bool)])
  start = lax.cummax(jnp.where(prev_differs, idx, 0), axis=0)
  return jnp.where(next_differs, start, idx + 1)


def _crossing_ymin(xa, ya, xb, yb, x):
  """Edge (xa, ya)->(xb, yb) on the 5x grid crossing the gap x | x+1 (int64 arrays) ->
  the smaller grid row of the walk's step across it, as pycocotools computes it."""
  dx, dy = jnp.abs(xb - xa), jnp.abs(yb - ya)
  # x-major walk (dx >= dy): from the left endpoint, v(t) = (int)(yl + s * t + .5).
  left_b = xa > xb
  xl = jnp.where(left_b, xb, xa)
  yl = jnp.where(left_b, yb, ya)
  yr = jnp.where(left_b, ya, yb)
  s = (yr - yl).astype(jnp.float64) / jnp.maximum(dx, 1).astype(jnp.float64)

  def v_at(t):
    return _trunc_i64(yl.astype(jnp.float64) + _rounded(s * t.astype(jnp.float64)) + 0.5)

  y_xmajor = jnp.minimum(v_at(x - xl), v_at(x + 1 - xl))
  # y-major walk (dx < dy): from the lower endpoint, u(t) = (int)(xs + s * t + .5), row ys + t.
  low_b = ya > yb
  xs = jnp.where(low_b, xb, xa)
  ys = jnp.where(low_b, yb, ya)
  xt = jnp.where(low_b, xa, xb)
  n = xt - xs
  sy = n.astype(jnp.float64) / jnp.maximum(dy, 1).astype(jnp.float64)
  right = n > 0

  def pred(t):  # still on the near side of the gap at step t (monotone: true, then false)
    u = _trunc_i64(xs.astype(jnp.float64) + _rounded(sy * t.astype(jnp.float64)) + 0.5)
    return jnp.where(right, u <= x, u >= x + 1)

  # Exact rational last step on the near side; float64 can move it by one at exact ties.
  num = jnp.where(right, (2 * (x - xs) + 1) * dy - 1, (2 * (xs - x) - 1) * dy)
  tc = jnp.clip(jnp.floor_divide(num, jnp.maximum(2 * jnp.abs(n), 1)), 0, dy)
  t_hi = jnp.minimum(tc + 1, dy)
  t_lo = jnp.maximum(tc - 1, 0)
  t_star = jnp.where(pred(t_hi), t_hi, jnp.where(pred(tc), tc, t_lo))
  y_ymajor = ys + t_star
  return jnp.where(dx >= dy, y_xmajor, y_ymajor)


def _crossings(gx, gy, part, ncols, nrows, slots: int):
  """Grid vertices [R, K] int64, part [R, K], canvas columns / rows [R] int64 ->
  slot arrays [slots]: (roi, part, column, row clamped to [0, nrows], valid)."""
  r, k = part.shape
  nxt = jax.vmap(_edge_ends)(part)
  xb = jnp.take_along_axis(gx, nxt, axis=1)
  yb = jnp.take_along_axis(gy, nxt, axis=1)
  lo, hi = jnp.minimum(gx, xb), jnp.maximum(gx, xb)
  c_lo = jnp.maximum(jnp.floor_divide(lo + 2, 5), 0)                # 5c + 2 >= lo
  c_hi = jnp.minimum(jnp.floor_divide(hi - 3, 5), ncols[:, None] - 1)  # 5c + 3 <= hi
  count = jnp.where(part >= 0, jnp.maximum(c_hi - c_lo + 1, 0), 0).reshape(-1)
  cum = jnp.cumsum(count)
  slot = jnp.arange(slots, dtype=jnp.int64)
  e = jnp.minimum(jnp.searchsorted(cum, slot, side="right"), r * k - 1)
  col = c_lo.reshape(-1)[e] + slot - (cum[e] - count[e])
  flat = lambda a: a.reshape(-1)[e]
  ymin = _crossing_ymin(flat(gx), flat(gy), flat(xb), flat(yb), 5 * col + 2)
  roi = e // k
  row = jnp.clip(jnp.floor_divide(ymin + 2, 5), 0, nrows[roi])  # ceil((ymin - 2) / 5)
  return roi, flat(part), col, row, slot < cum[-1]


def _total_slots(gx, part, ncols):
  """Number of crossing slots the RoIs need (cheap pre-pass of `_crossings`)."""
  nxt = jax.vmap(_edge_ends)(part)
  xb = jnp.take_along_axis(gx, nxt, axis=1)
  lo, hi = jnp.minimum(gx, xb), jnp.maximum(gx, xb)
  c_lo = jnp.maximum(jnp.floor_divide(lo + 2, 5), 0)
  c_hi = jnp.minimum(jnp.floor_divide(hi - 3, 5), ncols[:, None] - 1)
  return jnp.sum(jnp.where(part >= 0, jnp.maximum(c_hi - c_lo + 1, 0), 0))


def _bucketed(fn, total, buckets, *args):
  """Runs fn(slots, *args) with the smallest bucket >= total (the last one if none)."""
  idx = jnp.minimum(jnp.sum(total > jnp.asarray(buckets)), len(buckets) - 1)
  return lax.switch(idx.astype(jnp.int32), [lambda *a, n=n: fn(n, *a) for n in buckets], *args)


def _masks(slots, gx, gy, part, mask_size: int, num_parts: int):
  """[R, K] grid vertices of the scaled polygons -> bool [R, S, S] (union of parts)."""
  r = part.shape[0]
  n = jnp.full((r,), mask_size, jnp.int64)
  roi, pid, col, row, ok = _crossings(gx, gy, part, n, n, slots)
  toggles = jnp.zeros((r, num_parts, mask_size + 1, mask_size), jnp.uint8)
  toggles = toggles.at[roi, jnp.clip(pid, 0, num_parts - 1), row,
                       jnp.clip(col, 0, mask_size - 1)].add(ok.astype(jnp.uint8))
  inside = (jnp.cumsum(toggles, axis=2, dtype=jnp.uint8)[:, :, :mask_size] & 1).astype(bool)
  return jnp.any(inside, axis=1)


def _crop_areas(slots, gx, gy, part, wi, hi, num_parts: int):
  """[R, K] grid vertices of the shifted polygons, canvas [R] -> int64 [R]: summed
  pycocotools area of each part on its int(h) x int(w) canvas."""
  r = part.shape[0]
  # pycocotools compares columns with w - 1 in unsigned size_t: w = 0 bounds nothing.
  ncols = jnp.where(wi > 0, wi, _BIG - 1)
  roi, pid, col, row, ok = _crossings(gx, gy, part, ncols, hi, slots)
  seg = roi * num_parts + jnp.clip(pid, 0, num_parts - 1)
  # Sorted (roi, part, column, row) keys: every column of every part has an even number
  # of crossings, so pairs (2i, 2i+1) bound the inside runs; unused slots sort last.
  key = (seg * _BIG + col) * _BIG + row
  key = jnp.sort(jnp.where(ok, key, jnp.iinfo(jnp.int64).max))
  pair_roi = jnp.where(key[0::2] == jnp.iinfo(jnp.int64).max, r, key[0::2] // (_BIG * _BIG)
                       // num_parts)
  area = jax.ops.segment_sum(key[1::2] - key[0::2], pair_roi, num_segments=r + 1)[:r]
  # w = 0: the run-length terminator h * w = 0 sorts first and inverts the parity; the
  # area is then (last crossing position col * h + row) - (the parity area), per part.
  last = jax.ops.segment_max(jnp.where(ok, col * hi[roi] + row, 0), jnp.where(ok, seg, r * num_parts),
                             num_segments=r * num_parts + 1)[:-1]
  last = jnp.sum(jnp.maximum(last, 0).reshape(r, num_parts), axis=1)
  return jnp.where(wi > 0, area, last - area)


MASK_BUCKETS = (1 << 12, 1 << 14, 1 << 16, 1 << 18)
AREA_BUCKETS = (1 << 14, 1 << 16, 1 << 18, 1 << 20)


def _as_f64(x, shape):
  """uint32 float64 words [..., 2] or a float array -> float64 reshaped (x64 scope)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.uint32:
    return jnp.reshape(words_to_f64(x), shape)
  return jnp.reshape(x, shape).astype(jnp.float64)


def roi_mask_targets(boxes, poly_xy, poly_part, poly_area, roi_valid, *,
                     mask_size: int = 28, num_parts: int = 16,
                     mask_buckets=MASK_BUCKETS, area_buckets=AREA_BUCKETS):
  """28x28 mask targets and MaskIoU crop-area ratios of RoIs, bit-exact to pycocotools.

  boxes [..., 4] float32 RoI boxes; poly_xy [..., K, 2, 2] uint32: float64 bits of the
  matched GT's packed vertices (x, y) (or [..., K, 2] float: converted to float64);
  poly_part [..., K] int32 part ids (< num_parts, -1 unused); poly_area [..., 2] uint32
  float64 bits of the GT's summed shoelace area (or [...] float); roi_valid [...] bool.
  -> (targets bool [..., S, S] (row, column), ratio float32 [...], overflow bool []
  (more crossings than the largest slot bucket: outputs incomplete)).
  Targets: detectron2 `rasterize_polygons_within_box` (shift by (x0, y0), scale by
  S / max(w, 0.1), S / max(h, 0.1), frPyObjects + merge + decode). Ratio: summed per-part
  areas on the unscaled int(h) x int(w) canvas / area, clamped to [0, 1], 0 for area 0.
  """
  lead = boxes.shape[:-1]
  k = poly_part.shape[-1]
  with jax.enable_x64(True):
    xy = _as_f64(poly_xy, (-1, k, 2))
    area = _as_f64(poly_area, (-1,))
    b = jnp.reshape(boxes, (-1, 4)).astype(jnp.float32)
    valid = jnp.reshape(roi_valid, (-1,))
    part = jnp.where(valid[:, None], jnp.reshape(poly_part, (-1, k)), -1).astype(jnp.int64)
    x0 = b[:, 0:1].astype(jnp.float64)
    y0 = b[:, 1:2].astype(jnp.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    # 28x28 targets. detectron2: S / max(w, 0.1) with float32 w, or the Python float S / 0.1.
    s = jnp.float32(mask_size)
    rw = jnp.where(w < jnp.float32(0.1), mask_size / 0.1, (s / w).astype(jnp.float64))
    rh = jnp.where(h < jnp.float32(0.1), mask_size / 0.1, (s / h).astype(jnp.float64))
    gx = _grid((xy[..., 0] - x0) * rw[:, None])
    gy = _grid((xy[..., 1] - y0) * rh[:, None])
    n = jnp.full(part.shape[:1], mask_size, jnp.int64)
    total_m = _total_slots(gx, part, n)
    masks = _bucketed(functools.partial(_masks, mask_size=mask_size, num_parts=num_parts),
                      total_m, mask_buckets, gx, gy, part)
    # MaskIoU ratio: unscaled shift, canvas int(h) x int(w).
    wi = jnp.maximum(jnp.trunc(w), 0).astype(jnp.int64)
    hi = jnp.maximum(jnp.trunc(h), 0).astype(jnp.int64)
    gx = _grid(xy[..., 0] - x0)
    gy = _grid(xy[..., 1] - y0)
    total_a = _total_slots(gx, part, jnp.where(wi > 0, wi, _BIG - 1))
    crop = _bucketed(functools.partial(_crop_areas, num_parts=num_parts), total_a,
                     area_buckets, gx, gy, part, wi, hi)
    ratio = jnp.where(area > 0, jnp.clip(crop.astype(jnp.float64) / jnp.where(
        area > 0, area, 1.0), 0.0, 1.0), 0.0).astype(jnp.float32)
    over = (total_m > mask_buckets[-1]) | (total_a > area_buckets[-1])
  return (masks.reshape(lead + (mask_size, mask_size)), ratio.reshape(lead), over)
