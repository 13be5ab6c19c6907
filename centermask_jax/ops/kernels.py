"""Convolution kernels with per-backend implementations (one home for conv lowering).

`conv2d(x, kernel, stride, pad, groups)` is what every model conv calls. It is
`lax.conv_general_dilated` except where a rewrite that is exact up to float rounding
measured faster on the backend (`benchmarks/kernels.py`):

* depthwise (groups == C_in == C_out): on CPU, XLA lowers a grouped conv to one small
  contraction per group; a k x k depthwise conv is instead computed as k*k shifted
  multiply-adds of strided slices (one fused elementwise loop, forward and backward).

Layout NHWC / HWIO as `lax.conv_general_dilated(..., ("NHWC", "HWIO", "NHWC"))`.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

# backend -> implementation of depthwise convs ("lax" | "shifted"); see benchmarks/kernels.py.
DEPTHWISE_IMPL = {"cpu": "shifted"}


def _backend() -> str:
  return jax.default_backend()


def lax_conv2d(x, kernel, stride: int = 1, pad: int = 0, groups: int = 1):
  """x [N, H, W, Cin], kernel [k, k, Cin/groups, Cout] -> [N, H', W', Cout] (XLA conv)."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def depthwise_shifted(x, kernel, stride: int = 1, pad: int = 0):
  """Depthwise conv as shifted multiply-adds.

  x [N, H, W, C], kernel [kh, kw, 1, C] -> [N, (H + 2p - kh) // s + 1, (W + 2p - kw) // s + 1, C];
  equal to `lax_conv2d(x, kernel, stride, pad, groups=C)` up to float summation order.
  """
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  ho = (h + 2 * pad - kh) // stride + 1
  wo = (w + 2 * pad - kw) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
  k = kernel.reshape(kh, kw, c).astype(x.dtype)
  acc = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(xp, (0, i, j, 0),
                          (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                          (1, stride, stride, 1))
      term = tap * k[i, j]
      acc = term if acc is None else acc + term
  return acc


def conv2d(x, kernel, stride: int = 1, pad: int = 0, groups: int = 1,
           impl: Optional[str] = None):
  """The model's conv: x [N, H, W, Cin], kernel [k, k, Cin/groups, Cout] -> [N, H', W', Cout].

  impl: None = the backend's choice, "lax" or "shifted" (depthwise only) to force one.
  """
  cin, cout = x.shape[-1], kernel.shape[-1]
  depthwise = groups > 1 and groups == cin == cout
  if depthwise:
    impl = impl or DEPTHWISE_IMPL.get(_backend(), "lax")
    if impl == "shifted":
      return depthwise_shifted(x, kernel, stride, pad)
  return lax_conv2d(x, kernel, stride, pad, groups)
