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

Two formulations with identical arithmetic per sample: `impl="gather"` (default)
gathers each of the 4 neighbours for all kh*kw points at once (row gathers of C values)
and does one contraction over (kh*kw*C) with the weights; `impl="naive"` loops over
kernel points (4 gathers and one C-contraction per point). `benchmarks/deform_conv.py`
compares them: on CPU "naive" runs faster, "gather" compiles ~5x faster (forward+backward),
which is why it is the default of the models. Both are differentiable w.r.t. input, offset, mask and weight by autodiff,
which equals the kernel's hand-written backward (bilinear weights are piecewise
linear in the position; floor() is locally constant).
"""
from typing import Optional

import jax
import jax.numpy as jnp

IMPLS = ("gather", "naive")


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
  # Sample positions in float32 (as the kernel in fp32), whatever the compute dtype.
  ys, xs = _sample_points(offset.astype(jnp.float32), kh, kw, stride, padding, dilation)
  rows, cols, taps = _bilinear_taps(ys, xs, valid_hw[:, 0], valid_hw[:, 1])
  x_flat = x.reshape(n, h * w, c)
  mask = mask.astype(x.dtype)
  if impl == "gather":
    # Each of the 4 neighbours gathered for all K points at once ([N, Ho, Wo, K, C], the
    # gathers fuse with the bilinear mix), masked, then a single contraction over (K, C).
    samples = sum(_gather(x_flat, r, q, w) * t.astype(x.dtype)[..., None]
                  for r, q, t in zip(rows, cols, taps))
    cols_ = (samples * mask[..., None]).reshape(n * ho * wo, k * c)
    y = (cols_ @ weight.reshape(k * c, cout).astype(x.dtype)).reshape(n, ho, wo, cout)
  else:
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
