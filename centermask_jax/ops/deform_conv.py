"""Modulated deformable convolution (DCNv2) in jax.numpy, NHWC, static shapes.

Semantics are those of detectron2's `modulated_deform_conv` CUDA kernel (groups=1,
deformable_groups=1), which centermask2's `*_dcn_*` VoVNets use:

* output size `(H + 2p - (d(k-1)+1)) // s + 1` per axis, as a dense conv;
* kernel point `t = i * kw + j` (row-major over the kernel) samples the input at
  `y = yo*s - p + i*d + offset[..., 2t]`, `x = xo*s - p + j*d + offset[..., 2t+1]`
  (offset channels are interleaved (dy, dx) per kernel point);
* a sample outside the open box `(-1, H) x (-1, W)` contributes 0; otherwise it is
  the bilinear mix of its 4 integer neighbours, each neighbour outside the map read
  as 0;
* the sample is multiplied by `mask[..., t]` before the contraction with the weights.

Padding exactness: `valid_hw` [N, 2] gives each image's official map size
(`ops.padding.official_map_hw`: rows, cols of the tensor detectron2 would have). H and W of the rule above are taken from
it, per image, and nothing outside it is read, so a larger canvas gives the same
numbers in the official region.

Formulations with the same arithmetic per sample (`impl`):
* "gather" (default): the input is zero-padded by 1 pixel and zeroed outside the
  official map, so the 4 neighbours of every sample are 4 row gathers at fixed offsets
  summed with the bilinear weights, then one (K*C) contraction with the weights. Its
  backward is hand-written (`jax.custom_vjp`): d input is ONE scatter-add of the 4*M
  neighbour rows, d offset / d mask are batched row dots of d sample with gather mixes,
  and only the inputs are kept between forward and backward.
* "gather_autodiff": the same forward differentiated by JAX (the test reference for the
  hand-written backward).
* "naive": a loop over kernel points (4 gathers and one C-contraction per point),
  autodiff.
All are differentiable w.r.t. input, offset, mask and weight; autodiff equals the
kernel's hand-written backward (bilinear weights are piecewise linear in the position;
floor() is locally constant). `benchmarks/deform_conv.py` compares them with a dense conv.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from centermask_jax.ops import numerics

IMPLS = ("gather", "gather_autodiff", "naive")


def out_size(n: int, k: int, stride: int, padding: int, dilation: int) -> int:
  """Output length of a (deformable) conv along one axis, as PyTorch."""
  return (n + 2 * padding - (dilation * (k - 1) + 1)) // stride + 1


def _sample_points(offset, kh, kw, stride, padding, dilation):
  """offset [N, Ho, Wo, 2*kh*kw] -> sample rows, cols [N, Ho, Wo, kh*kw] (offset dtype)."""
  n, ho, wo, _ = offset.shape
  ki = jnp.repeat(jnp.arange(kh), kw)  # kernel row of point t
  kj = jnp.tile(jnp.arange(kw), kh)  # kernel col of point t
  base_y = (jnp.arange(ho) * stride - padding)[:, None] + ki[None, :] * dilation  # [Ho, K]
  base_x = (jnp.arange(wo) * stride - padding)[:, None] + kj[None, :] * dilation  # [Wo, K]
  off = offset.reshape(n, ho, wo, kh * kw, 2)
  ys = base_y[None, :, None, :].astype(offset.dtype) + off[..., 0]
  xs = base_x[None, None, :, :].astype(offset.dtype) + off[..., 1]
  return ys, xs


def _bilinear_taps(ys, xs, valid_h, valid_w):
  """Neighbour indices and weights of each sample, with the kernel's validity rules.

  ys, xs [N, ...]; valid_h, valid_w [N] int -> (rows, cols, weights), each a list of 4
  arrays shaped like ys (corners low-low, low-high, high-low, high-high); weights are 0
  for neighbours outside the map and for samples outside (-1, H) x (-1, W).
  """
  shape = (-1,) + (1,) * (ys.ndim - 1)
  hv = valid_h.reshape(shape)
  wv = valid_w.reshape(shape)
  y0f = jnp.floor(ys)
  x0f = jnp.floor(xs)
  ly = ys - y0f
  lx = xs - x0f
  hy = 1 - ly
  hx = 1 - lx
  y0 = y0f.astype(jnp.int32)
  x0 = x0f.astype(jnp.int32)
  y1 = y0 + 1
  x1 = x0 + 1
  inside = (ys > -1) & (xs > -1) & (ys < hv.astype(ys.dtype)) & (xs < wv.astype(xs.dtype))
  ok_y0 = y0 >= 0
  ok_x0 = x0 >= 0
  ok_y1 = y1 <= hv - 1
  ok_x1 = x1 <= wv - 1
  zero = jnp.zeros((), ys.dtype)
  rows = [y0, y0, y1, y1]
  cols = [x0, x1, x0, x1]
  weights = [jnp.where(inside & ok_y0 & ok_x0, hy * hx, zero),
             jnp.where(inside & ok_y0 & ok_x1, hy * lx, zero),
             jnp.where(inside & ok_y1 & ok_x0, ly * hx, zero),
             jnp.where(inside & ok_y1 & ok_x1, ly * lx, zero)]
  return rows, cols, weights


def _gather(x_flat, rows, cols, width):
  """x_flat [N, H*W, C], rows/cols [N, ...] int -> [N, ..., C] (indices clamped; callers
  zero the weight of out-of-map neighbours)."""
  n, hw, c = x_flat.shape
  idx = jnp.clip(rows, 0, hw // width - 1) * width + jnp.clip(cols, 0, width - 1)
  # Row gather (slices of C contiguous values) per image.
  g = jax.vmap(lambda xf, ix: jnp.take(xf, ix, axis=0, mode="clip"))(x_flat, idx.reshape(n, -1))
  return g.reshape(rows.shape + (c,))


def _region(h, w, valid_h, valid_w):
  """[N, H, W, 1] bool: inside each image's official map."""
  rows = jnp.arange(h)[None, :, None] < valid_h[:, None, None]
  cols = jnp.arange(w)[None, None, :] < valid_w[:, None, None]
  return (rows & cols)[..., None]


def _zero_padded(x, region):
  """x [N, H, W, C] -> [N, (H+2)*(W+2), C]: x with a 1-pixel zero border, 0 outside the
  official map, so a neighbour outside the map reads 0 (the kernel's corner-wise rule)."""
  n, h, w, c = x.shape
  xp = jnp.pad(jnp.where(region, x, jnp.zeros((), x.dtype)), ((0, 0), (1, 1), (1, 1), (0, 0)))
  return xp.reshape(n, (h + 2) * (w + 2), c)


class _Taps(NamedTuple):
  """Sample geometry on the zero-padded map, each [N, M] (M = Ho*Wo*K samples)."""
  idx: jax.Array  # int32 padded-map row of the low-low neighbour; +1, +(W+2), +(W+3) the others
  hy: jax.Array  # float32 1 - ly (ly = y - floor(y)), likewise hx, lx
  ly: jax.Array
  hx: jax.Array
  lx: jax.Array
  inside: jax.Array  # bool: the sample lies in (-1, H) x (-1, W) (else it contributes 0)

  def weights(self):
    """Bilinear weights of the 4 neighbours (ll, lh, hl, hh), 0 outside, float32."""
    zero = jnp.zeros((), jnp.float32)
    return [jnp.where(self.inside, a * b, zero)
            for a, b in ((self.hy, self.hx), (self.hy, self.lx), (self.ly, self.hx),
                         (self.ly, self.lx))]


def _padded_taps(offset, valid_hw, h, w, kh, kw, stride, padding, dilation):
  """offset [N, Ho, Wo, 2K], valid_hw [N, 2] -> _Taps."""
  n = offset.shape[0]
  ys, xs = _sample_points(offset.astype(jnp.float32), kh, kw, stride, padding, dilation)
  ys, xs = ys.reshape(n, -1), xs.reshape(n, -1)
  inside = ((ys > -1) & (xs > -1) & (ys < valid_hw[:, :1].astype(jnp.float32))
            & (xs < valid_hw[:, 1:].astype(jnp.float32)))
  y0f, x0f = jnp.floor(ys), jnp.floor(xs)
  ly, lx = ys - y0f, xs - x0f
  # Padded row / col of the low neighbour: y0 + 1 in [0, H] for every sample inside
  # (clamped otherwise: weight 0).
  r = jnp.clip(y0f.astype(jnp.int32) + 1, 0, h)
  q = jnp.clip(x0f.astype(jnp.int32) + 1, 0, w)
  return _Taps(r * (w + 2) + q, 1 - ly, ly, 1 - lx, lx, inside)


def _neighbour_offsets(w):
  return (0, 1, w + 2, w + 3)  # ll, lh, hl, hh on the padded map


def _take_rows(xp, idx):
  """xp [N, R, C], idx [N, M] -> [N, M, C] (row gathers of C contiguous values)."""
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=0, mode="clip"))(xp, idx)


def _mix(xp, idx, w, coeffs):
  """sum_j coeffs[j] * xp[idx + offset_j] over the 4 neighbours -> [N, M, C]: 4 row
  gathers and an elementwise sum (ll + lh + hl + hh, the kernel's order).
  coeffs: 4 arrays [N, M] (None: that neighbour is skipped)."""
  out = None
  for o, cf in zip(_neighbour_offsets(w), coeffs):
    if cf is not None:
      term = _take_rows(xp, idx + o) * cf.astype(xp.dtype)[..., None]
      out = term if out is None else out + term
  return out


def _canvas_forward(x, offset, mask, weight, valid_hw, kh, kw, stride, padding, dilation):
  """The "gather" formulation: samples of all K points, masked, one (K*C) contraction."""
  n, h, w, c = x.shape
  _, ho, wo, k = mask.shape
  taps = _padded_taps(offset, valid_hw, h, w, kh, kw, stride, padding, dilation)
  xp = _zero_padded(x, _region(h, w, valid_hw[:, 0], valid_hw[:, 1]))
  cols = _mix(xp, taps.idx, w, taps.weights()) * mask.astype(x.dtype).reshape(n, -1, 1)
  y = cols.reshape(n * ho * wo, k * c) @ weight.reshape(k * c, -1).astype(x.dtype)
  return y.reshape(n, ho, wo, -1)


def _rowdot(a, b):
  """[N, M, C] x [N, M, C] -> [N, M] sum over C (as a batched dot: XLA:CPU's minor-axis
  reduce is ~50x slower than its dot here)."""
  return jnp.einsum("nmc,nmc->nm", a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _gather_op(x, offset, mask, weight, valid_hw, kh, kw, stride, padding, dilation):
  return _canvas_forward(x, offset, mask, weight, valid_hw, kh, kw, stride, padding, dilation)


def _gather_op_fwd(x, offset, mask, weight, valid_hw, kh, kw, stride, padding, dilation):
  # Only the inputs are kept: the backward gathers again (cheaper than holding
  # [N, Ho*Wo*K, C] samples of every DCN layer until the backward).
  y = _canvas_forward(x, offset, mask, weight, valid_hw, kh, kw, stride, padding, dilation)
  return y, (x, offset, mask, weight, valid_hw)


def _gather_op_bwd(kh, kw, stride, padding, dilation, res, gy):
  """The kernel's backward (weight GEMM, col2im, col2im_coord) in a form XLA:CPU runs
  well: d input as ONE scatter-add of all 4*M neighbour rows; d offset and d mask as
  batched row dots of d sample with gather mixes (the position derivatives of the
  bilinear weights); no reduce over the channel axis."""
  x, offset, mask, weight, valid_hw = res
  # The re-gathers below must not be merged (CSE) with the forward's identical ones: that
  # would keep every layer's forward gathers, samples and columns alive until its backward.
  x = numerics.after(x, gy)
  n, h, w, c = x.shape
  _, ho, wo, k = mask.shape
  o = weight.shape[-1]
  dt = x.dtype
  region = _region(h, w, valid_hw[:, 0], valid_hw[:, 1])
  t = _padded_taps(offset, valid_hw, h, w, kh, kw, stride, padding, dilation)
  wts = t.weights()
  xp = _zero_padded(x, region)
  samples = _mix(xp, t.idx, w, wts)  # [N, M, C]
  msk = mask.astype(dt).reshape(n, -1, 1)
  gy2 = gy.astype(dt).reshape(n * ho * wo, o)
  w2 = weight.reshape(k * c, o).astype(dt)
  gweight = ((samples * msk).reshape(n * ho * wo, k * c).T @ gy2).reshape(weight.shape)
  gcols = (gy2 @ w2.T).reshape(n, -1, c)
  gmask = _rowdot(gcols, samples).reshape(mask.shape)
  gs = gcols * msk  # d loss / d sample [N, M, C]
  # d sample / d y = hx (v_hl - v_ll) + lx (v_hh - v_lh), d / d x likewise (floor() is
  # locally constant); 0 for samples outside.
  zero = jnp.zeros((), jnp.float32)
  gys = _rowdot(gs, _mix(xp, t.idx, w, (-t.hx, -t.lx, t.hx, t.lx))).astype(jnp.float32)
  gxs = _rowdot(gs, _mix(xp, t.idx, w, (-t.hy, t.hy, -t.ly, t.ly))).astype(jnp.float32)
  goffset = jnp.stack([jnp.where(t.inside, gys, zero), jnp.where(t.inside, gxs, zero)], -1)
  # d input: one scatter-add of the 4 neighbours' rows of all images onto the padded maps.
  hw2 = (h + 2) * (w + 2)
  rows = (t.idx[..., None] + jnp.asarray(_neighbour_offsets(w), jnp.int32)
          + (jnp.arange(n, dtype=jnp.int32) * hw2)[:, None, None])  # [N, M, 4]
  upd = gs[:, :, None, :] * jnp.stack(wts, -1).astype(dt)[..., None]  # [N, M, 4, C]
  gxp = jnp.zeros((n * hw2, c), dt).at[rows.reshape(-1)].add(upd.reshape(-1, c))
  gx = jnp.where(region, gxp.reshape(n, h + 2, w + 2, c)[:, 1:-1, 1:-1], jnp.zeros((), dt))
  return (gx, goffset.reshape(offset.shape).astype(offset.dtype), gmask.astype(mask.dtype),
          gweight.astype(weight.dtype), None)


_gather_op.defvjp(_gather_op_fwd, _gather_op_bwd)


def modulated_deform_conv(x, offset, mask, weight, bias=None, *, stride: int = 1,
                          padding: int = 0, dilation: int = 1, valid_hw=None,
                          impl: str = "gather"):
  """Modulated deformable conv v2 (groups=1, deformable_groups=1).

  x [N, H, W, C]; offset [N, Ho, Wo, 2*kh*kw] (interleaved dy, dx per kernel point);
  mask [N, Ho, Wo, kh*kw]; weight [kh, kw, C, O] (HWIO); bias [O] or None;
  valid_hw [N, 2] int official input map size (None: the whole canvas)
  -> [N, Ho, Wo, O] in x's dtype.
  """
  n, h, w, c = x.shape
  kh, kw, cin, cout = weight.shape
  if cin != c:
    raise ValueError(f"weight expects {cin} input channels, x has {c}")
  ho = out_size(h, kh, stride, padding, dilation)
  wo = out_size(w, kw, stride, padding, dilation)
  k = kh * kw
  if offset.shape != (n, ho, wo, 2 * k):
    raise ValueError(f"offset shape {offset.shape}, expected {(n, ho, wo, 2 * k)}")
  if mask.shape != (n, ho, wo, k):
    raise ValueError(f"mask shape {mask.shape}, expected {(n, ho, wo, k)}")
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
  if valid_hw is None:
    valid_hw = jnp.broadcast_to(jnp.array([h, w], jnp.int32), (n, 2))
  valid_hw = jnp.asarray(valid_hw, jnp.int32)
  if impl == "gather":
    y = _gather_op(x, offset, mask, weight, valid_hw, kh, kw, stride, padding, dilation)
  elif impl == "gather_autodiff":
    y = _canvas_forward(x, offset, mask, weight, valid_hw, kh, kw, stride, padding, dilation)
  else:
    # Sample positions in float32 (as the kernel in fp32), whatever the compute dtype.
    ys, xs = _sample_points(offset.astype(jnp.float32), kh, kw, stride, padding, dilation)
    rows, cols, taps = _bilinear_taps(ys, xs, valid_hw[:, 0], valid_hw[:, 1])
    x_flat = x.reshape(n, h * w, c)
    mask = mask.astype(x.dtype)
    y = jnp.zeros((n, ho, wo, cout), x.dtype)
    wk = weight.reshape(k, c, cout).astype(x.dtype)
    for t in range(k):
      s = 0
      for r, q, tw in zip(rows, cols, taps):
        s = s + _gather(x_flat, r[..., t], q[..., t], w) * tw[..., t].astype(x.dtype)[..., None]
      y = y + jnp.einsum("nhwc,co->nhwo", s * mask[..., t:t + 1], wk[t])
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y
