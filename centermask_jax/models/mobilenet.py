"""MobileNetV2 bottom-up network (centermask2 `build_mnv2_backbone`), spec §a.3.

`MobileNetV2()(x [N, H, W, 3], padded_hw [N, 2])` returns NHWC feature maps
{"res2": s4 (24 ch), "res3": s8 (32), "res4": s16 (96), "res5": s32 (320)},
taken after features[3], [6], [13], [17], and "features.0" (the stem, s2, 32 ch). Width 1.0, ReLU6, FrozenBN, convs
without bias, no final 1280-channel conv.

Module names mirror the state-dict keys below `backbone.bottom_up.`:
`features.0.0` (conv) / `features.0.1` (FrozenBN); block i is the submodule
`features.{i}` holding the flat Sequential indices `conv.{k}` (k = 0, 1, 3, 4 for
expand ratio 1, else 0, 1, 3, 4, 6, 7; ReLU6 slots have no variables).
"""
from typing import Dict, Tuple

import flax.linen as nn

from centermask_jax.models import layers as L
from centermask_jax.ops import padding

# (expand ratio t, out channels c, repeats n, first stride s)
BLOCK_SETTINGS: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
RETURN_INDICES: Tuple[int, ...] = (3, 6, 13, 17)
STEM_CHANNELS = 32

# centermask2 initialises convs with N(0, sqrt(2 / (kh * kw * out_channels))).
_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class InvertedResidual(nn.Module):
  """[expand 1x1 -> BN -> ReLU6 ->] dw 3x3 -> BN -> ReLU6 -> project 1x1 -> BN (+ x).

  x [N, H, W, Cin] -> [N, ceil(H/stride), ceil(W/stride), out_channels]. `in_stride`
  is the feature stride of x (for the depthwise conv's region mask); padded_hw
  [N, 2] or None (whole canvas valid).
  """
  out_channels: int
  stride: int
  expand_ratio: int

  @nn.compact
  def __call__(self, x, padded_hw=None, in_stride: int = 1):
    inp = x.shape[-1]
    hidden = int(round(inp * self.expand_ratio))
    k = 0
    y = x
    if self.expand_ratio != 1:
      y = L.Conv(hidden, 1, use_bias=False, kernel_init=_fan_out, name="conv.0")(y)
      y = L.relu6(L.FrozenBN(name="conv.1")(y))
      k = 3
    mask = None if padded_hw is None else padding.region_mask(padded_hw, y.shape[1:3], in_stride)
    y = L.Conv(hidden, 3, self.stride, groups=hidden, use_bias=False, kernel_init=_fan_out,
               name=f"conv.{k}")(y, mask)
    y = L.relu6(L.FrozenBN(name=f"conv.{k + 1}")(y))
    y = L.Conv(self.out_channels, 1, use_bias=False, kernel_init=_fan_out,
               name=f"conv.{k + 3}")(y)
    y = L.FrozenBN(name=f"conv.{k + 4}")(y)
    if self.stride == 1 and inp == self.out_channels:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 (width 1.0); name it 'bottom_up' inside the FPN.

  x [N, H, W, 3] (canvas, H and W multiples of 32), padded_hw [N, 2] ->
  {"features.0": [N, H/2, W/2, 32], "res2": [N, H/4, W/4, 24], "res3": [.., 32],
   "res4": [.., 96], "res5": [.., 320]}.
  """
  freeze_at: int = 0  # FREEZE_AT: features[0 .. freeze_at-1] frozen, no gradient below

  @nn.compact
  def __call__(self, x, padded_hw):
    x = L.Conv(STEM_CHANNELS, 3, 2, use_bias=False, kernel_init=_fan_out,
               name="features.0.0")(x, padding.region_mask(padded_hw, x.shape[1:3], 1))
    x = L.relu6(L.FrozenBN(name="features.0.1")(x))
    x = L.freeze_below(x, self.freeze_at >= 1)
    stride = 2
    i = 1
    feats = {"features.0": x}  # the stem (stride 2): a parity tap, unused by the FPN
    for t, c, n, s in BLOCK_SETTINGS:
      for j in range(n):
        block_stride = s if j == 0 else 1
        x = InvertedResidual(c, block_stride, t, name=f"features.{i}")(x, padded_hw, stride)
        x = L.freeze_below(x, i < self.freeze_at)
        stride *= block_stride
        if i in RETURN_INDICES:
          feats[f"res{RETURN_INDICES.index(i) + 2}"] = x
        i += 1
    return feats


def out_channels() -> Dict[str, int]:
  """Channels of res2..res5."""
  return {"res2": 24, "res3": 32, "res4": 96, "res5": 320}


def frozen_param_prefixes(freeze_at: int = 0) -> Tuple[str, ...]:
  """centermask2 MobileNetV2._freeze_backbone: features[0 .. freeze_at-1] are frozen.

  Returns module-path prefixes (ending with '.'); a flattened variable path
  ('.'.join of its keys, e.g. 'features.1.conv.0.kernel') is frozen iff it starts with one.
  The Lite-Mv2 config uses FREEZE_AT = 0 (nothing frozen).
  """
  return tuple(f"features.{i}." for i in range(freeze_at))
