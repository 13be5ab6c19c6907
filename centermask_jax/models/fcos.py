"""FCOS head shared over P3..P7 (spec §c.1).

`FCOSHead(...)(features [list of N, Hl, Wl, C], padded_hw)` ->
(logits [list N, Hl, Wl, num_classes], reg [list N, Hl, Wl, 4] = ReLU(scale_l * bbox_pred)
in stride units, ctrness [list N, Hl, Wl, 1] raw logits).
GroupNorm statistics are taken over each image's official region only.
"""
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from centermask_jax.models import layers as L
from centermask_jax.ops import padding

_normal01 = nn.initializers.normal(0.01)


class Scale(nn.Module):
  """Learnable scalar (init 1.0), stored as `scalar` [1] (state-dict `scale`)."""

  @nn.compact
  def __call__(self, x):
    return x * self.param("scalar", nn.initializers.ones, (1,), jnp.float32).astype(x.dtype)


class FCOSHead(nn.Module):
  num_classes: int = 80
  num_convs: int = 4
  strides: Sequence[int] = (8, 16, 32, 64, 128)
  prior_prob: float = 0.01

  @nn.compact
  def __call__(self, features, padded_hw):
    c = features[0].shape[-1]
    towers = {}
    for tower in ("cls_tower", "bbox_tower"):
      towers[tower] = [(L.Conv(c, 3, kernel_init=_normal01, name=f"{tower}.{3 * i}"),
                        L.MaskedGroupNorm(32, relu=True, name=f"{tower}.{3 * i + 1}"))
                       for i in range(self.num_convs)]
    bias_value = -math.log((1 - self.prior_prob) / self.prior_prob)
    cls_logits = L.Conv(self.num_classes, 3, kernel_init=_normal01,
                        bias_init=nn.initializers.constant(bias_value), name="cls_logits")
    bbox_pred = L.Conv(4, 3, kernel_init=_normal01, name="bbox_pred")
    ctrness = L.Conv(1, 3, kernel_init=_normal01, name="ctrness")
    scales = [Scale(name=f"scales.{i}") for i in range(len(self.strides))]

    logits, regs, ctrs = [], [], []
    for lvl, (f, stride) in enumerate(zip(features, self.strides)):
      mask = padding.region_mask(padded_hw, f.shape[1:3], stride)
      outs = {}
      for tower, layers in towers.items():
        t = f
        for conv, gn in layers:
          t = gn(conv(t, mask), mask)
        outs[tower] = t
      logits.append(cls_logits(outs["cls_tower"], mask))
      regs.append(nn.relu(scales[lvl](bbox_pred(outs["bbox_tower"], mask))))
      ctrs.append(ctrness(outs["bbox_tower"], mask))
    return logits, regs, ctrs
