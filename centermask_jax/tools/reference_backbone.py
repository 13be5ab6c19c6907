"""The reference's float32 MobileNetV2 backbone, recomputed with PyTorch (a parity diagnostic).

On the random-weight MobileNetV2 fixture, a one-ulp change anywhere in the backbone grows
about 1.3x per block to ~3e-5 relative at res5 (docs/PARITY.md), so end-to-end parity needs
the reference's own float32 roundings. `mobilenetv2_features` recomputes them with the same
PyTorch CPU kernels (torch.nn.functional conv2d / batch_norm / hardtanh) from the fixture's
weights; `tools.parity --reference-backbone eval|train` substitutes them for our bottom-up
outputs, which tests everything downstream of the backbone on that fixture at the README §7
tolerances. Written from the spec (spec §a.3), not from centermask2's code.

FrozenBN has two float32 forms in detectron2, and the reference used both:
  eval  -- no input requires grad: F.batch_norm(training=False), i.e. per channel
           a = w / sqrt(var + eps), b' = b - mean * a (fused), y = x * a + b' (fused);
  train -- conv outputs require grad (FREEZE_AT 0): s = w * rsqrt(var + eps),
           b' = b - mean * s, y = x * s + b' (separately rounded).

Requires torch (optional dependency: pip install centermask_jax[torch]).
"""
from typing import Dict

import numpy as np

# (expand ratio t, out channels c, repeats n, first stride s), as models.mobilenet.
from centermask_jax.models.mobilenet import BLOCK_SETTINGS, RETURN_INDICES

_PREFIX = "backbone.bottom_up.features."
FROZEN_BN_FORMS = ("eval", "train")


def load_state_dict(path: str):
  """model_random_fp16.pth ({'model': state_dict}) -> {key: float32 torch tensor}."""
  import torch
  sd = torch.load(path, map_location="cpu", weights_only=True)
  sd = sd.get("model", sd)
  return {k: v.float() for k, v in sd.items() if v.is_floating_point()}


def mobilenetv2_features(weights: str, images_nchw: np.ndarray, frozen_bn: str = "eval",
                         every_block: bool = False) -> Dict[str, np.ndarray]:
  """weights: a centermask2 MobileNetV2 checkpoint; images_nchw [N, 3, H, W] float32 (the
  normalised, padded batch) -> NHWC float32 maps keyed as our bottom-up outputs:
  "features.0" [N, H/2, W/2, 32], "res2".."res5" (strides 4..32); with `every_block`
  also "features.{i}" for every block i = 1..17."""
  import torch
  import torch.nn.functional as F
  if frozen_bn not in FROZEN_BN_FORMS:
    raise ValueError(f"frozen_bn must be one of {FROZEN_BN_FORMS}, got {frozen_bn!r}")
  sd = load_state_dict(weights)

  def conv(x, key, stride, groups=1):
    w = sd[key + ".weight"]
    return F.conv2d(x, w, None, stride, (w.shape[-1] - 1) // 2, 1, groups)

  def bn(x, key):
    w, b, mean, var = (sd[f"{key}.{n}"] for n in ("weight", "bias", "running_mean",
                                                   "running_var"))
    if frozen_bn == "eval":
      return F.batch_norm(x, mean, var, w, b, training=False, eps=1e-5)
    scale = w * (var + 1e-5).rsqrt()
    shift = b - mean * scale
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

  def relu6(x):
    return F.hardtanh(x, 0.0, 6.0)

  out = {}
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images_nchw, np.float32))
    x = relu6(bn(conv(x, _PREFIX + "0.0", 2), _PREFIX + "0.1"))
    out["features.0"] = x
    i, cin = 1, x.shape[1]
    for t, c, n, s in BLOCK_SETTINGS:
      for j in range(n):
        stride = s if j == 0 else 1
        p = f"{_PREFIX}{i}.conv."
        y, k = x, 0
        if t != 1:
          y, k = relu6(bn(conv(y, p + "0", 1), p + "1")), 3
        y = relu6(bn(conv(y, p + str(k), stride, groups=y.shape[1]), p + str(k + 1)))
        y = bn(conv(y, p + str(k + 3), 1), p + str(k + 4))
        x = x + y if stride == 1 and cin == c else y
        cin = c
        if every_block:
          out[f"features.{i}"] = x
        if i in RETURN_INDICES:
          out[f"res{RETURN_INDICES.index(i) + 2}"] = x
        i += 1
  return {k: v.numpy().transpose(0, 2, 3, 1).copy() for k, v in out.items()}


def supported(config) -> bool:
  """Whether `config` (a loaded config) has the backbone this module recomputes."""
  return config.model.backbone.name == "mobilenetv2"
