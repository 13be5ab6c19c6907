"""SAG-Mask head (spec §d.5): convs -> spatial attention -> deconv x2 -> per-class 1x1.

`SAGMaskHead(...)(pooled [R, 14, 14, C])` -> mask logits [R, 28, 28, num_classes].
Sows 'sam_in', 'sam_out' and 'deconv_out' (pre-ReLU) into 'intermediates'.
"""
import flax.linen as nn
import jax.numpy as jnp

from centermask_jax.models import layers as L
from centermask_jax.ops import kernels

# detectron2 c2_msra_fill: kaiming_normal(fan_out, relu).
msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Deconv2x2(nn.Module):
  """ConvTranspose2d(k=2, s=2, p=0): out[2i+a, 2j+b] = x[i, j] @ kernel[a, b] + bias.

  kernel [2, 2, Cin, Cout] (state-dict layout [Cin, Cout, 2, 2]).
  """
  features: int

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    kernel = self.param("kernel", msra_fill, (2, 2, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    # One GEMM per output-row parity a: [N*H*W, C] @ [C, (b, d)], rows interleaved by a
    # concatenation; no transpose of the output (or of its gradient) is needed.
    k = jnp.transpose(kernel.astype(x.dtype), (0, 2, 1, 3)).reshape(2, c, 2 * self.features)
    rows = [jnp.dot(x.reshape(n * h * w, c), k[a]).reshape(n, h, 1, w, 2 * self.features)
            for a in range(2)]
    y = jnp.concatenate(rows, axis=2)
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(x.dtype)


class SpatialAttention(nn.Module):
  """x * sigmoid(conv3x3([mean_c(x), max_c(x)])); conv has no bias."""

  @nn.compact
  def __call__(self, x):
    stats = jnp.concatenate([jnp.mean(x, -1, keepdims=True), jnp.max(x, -1, keepdims=True)], -1)
    att = L.Conv(1, 3, use_bias=False, kernel_init=msra_fill, name="conv")(stats)
    return x * nn.sigmoid(att)


class ClassPredictor(nn.Module):
  """The per-class 1x1 predictor (kernel [1, 1, Cin, F], bias [F]), optionally evaluated for
  one class per RoI only: x [R, M, M, Cin] -> [R, M, M, F], or with classes int [R]
  -> [R, M, M] = channel classes[r] of the full output (indexed as
  `postprocess.select_class_masks`), computed as one Cin-long dot per pixel instead of F
  (exact up to float summation order)."""
  features: int

  @nn.compact
  def __call__(self, x, classes=None):
    kernel = self.param("kernel", nn.initializers.normal(0.001),
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    if classes is None:
      return kernels.conv2d(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
    cls = jnp.asarray(classes, jnp.int32)
    cls = jnp.where(cls < 0, cls + self.features, cls)  # as select_class_masks indexes
    w = jnp.take(kernel[0, 0].T, cls, axis=0, mode="clip").astype(x.dtype)  # [R, Cin]
    b = jnp.take(bias, cls, mode="clip").astype(x.dtype)
    return jnp.einsum("rijc,rc->rij", x, w) + b[:, None, None]


class SAGMaskHead(nn.Module):
  """x [R, 14, 14, C] -> mask logits [R, 28, 28, num_classes], or with classes int [R]
  -> [R, 28, 28] (the logits of those classes only, see ClassPredictor)."""
  num_classes: int = 80
  num_convs: int = 4
  conv_dim: int = 256

  @nn.compact
  def __call__(self, x, classes=None):
    for i in range(self.num_convs):
      x = nn.relu(L.Conv(self.conv_dim, 3, kernel_init=msra_fill, name=f"mask_fcn{i + 1}")(x))
    self.sow("intermediates", "sam_in", x)
    x = SpatialAttention(name="spatialAtt")(x)
    self.sow("intermediates", "sam_out", x)
    x = Deconv2x2(self.conv_dim, name="deconv")(x)
    self.sow("intermediates", "deconv_out", x)
    x = nn.relu(x)
    return ClassPredictor(self.num_classes, name="predictor")(x, classes)
