"""FPN with P6/P7 from P5 (spec §b).

`FPN(bottom_up, in_features, out_channels)(x, padded_hw)` returns
({"p3".."p7": [N, H/s, W/s, out_channels]}, bottom-up features dict).
Flax name 'backbone' so parameter paths match `backbone.fpn_lateral3` etc.
"""
from typing import Any, Sequence

import flax.linen as nn

from centermask_jax.models import layers as L
from centermask_jax.ops import padding

# detectron2 c2_xavier_fill: kaiming_uniform(a=1) == U(+-sqrt(3 / fan_in)).
_xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class FPN(nn.Module):
  bottom_up: Any  # a flax Module named 'bottom_up'
  in_features: Sequence[str]  # e.g. ("stage3", "stage4", "stage5")
  out_channels: int

  @nn.compact
  def __call__(self, x, padded_hw):
    bottom = self.bottom_up(x, padded_hw)
    c = self.out_channels
    names = {}
    prev = None
    outs = {}
    for level, feat_name in reversed(list(zip((3, 4, 5), self.in_features))):
      f = bottom[feat_name]
      lat = L.Conv(c, 1, kernel_init=_xavier_fill, name=f"fpn_lateral{level}")(f)
      prev = lat if prev is None else lat + L.upsample2x(prev)
      mask = padding.region_mask(padded_hw, prev.shape[1:3], 2 ** level)
      outs[f"p{level}"] = L.Conv(c, 3, kernel_init=_xavier_fill,
                                 name=f"fpn_output{level}")(prev, mask)
      names[level] = feat_name
    p5 = outs["p5"]
    p6 = L.Conv(c, 3, 2, kernel_init=_xavier_fill, name="top_block.p6")(
        p5, padding.region_mask(padded_hw, p5.shape[1:3], 32))
    p7 = L.Conv(c, 3, 2, kernel_init=_xavier_fill, name="top_block.p7")(
        nn.relu(p6), padding.region_mask(padded_hw, p6.shape[1:3], 64))
    outs["p6"], outs["p7"] = p6, p7
    return {k: outs[k] for k in ("p3", "p4", "p5", "p6", "p7")}, bottom


# Inputs must be multiples of 32 (as detectron2 pads) so P3..P5 are exact halvings;
# our pipelines use multiples of 128 so that P6/P7 canvases are exact too.
SIZE_DIVISIBILITY = padding.SIZE_DIVISIBILITY


def check_canvas(shape: Sequence[int]):
  h, w = shape
  if h % SIZE_DIVISIBILITY or w % SIZE_DIVISIBILITY:
    raise ValueError(f"input canvas {h}x{w} must be a multiple of {SIZE_DIVISIBILITY} "
                     "(pad the batch)")
