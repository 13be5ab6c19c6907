"""VoVNetV2 backbone (OSA modules with eSE and identity mapping), spec §a.1.

`VoVNet(variant)(x [N, H, W, 3], padded_hw [N, 2])` returns NHWC feature maps
{"stem": s4, "stage2": s4, "stage3": s8, "stage4": s16, "stage5": s32}.
Module names mirror centermask2's state-dict keys ('/' written as ':').
"""
import dataclasses
import functools
import math
from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from centermask_jax.models import layers as L
from centermask_jax.ops import kernels, padding
from centermask_jax.ops.numerics import exact_div


@dataclasses.dataclass(frozen=True)
class VoVNetSpec:
  stem: Tuple[int, int, int]
  stage_ch: Tuple[int, int, int, int]
  out_ch: Tuple[int, int, int, int]
  layers_per_block: int
  blocks: Tuple[int, int, int, int]
  depthwise: bool


VOVNET_SPECS: Dict[str, VoVNetSpec] = {
    "V-19-slim-dw-eSE": VoVNetSpec((64, 64, 64), (64, 80, 96, 112), (112, 256, 384, 512), 3,
                                   (1, 1, 1, 1), True),
    "V-19-dw-eSE": VoVNetSpec((64, 64, 64), (128, 160, 192, 224), (256, 512, 768, 1024), 3,
                              (1, 1, 1, 1), True),
    "V-19-slim-eSE": VoVNetSpec((64, 64, 128), (64, 80, 96, 112), (112, 256, 384, 512), 3,
                                (1, 1, 1, 1), False),
    "V-19-eSE": VoVNetSpec((64, 64, 128), (128, 160, 192, 224), (256, 512, 768, 1024), 3,
                           (1, 1, 1, 1), False),
    "V-39-eSE": VoVNetSpec((64, 64, 128), (128, 160, 192, 224), (256, 512, 768, 1024), 5,
                           (1, 1, 2, 2), False),
    "V-57-eSE": VoVNetSpec((64, 64, 128), (128, 160, 192, 224), (256, 512, 768, 1024), 5,
                           (1, 1, 4, 3), False),
    "V-99-eSE": VoVNetSpec((64, 64, 128), (128, 160, 192, 224), (256, 512, 768, 1024), 5,
                           (1, 3, 9, 3), False),
}

_he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def hsigmoid(x):
  """eSE gate as centermask2's Hsigmoid: relu6(x + 3) / 6 (float32 ops in that order, true
  division). Gradient 0 at x = -3 and x = 3 like PyTorch's relu6 (hardtanh) backward."""
  return exact_div(jax.nn.relu6(x + 3.0), jnp.float32(6.0))


NORMS = ("FrozenBN", "GN")


def norm_layer(x, mask, name: str, norm: str, stride: int = 1):
  """FrozenBN (the official default) or trainable GroupNorm (centermask2's
  MODEL.VOVNET.NORM "GN"; gcd(32, C) groups so that every VoVNet width divides, with
  statistics over the official region). mask: the *input* region of a stride-`stride` conv."""
  if norm == "FrozenBN":
    return L.FrozenBN(name=name)(x)
  if norm == "GN":
    m = None if mask is None else mask[:, ::stride, ::stride]
    return L.MaskedGroupNorm(num_groups=math.gcd(32, x.shape[-1]), name=name)(x, m)
  raise ValueError(f"unknown backbone norm {norm!r}; expected one of {NORMS}")


def conv_norm_relu(x, mask, prefix: str, features: int, kernel_size: int = 3, stride: int = 1,
                   norm: str = "FrozenBN"):
  """`{prefix}:conv` (no bias) -> `{prefix}:norm` (FrozenBN or GN) -> ReLU.

  Call inside a compact module: the layers are created in the caller's scope.
  """
  x = L.Conv(features, kernel_size, stride, use_bias=False, kernel_init=_he,
             name=f"{prefix}:conv")(x, mask)
  return L.relu(norm_layer(x, mask, f"{prefix}:norm", norm, stride))


def dcn_norm_relu(x, mask, prefix: str, features: int, norm: str = "FrozenBN",
                  impl: str = "gather", valid_hw=None):
  """centermask2's DFConv3x3 with modulated DCN (spec §a): `{prefix}:conv_offset` (3x3,
  27 ch, bias, zero init) -> offsets = channels 0..17 (the first two of its 3 chunks,
  concatenated), mask = sigmoid(channels 18..26) -> `{prefix}:conv` ModulatedDeformConv
  3x3 pad 1 (no bias) -> `{prefix}:norm` -> ReLU. x [N, H, W, C] -> [N, H, W, features];
  valid_hw [N, 2] official map size (samples follow detectron2's rule on it; None: canvas)."""
  om = L.Conv(27, 3, use_bias=True, kernel_init=nn.initializers.zeros,
              name=f"{prefix}:conv_offset")(x, mask)
  offset, mask_dcn = om[..., :18], jax.nn.sigmoid(om[..., 18:])
  x = L.ModulatedDeformConv(features, kernel_init=_he, impl=impl,
                            name=f"{prefix}:conv")(x, offset, mask_dcn, valid_hw)
  return nn.relu(norm_layer(x, mask, f"{prefix}:norm", norm))


def dw_conv_norm_relu(x, mask, prefix: str, features: int, stride: int = 1,
                      norm: str = "FrozenBN"):
  """Depthwise 3x3 `:dw_conv3x3` -> pointwise `:pw_conv1x1` -> `:pw_norm` -> ReLU."""
  c = x.shape[-1]
  kdw = L.ConvKernel((3, 3, 1, c), _he, name=f"{prefix}:dw_conv3x3")()
  kpw = L.ConvKernel((1, 1, c, features), _he, name=f"{prefix}:pw_conv1x1")()
  x = L.depthwise_pointwise(x, mask, kdw, kpw, stride)
  return L.relu(norm_layer(x, mask, f"{prefix}:pw_norm", norm, stride))


class OSAModule(nn.Module):
  """One-shot aggregation block with eSE (and identity when `identity`).

  x [N, H, W, in_ch] -> [N, H, W, concat_ch]; mask [N, H, W, 1] official region.
  `tag` is `OSA{n}_{b}`; the parent names the module `stage{n}.OSA{n}_{b}`.
  """
  stage_ch: int
  concat_ch: int
  num_layers: int
  identity: bool
  depthwise: bool
  tag: str
  norm: str = "FrozenBN"
  dcn: bool = False  # 3x3 layers as modulated deformable convs (non-depthwise only)
  dcn_impl: str = "gather"

  @nn.compact
  def __call__(self, x, mask, valid_hw=None):
    """valid_hw [N, 2]: official map size of this stage (used by the DCN layers)."""
    tag = self.tag
    cnr = functools.partial(conv_norm_relu, norm=self.norm)
    dw = functools.partial(dw_conv_norm_relu, norm=self.norm)
    dcn = functools.partial(dcn_norm_relu, norm=self.norm, impl=self.dcn_impl,
                            valid_hw=valid_hw)
    block_input = x
    reduced = None
    if self.depthwise and x.shape[-1] != self.stage_ch:
      reduced = cnr(x, mask, f"conv_reduction.{tag}_reduction_0", self.stage_ch, 1)
    if self.norm == "FrozenBN" and not self.dcn:  # the official layers: one pure chain
      cat = L.relu_chain_concat(_dw_bn if self.depthwise else _conv_bn, self.stage_ch,
                                x, reduced, mask, self._chain_params(x.shape[-1]))
    else:
      outputs = [x]
      x = x if reduced is None else reduced
      for i in range(self.num_layers):
        layer = dw if self.depthwise else dcn if self.dcn else cnr
        x = layer(x, mask, f"layers.{i}.{tag}_{i}", self.stage_ch)
        outputs.append(x)
      cat = jnp.concatenate(outputs, -1)
    y = cnr(cat, mask, f"concat.{tag}_concat", self.concat_ch, 1)
    gate = padding.masked_mean(y, mask)
    gate = L.Conv(self.concat_ch, 1, use_bias=True, kernel_init=_he, name="ese.fc")(gate)
    y = y * hsigmoid(gate)
    if self.identity:
      y = y + block_input
    return y

  def _chain_params(self, in_ch: int):
    """Per layer, the parameters `conv_norm_relu` / `dw_conv_norm_relu` would create (same
    names, shapes and inits) as (kernel(s)..., FrozenBN scale, shift) for `_conv_bn` /
    `_dw_bn`."""
    out, c = [], in_ch if not self.depthwise else self.stage_ch
    for i in range(self.num_layers):
      prefix = f"layers.{i}.{self.tag}_{i}"
      if self.depthwise:
        ks = (L.ConvKernel((3, 3, 1, c), _he, name=f"{prefix}:dw_conv3x3")(),
              L.ConvKernel((1, 1, c, self.stage_ch), _he, name=f"{prefix}:pw_conv1x1")())
        norm = f"{prefix}:pw_norm"
      else:
        ks = (L.ConvKernel((3, 3, c, self.stage_ch), _he, name=f"{prefix}:conv")(),)
        norm = f"{prefix}:norm"
      out.append(ks + L.FrozenBN(name=norm)(channels=self.stage_ch))
      c = self.stage_ch
    return tuple(out)


def _conv_bn(x, mask, p):
  """`conv_norm_relu` (3x3, FrozenBN) before its ReLU, as a pure function of
  p = (kernel, scale, shift): x [N, H, W, C] -> [N, H, W, D]."""
  kernel, scale, shift = p
  x = padding.apply_mask(x, mask)
  return L.frozen_bn_apply(kernels.conv2d(x, kernel.astype(x.dtype), 1, 1), scale, shift)


def _dw_bn(x, mask, p):
  """`dw_conv_norm_relu` (FrozenBN) before its ReLU, as a pure function of
  p = (kdw, kpw, scale, shift): x [N, H, W, C] -> [N, H, W, D]."""
  kdw, kpw, scale, shift = p
  return L.frozen_bn_apply(L.depthwise_pointwise(x, mask, kdw, kpw), scale, shift)


class VoVNet(nn.Module):
  """VoVNetV2 bottom-up network; name it 'bottom_up' inside the FPN.

  norm: "FrozenBN" (official checkpoints) or "GN" (trainable, for from-scratch training).
  stage_with_dcn: per stage 2..5, modulated deformable 3x3 convs (centermask2's
  MODEL.VOVNET.STAGE_WITH_DCN; the *_dcn_* configs use (False, True, True, True))."""
  variant: str
  norm: str = "FrozenBN"
  freeze_at: int = 0  # FREEZE_AT: stem (>= 1) and stage n (>= n) frozen, no gradient below
  stage_with_dcn: Tuple[bool, bool, bool, bool] = (False, False, False, False)
  dcn_impl: str = "gather"

  @nn.compact
  def __call__(self, x, padded_hw):
    spec = VOVNET_SPECS[self.variant]
    if spec.depthwise and any(self.stage_with_dcn):
      raise ValueError(f"{self.variant}: deformable convs need a non-depthwise VoVNet")
    hw = x.shape[1:3]

    def mask(stride, shape):
      return padding.region_mask(padded_hw, shape, stride)

    cnr = functools.partial(conv_norm_relu, norm=self.norm)
    dw = functools.partial(dw_conv_norm_relu, norm=self.norm)
    x = cnr(x, mask(1, hw), "stem.stem_1", spec.stem[0], 3, 2)
    layer = dw if spec.depthwise else cnr
    x = layer(x, mask(2, x.shape[1:3]), "stem.stem_2", spec.stem[1], stride=1)
    x = layer(x, mask(2, x.shape[1:3]), "stem.stem_3", spec.stem[2], stride=2)
    x = L.freeze_below(x, self.freeze_at >= 1)
    feats = {"stem": x}
    stride = 4
    for s in range(4):
      n = s + 2
      if n != 2:
        x = L.max_pool_ceil(x, mask(stride, x.shape[1:3]))
        stride *= 2
      m = mask(stride, x.shape[1:3])
      for b in range(spec.blocks[s]):
        x = OSAModule(spec.stage_ch[s], spec.out_ch[s], spec.layers_per_block,
                      identity=b > 0, depthwise=spec.depthwise, tag=f"OSA{n}_{b + 1}",
                      norm=self.norm, dcn=bool(self.stage_with_dcn[s]),
                      dcn_impl=self.dcn_impl,
                      name=f"stage{n}.OSA{n}_{b + 1}")(
                          x, m, padding.official_map_hw(padded_hw, stride))
      x = L.freeze_below(x, self.freeze_at >= n)
      feats[f"stage{n}"] = x
    return feats


def frozen_param_prefixes(freeze_at: int = 0) -> Tuple[str, ...]:
  """centermask2 VoVNet._freeze_backbone: FREEZE_AT >= 1 freezes the stem, >= n freezes
  stage{n} (module-path prefixes ending with '.', as `resnet.frozen_param_prefixes`)."""
  prefixes = ["stem."] if freeze_at >= 1 else []
  prefixes += [f"stage{n}." for n in range(2, 6) if freeze_at >= n]
  return tuple(prefixes)
