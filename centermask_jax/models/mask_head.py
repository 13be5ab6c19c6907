"""SAG-Mask head (spec §d.5): convs -> spatial attention -> deconv x2 -> per-class 1x1.

`SAGMaskHead(...)(pooled [R, 14, 14, C])` -> mask logits [R, 28, 28, num_classes].
Sows 'sam_in', 'sam_out' and 'deconv_out' (pre-ReLU) into 'intermediates'.
"""
import flax.linen as nn
import jax.numpy as jnp

from centermask_jax.models import layers as L

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
    y = jnp.einsum("nijc,abcd->niajbd", x, kernel.astype(x.dtype))
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(x.dtype)


class SpatialAttention(nn.Module):
  """x * sigmoid(conv3x3([mean_c(x), max_c(x)])); conv has no bias."""

  @nn.compact
  def __call__(self, x):
    stats = jnp.concatenate([jnp.mean(x, -1, keepdims=True), jnp.max(x, -1, keepdims=True)], -1)
    att = L.Conv(1, 3, use_bias=False, kernel_init=msra_fill, name="conv")(stats)
    return x * nn.sigmoid(att)


class SAGMaskHead(nn.Module):
  num_classes: int = 80
  num_convs: int = 4
  conv_dim: int = 256

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_convs):
      x = nn.relu(L.Conv(self.conv_dim, 3, kernel_init=msra_fill, name=f"mask_fcn{i + 1}")(x))
    self.sow("intermediates", "sam_in", x)
    x = SpatialAttention(name="spatialAtt")(x)
    self.sow("intermediates", "sam_out", x)
    x = Deconv2x2(self.conv_dim, name="deconv")(x)
    self.sow("intermediates", "deconv_out", x)
    x = nn.relu(x)
    return L.Conv(self.num_classes, 1, kernel_init=nn.initializers.normal(0.001),
                  name="predictor")(x)
