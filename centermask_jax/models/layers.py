"""Shared layers (NHWC). Padding exactness: the region masks and masked statistics come
from `centermask_jax.ops.padding` (convs mask their input when k > 1, GroupNorm takes
statistics over the region, max-pooling fills -inf outside it).

Naming: Flax module names mirror the PyTorch module paths of centermask2, with
'/' written as ':' (e.g. 'stem.stem_1:conv'), so that
`checkpoints.official` maps every leaf to its state-dict key mechanically.
Leaf names: kernel -> weight, scale (GroupNorm) -> weight, bias -> bias,
scalar (FCOS Scale) -> scale; FrozenBN buffers live in the 'frozen_bn'
collection under their PyTorch names.
"""
import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from centermask_jax.ops import kernels, numerics
from centermask_jax.ops.deform_conv import modulated_deform_conv
from centermask_jax.ops.numerics import exact_div
from centermask_jax.ops.padding import apply_mask, group_sums, masked_group_stats

FROZEN_BN = "frozen_bn"


class Conv(nn.Module):
  """Conv2d with PyTorch semantics (symmetric zero padding `pad`).

  x [N, H, W, Cin] -> [N, H', W', features]. The input is masked first when
  kernel_size > 1 so padding beyond the official region matches detectron2.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  pad: Optional[int] = None
  groups: int = 1
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x, mask=None):
    pad = (self.kernel_size - 1) // 2 if self.pad is None else self.pad
    if self.kernel_size > 1:
      x = apply_mask(x, mask)
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
    dtype = self.dtype or x.dtype
    y = kernels.conv2d(x.astype(dtype), kernel.astype(dtype), self.stride, pad, self.groups)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(dtype)
    return y


class ConvKernel(nn.Module):
  """Only the `kernel` parameter of a bias-free `Conv` (the same leaf, init and name), for
  ops that take several layers' kernels at once (`depthwise_pointwise`).
  () -> float32 `shape`, (k, k, Cin / groups, Cout)."""
  shape: Tuple[int, ...]
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self):
    return self.param("kernel", self.kernel_init, tuple(self.shape), jnp.float32)


def depthwise_pointwise(x, mask, kdw, kpw, stride: int = 1):
  """`Conv(C, 3, stride, groups=C)(x, mask)` then `Conv(D, 1)` (both bias-free) from their
  kernels kdw [3, 3, 1, C], kpw [1, 1, C, D] (`ConvKernel`): x [N, H, W, C] -> [N, H', W', D]
  through `kernels.depthwise_pointwise` (the same numbers; on CPU its backward recomputes the
  depthwise output instead of keeping it)."""
  x = apply_mask(x, mask)
  return kernels.depthwise_pointwise(x, kdw.astype(x.dtype), kpw.astype(x.dtype), stride,
                                     (kdw.shape[0] - 1) // 2)


class ModulatedDeformConv(nn.Module):
  """detectron2 ModulatedDeformConv (3x3 by default, groups = deformable groups = 1).

  x [N, H, W, Cin], offset [N, H', W', 2*k*k], mask_dcn [N, H', W', k*k] (after sigmoid),
  valid_hw [N, 2] official map size of x (`ops.padding.official_map_hw`) or None
  -> [N, H', W', features]. Samples follow detectron2's rule on the official map, so a
  larger canvas changes nothing in the region.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  pad: int = 1
  use_bias: bool = False
  impl: str = "gather"
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, offset, mask_dcn, valid_hw=None):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    return modulated_deform_conv(
        x, offset, mask_dcn, kernel, bias, stride=self.stride, padding=self.pad,
        valid_hw=valid_hw, impl=self.impl)


class FrozenBN(nn.Module):
  """detectron2 FrozenBatchNorm2d: fixed per-channel affine from 4 buffers (eps 1e-5).

  Buffers live in the non-trainable 'frozen_bn' collection; fresh init has
  running_var = 1 - eps so the op is the identity. Arithmetic as PyTorch's CPU
  F.batch_norm (eval): a = w * (1 / sqrt(var + eps)) with an IEEE division (XLA's rsqrt
  is not correctly rounded), y = x * a + (b - mean * a), which XLA:CPU contracts to the
  same two FMAs: bit-identical to detectron2's eval-mode FrozenBN (docs/PARITY.md).
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x=None, *, channels: Optional[int] = None):
    """x [..., C] -> x * scale + shift; with x None, (scale, shift) [channels] each (for
    `frozen_bn_apply` inside a pure function)."""
    c = x.shape[-1] if x is not None else channels
    w = self.variable(FROZEN_BN, "weight", lambda: jnp.ones((c,), jnp.float32)).value
    b = self.variable(FROZEN_BN, "bias", lambda: jnp.zeros((c,), jnp.float32)).value
    rm = self.variable(FROZEN_BN, "running_mean", lambda: jnp.zeros((c,), jnp.float32)).value
    rv = self.variable(FROZEN_BN, "running_var",
                       lambda: jnp.full((c,), 1.0 - self.eps, jnp.float32)).value
    scale = w * exact_div(jnp.ones((), jnp.float32), jnp.sqrt(rv + self.eps))
    shift = b - rm * scale
    return (scale, shift) if x is None else frozen_bn_apply(x, scale, shift)


def frozen_bn_apply(x, scale, shift):
  """`FrozenBN`'s affine: x [..., C], scale / shift [C] float32 -> x * scale + shift."""
  return x * scale.astype(x.dtype) + shift.astype(x.dtype)


class MaskedGroupNorm(nn.Module):
  """GroupNorm (PyTorch semantics, biased variance) with statistics over the
  official region only, then ReLU when `relu` (one `group_norm`: its backward keeps only
  the input). x [N, H, W, C], mask [N, H, W, 1] or None -> [N, H, W, C]."""
  num_groups: int = 32
  eps: float = 1e-5
  relu: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(x, mask, scale, bias, self.num_groups, self.eps, self.relu)


def _group_norm(x, mask, scale, bias, num_groups: int, eps: float, relu: bool):
  """`group_norm`'s forward: x [N, H, W, C] -> [N, H, W, C]."""
  n, h, w, c = x.shape
  xm, mean, var, _ = masked_group_stats(x, mask, num_groups)
  y = (xm - mean) * jax.lax.rsqrt(var + eps) * scale + bias
  y = y.astype(x.dtype).reshape(n, h, w, c)
  return jax.nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def group_norm(x, mask, scale, bias, num_groups: int, eps: float, relu: bool = False):
  """Masked GroupNorm (statistics over the region), then ReLU when `relu`:
  x [N, H, W, C], mask [N, H, W, 1] or None, scale / bias [C] -> [N, H, W, C].

  The backward keeps only the input, recomputes the statistics from it (after the
  cotangent, `numerics.after`) and applies the closed form of the gradient: with
  x^ = (x - mean) * r, r = 1 / sqrt(var + eps), g' = g * scale (ReLU's mask applied),
  dx = r * (g' - (sum g' + x^ * sum g' x^) / count) inside the region, 0 outside (sums
  over the group, outside-region positions included: their x^ depends on the statistics
  too), dscale = sum g x^, dbias = sum g. Two passes over x and g besides the statistics'
  two; autodiff of the forward made about twice as many (FCOS tower P3 GroupNorm + ReLU,
  2x108x100x128: forward and backward 42 -> 9 ms) and had kept the centred and the
  normalised input of every layer for the backward."""
  return _group_norm(x, mask, scale, bias, num_groups, eps, relu)


def _group_norm_fwd(x, mask, scale, bias, num_groups, eps, relu):
  return _group_norm(x, mask, scale, bias, num_groups, eps, relu), (x, mask, scale, bias)


def _group_norm_bwd(num_groups, eps, relu, res, g):
  x, mask, scale, bias = res
  n, h, w, c = x.shape
  xm, mean, var, count = masked_group_stats(numerics.after(x, g), mask, num_groups)
  r = jax.lax.rsqrt(var + eps)
  xhat = (xm - mean) * r
  gy = g.reshape(n, h * w, c).astype(jnp.float32)
  if relu:
    gy = jnp.where(xhat * scale + bias > 0, gy, jnp.zeros((), gy.dtype))
  s1, s2 = jnp.sum(gy, axis=1), jnp.sum(gy * xhat, axis=1)  # [N, C]
  a = group_sums(s1 * scale, num_groups)[:, None, :] / count
  b = group_sums(s2 * scale, num_groups)[:, None, :] / count
  dx = r * (gy * scale - (a + xhat * b))
  if mask is not None:
    dx = apply_mask(dx, mask.reshape(n, h * w, 1))
  dx = dx.astype(x.dtype).reshape(n, h, w, c)
  return (dx, jax.tree_util.tree_map(jnp.zeros_like, mask), jnp.sum(s2, axis=0),
          jnp.sum(s1, axis=0))


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def relu(x, top: Optional[float] = None):
  """max(x, 0) (`jax.nn.relu`), or min(max(x, 0), top) (top 6: `jax.nn.relu6`). Under
  differentiation the output y is made once (`numerics.materialize`) and the gradient
  g * (0 < y < top) is taken from it, as PyTorch's in-place ReLU / ReLU6 backward does
  (the same mask as from x, 0 at both edges and for NaN). XLA:CPU had recomputed y and the
  mask from the pre-activation in the backward's loops, keeping that alive as well where
  y itself is kept (an OSA concat conv's output, read by the eSE product; MobileNetV2's
  expansion output, read by its depthwise conv's backward)."""
  y = jnp.maximum(x, jnp.zeros((), x.dtype))
  return y if top is None else jnp.minimum(y, jnp.asarray(top, x.dtype))


def _relu_fwd(x, top):
  y = numerics.materialize(relu(x, top))
  return y, y


def _relu_bwd(top, y, g):
  keep = y > 0 if top is None else (y > 0) & (y < jnp.asarray(top, y.dtype))
  return (jnp.where(keep, g, jnp.zeros((), g.dtype)),)


relu.defvjp(_relu_fwd, _relu_bwd)
relu6 = functools.partial(relu, top=6.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def relu_chain_concat(layer, width: int, x0, x, mask, params):
  """An OSA block's layer chain and its concatenation: x_1 = relu(layer(x or x0, mask,
  params[0])), x_i = relu(layer(x_{i-1}, mask, params[i-1])), -> concat([x0, x_1, ..., x_n],
  -1). layer(x [N, H, W, C], mask, p) -> [N, H, W, width] is the pre-activation (a pure,
  differentiable function); x0 [N, H, W, C0]; x: the first layer's input when it is not x0
  (a reduction of it), else None; mask: the region, passed to `layer`.

  The backward keeps only the concatenation (and x) and reads each x_i from it: the next
  conv's input and the ReLU's mask (`relu`'s rule, g * (x_i > 0)). Autodiff kept every x_i
  as well, the same numbers twice (V-39 stage 2: 5 x 77 MiB at 896x1408). Per layer it
  differentiates `layer` as autodiff would; the cotangents of x_{i-1} are summed in the
  same two terms (concat slice + layer input)."""
  xs, h = [x0], x0 if x is None else x
  for p in params:
    h = relu(layer(h, mask, p))
    xs.append(h)
  return jnp.concatenate(xs, -1)


def _relu_chain_concat_fwd(layer, width, x0, x, mask, params):
  # Materialised: XLA would otherwise read the backward's slices of the concatenation
  # from its operands (slice of a concatenate), keeping each layer's output alive again.
  cat = numerics.materialize(relu_chain_concat(layer, width, x0, x, mask, params))
  return cat, (cat, x, mask, params)


def _relu_chain_concat_bwd(layer, width, res, g):
  cat, x, mask, params = res
  n = len(params)
  c0 = cat.shape[-1] - n * width

  def piece(t, i):  # x_i's channels of the concatenation (i = 0: x0's)
    lo = 0 if i == 0 else c0 + (i - 1) * width
    return jax.lax.slice_in_dim(t, lo, c0 + i * width, axis=t.ndim - 1)

  dx = piece(g, n)
  dparams = [None] * n
  y = numerics.after(piece(cat, n), dx)
  for i in range(n, 0, -1):
    inp = x if (i == 1 and x is not None) else numerics.after(piece(cat, i - 1), dx)
    dpre = _relu_bwd(None, y, dx)[0]
    _, vjp = jax.vjp(lambda h, p: layer(h, mask, p), inp, params[i - 1])
    d_inp, dparams[i - 1] = vjp(dpre)
    dx = d_inp if (i == 1 and x is not None) else piece(g, i - 1) + d_inp
    y = inp  # x_{i-1}: layer i's input is layer i-1's output (one slice for both uses)
  dx0, dx_red = (piece(g, 0), dx) if x is not None else (dx, None)
  return dx0, dx_red, jax.tree_util.tree_map(jnp.zeros_like, mask), tuple(dparams)


relu_chain_concat.defvjp(_relu_chain_concat_fwd, _relu_chain_concat_bwd)


def max_pool_ceil(x, mask=None):
  """MaxPool2d(3, stride 2, pad 0, ceil_mode=True) for even-sized maps.

  x [N, H, W, C] (H, W even) -> [N, H/2, W/2, C]; -inf outside the region and in
  the ceil-mode overhang, as PyTorch.
  """
  if mask is not None:
    x = jnp.where(mask > 0, x, -jnp.inf)
  pad_h = 1 if x.shape[1] % 2 == 0 else 0
  pad_w = 1 if x.shape[2] % 2 == 0 else 0
  return max_pool3s2(jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)),
                             constant_values=-jnp.inf), zero_empty=True)


def max_pool3s2(xp, zero_empty: bool = False):
  """3x3 stride-2 VALID max-pool as 9 strided taps: xp [N, Hp, Wp, C] -> [N, ho, wo, C];
  zero_empty: windows whose maximum is -inf (all outside the region) give 0 instead.

  Gradient: to the first maximal tap of each window in row-major order (PyTorch's CPU
  rule; none for a NaN window or a zeroed empty one). Under differentiation the forward
  also makes that tap's index, once (int8 per output, 9 = none; `numerics.materialize`),
  and keeps only it: not the padded input, not the output. The backward builds the input
  gradient by row / column parity (`_max_pool3s2_bwd`). XLA's reduce-window gradient
  (select-and-scatter) kept several int32 index maps of the input's size live;
  re-deriving the winner in the backward recomputed the 9-tap max and a compare chain
  inside each of 9 interior-padded placements; an index (or a -inf test) XLA left to the
  backward's loop kept the padded input alive from the forward to the backward."""
  return _max_pool3s2(xp, xp.shape[1], xp.shape[2], zero_empty)


def _max_pool3s2_taps(xp, zero_empty):
  """xp [N, Hp, Wp, C] -> (max [N, ho, wo, C] (0 for -inf when zero_empty), its 9 taps,
  row-major, the -inf test or None)."""
  ho, wo = (xp.shape[1] - 3) // 2 + 1, (xp.shape[2] - 3) // 2 + 1
  taps = [kernels._tap(xp, i, j, 2, ho, wo) for i in range(3) for j in range(3)]
  y = taps[0]
  for t in taps[1:]:
    y = jnp.maximum(y, t)
  empty = jnp.isneginf(y) if zero_empty else None
  return y, taps, empty


def _zeroed(y, empty):
  """y with zeros where `empty` (None: y as it is)."""
  return y if empty is None else jnp.where(empty, jnp.zeros((), y.dtype), y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool3s2(xp, hp, wp, zero_empty):
  y, _, empty = _max_pool3s2_taps(xp, zero_empty)
  return _zeroed(y, empty)


def _max_pool3s2_fwd(xp, hp, wp, zero_empty):
  y, taps, empty = _max_pool3s2_taps(xp, zero_empty)
  first = jnp.full(y.shape, 9, jnp.int8)  # 9: no tap equals the max (a NaN window)
  for k in range(8, -1, -1):
    first = jnp.where(taps[k] == y, jnp.int8(k), first)
  if empty is not None:
    first = jnp.where(empty, jnp.int8(9), first)
  return _zeroed(y, empty), numerics.materialize(first)


# Input row 2a + p is, for option r, tap row _POOL_TAP[r][p] of window a - _POOL_SHIFT[r]
# (even rows: row 0 of window a, row 2 of window a - 1; odd rows: row 1 of window a and no
# second option, -1); columns alike.
_POOL_TAP = ((0, 1), (2, -1))  # [option][parity] -> tap row (column) index
_POOL_SHIFT = (0, 1)  # [option] -> window offset d


def _max_pool3s2_bwd(hp, wp, zero_empty, first, g):
  """first [N, ho, wo, C] int8 winning tap, g [N, ho, wo, C] -> (d xp [N, hp, wp, C],).

  d xp as [N, ho + 1, 2, wo + 1, 2, C] (row / column parity as axes, a reshape away from
  [N, 2 ho + 2, 2 wo + 2, C]): the sum over 2 x 2 (row, column) options of the window
  shifted by the option's offset where its winning tap is the one that option's parity
  names. Elementwise with broadcasting: one fused loop, added in ascending tap order
  (the order of a tap-by-tap accumulation)."""
  n, ho, wo, c = g.shape
  zero = jnp.zeros((), g.dtype)
  dxp = None
  for r in (0, 1):
    for s in (0, 1):
      dy, dx = _POOL_SHIFT[r], _POOL_SHIFT[s]
      pads = ((0, 0, 0), (dy, 1 - dy, 0), (dx, 1 - dx, 0), (0, 0, 0))
      fs = jax.lax.pad(first, jnp.int8(9), pads)[:, :, None, :, None]
      gs = jax.lax.pad(g, zero, pads)[:, :, None, :, None]
      ti, tj = np.array(_POOL_TAP[r]), np.array(_POOL_TAP[s])
      k = np.where((ti[:, None] < 0) | (tj[None, :] < 0), -1, 3 * ti[:, None] + tj[None, :])
      k = jnp.asarray(k.astype(np.int8)).reshape(1, 1, 2, 1, 2, 1)  # [p, q] -> wanted tap
      t = jnp.where(fs == k, gs, zero)
      dxp = t if dxp is None else dxp + t
  return (dxp.reshape(n, 2 * ho + 2, 2 * wo + 2, c)[:, :hp, :wp],)


_max_pool3s2.defvjp(_max_pool3s2_fwd, _max_pool3s2_bwd)


def _zero_neg_inf(y):
  """Windows entirely outside the region pooled to -inf: make them 0 (still outside)."""
  return _zeroed(y, jnp.isneginf(y))


def max_pool_same(x, mask=None):
  """MaxPool2d(3, stride 2, pad 1) (ResNet stem): -inf padding and outside region."""
  if mask is not None:
    x = jnp.where(mask > 0, x, -jnp.inf)
  return _zero_neg_inf(nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))


def upsample2x(x):
  """Nearest-neighbour x2 (pixel duplication) [N, H, W, C] -> [N, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def freeze_below(x, frozen: bool):
  """FREEZE_AT: `x` is the output of a frozen stage -> stop_gradient(x), so the backward
  pass computes nothing for it and the stages below (their parameters get exact zero
  gradients; the optimiser masks their updates too). Identity in the forward pass."""
  return jax.lax.stop_gradient(x) if frozen else x
