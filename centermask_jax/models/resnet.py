"""ResNet / ResNeXt bottom-up network (detectron2 `build_resnet_backbone`), spec §a.2.

`ResNet(depth)(x [N, H, W, 3], padded_hw [N, 2])` returns NHWC feature maps
{"res2": s4, "res3": s8, "res4": s16, "res5": s32}.
Configs: R-50 `ResNet(50)`, R-101 `ResNet(101)`,
X-101-32x8d `ResNet(101, num_groups=32, width_per_group=8, stride_in_1x1=False)`.

Module names mirror the state-dict keys below `backbone.bottom_up.`: the stem is
`stem.conv1` (+ `stem.conv1.norm`), block j of stage n is the submodule `res{n}.{j}`
holding `conv1..3`, `shortcut` (first block only) and their FrozenBNs `<conv>.norm`.
"""
from typing import Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp

from centermask_jax.models import layers as L
from centermask_jax.ops import padding

STAGE_BLOCKS: Dict[int, Tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# detectron2 initialises ResNet convs with c2_msra_fill (He normal, fan_out).
_msra = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BottleneckBlock(nn.Module):
  """detectron2 BottleneckBlock with FrozenBN.

  x [N, H, W, Cin] -> [N, ceil(H/stride), ceil(W/stride), out_channels].
  `in_stride` is the feature stride of x, used to build the official-region mask
  for the 3x3 conv; padded_hw [N, 2] or None (whole canvas valid).
  """
  out_channels: int
  bottleneck_channels: int
  stride: int = 1
  num_groups: int = 1
  stride_in_1x1: bool = True

  @nn.compact
  def __call__(self, x, padded_hw=None, in_stride: int = 1):
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)

    def conv_norm(y, name, features, k, stride, mask=None, groups=1):
      y = L.Conv(features, k, stride, groups=groups, use_bias=False, kernel_init=_msra,
                 name=name)(y, mask)
      return L.FrozenBN(name=f"{name}.norm")(y)

    if x.shape[-1] != self.out_channels:
      shortcut = conv_norm(x, "shortcut", self.out_channels, 1, self.stride)
    else:
      shortcut = x
    y = nn.relu(conv_norm(x, "conv1", self.bottleneck_channels, 1, s1))
    mask = None
    if padded_hw is not None:
      mask = padding.region_mask(padded_hw, y.shape[1:3], in_stride * s1)
    y = nn.relu(conv_norm(y, "conv2", self.bottleneck_channels, 3, s3, mask, self.num_groups))
    y = conv_norm(y, "conv3", self.out_channels, 1, 1)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet-50/101 (ResNeXt with num_groups > 1); name it 'bottom_up' inside the FPN.

  x [N, H, W, 3] (canvas, H and W multiples of 32), padded_hw [N, 2] ->
  {"stem": [N, H/4, W/4, 64], "res2": [N, H/4, W/4, 256], "res3": [.., 512],
   "res4": [.., 1024], "res5": [.., 2048]}.
  """
  depth: int = 50
  num_groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = True
  freeze_at: int = 0  # FREEZE_AT: no gradient flows below the frozen stages

  @nn.compact
  def __call__(self, x, padded_hw):
    hw = x.shape[1:3]
    x = L.Conv(64, 7, 2, pad=3, use_bias=False, kernel_init=_msra,
               name="stem.conv1")(x, padding.region_mask(padded_hw, hw, 1))
    x = nn.relu(L.FrozenBN(name="stem.conv1.norm")(x))
    x = L.max_pool_same(x, padding.region_mask(padded_hw, x.shape[1:3], 2))
    x = L.freeze_below(x, self.freeze_at >= 1)
    stride = 4
    out_ch = 256
    bottleneck = self.num_groups * self.width_per_group
    feats = {"stem": x}  # after the max-pool, as detectron2's BasicStem (a parity tap)
    for s, n_blocks in enumerate(STAGE_BLOCKS[self.depth]):
      n = s + 2
      for j in range(n_blocks):
        block_stride = 2 if (j == 0 and n > 2) else 1
        x = BottleneckBlock(out_ch, bottleneck, block_stride, self.num_groups,
                            self.stride_in_1x1, name=f"res{n}.{j}")(x, padded_hw, stride)
        stride *= block_stride
      x = L.freeze_below(x, self.freeze_at >= n)
      feats[f"res{n}"] = x
      out_ch *= 2
      bottleneck *= 2
    return feats


def out_channels() -> Dict[str, int]:
  """Channels of res2..res5 (independent of depth / groups: RES2_OUT_CHANNELS = 256)."""
  return {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}


def frozen_param_prefixes(freeze_at: int = 2) -> Tuple[str, ...]:
  """detectron2 ResNet.freeze: FREEZE_AT >= 1 freezes the stem, >= n freezes res{n}.

  Returns module-path prefixes (ending with '.'); a flattened variable path
  ('.'.join of its keys, e.g. 'res2.0.conv1.kernel') is frozen iff it starts with one.
  """
  prefixes = ["stem."] if freeze_at >= 1 else []
  prefixes += [f"res{n}." for n in range(2, 6) if freeze_at >= n]
  return tuple(prefixes)

