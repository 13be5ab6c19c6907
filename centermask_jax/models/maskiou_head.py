"""MaskIoU head (spec §e).

`MaskIoUHead(...)(pooled [R, 14, 14, C], mask_prob [R, 28, 28])` -> IoU per class [R, num_classes].
The mask probability is max-pooled 2x2 and appended as the last channel.
"""
import flax.linen as nn
import jax.numpy as jnp

from centermask_jax.models import layers as L
from centermask_jax.models.mask_head import msra_fill


class MaskIoUHead(nn.Module):
  num_classes: int = 80
  num_convs: int = 4
  conv_dim: int = 256

  @nn.compact
  def __call__(self, pooled, mask_prob):
    pooled_mask = nn.max_pool(mask_prob[..., None], (2, 2), strides=(2, 2))
    x = jnp.concatenate([pooled, pooled_mask.astype(pooled.dtype)], -1)
    for i in range(self.num_convs):
      stride = 2 if i == self.num_convs - 1 else 1
      x = nn.relu(L.Conv(self.conv_dim, 3, stride, kernel_init=msra_fill,
                         name=f"maskiou_fcn{i + 1}")(x))
    x = x.reshape(x.shape[0], -1)  # NHWC flatten; the importer permutes fc1 rows
    # kaiming_normal(fan_out) for Linear layers: fan_out = out_features.
    x = nn.relu(nn.Dense(1024, kernel_init=msra_fill, name="maskiou_fc1")(x))
    x = nn.relu(nn.Dense(1024, kernel_init=msra_fill, name="maskiou_fc2")(x))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    name="maskiou")(x)
