"""Pixel normalisation, the one home: raw uint8 pixels -> detectron2's normalised input.

detectron2 computes `(float32(pixel) - pixel_mean) / pixel_std` on the host and zero-pads
the batch. Here images travel as uint8 (a quarter of the bytes) and are normalised on the
device through a [3, 256] float32 lookup table built with exactly those float32 ops, so
the result is bit-identical whatever the backend does with divisions.
Used by `CenterMask.normalize` (train step, evaluator, Predictor) and by the StableHLO
runner (`centermask_jax.serving`) for its float32 artefact input.
"""
import jax.numpy as jnp
import numpy as np

from centermask_jax.ops import padding


def pixel_lut(pixel_mean, pixel_std) -> np.ndarray:
  """float32 [3, 256]: (float32(v) - mean[c]) / std[c] for every uint8 value v."""
  mean = np.asarray(pixel_mean, np.float32)[:, None]
  std = np.asarray(pixel_std, np.float32)[:, None]
  return np.ascontiguousarray((np.arange(256, dtype=np.float32)[None, :] - mean) / std)


def normalize_images(images, image_hw, pixel_mean, pixel_std):
  """uint8 [N, Hc, Wc, 3] (model channel order) -> float32 [N, Hc, Wc, 3]: per-channel
  (v - mean) / std inside each image's resized (h, w) = image_hw [N, 2], 0 outside (the
  zero padding of detectron2's normalised batch). Floating images pass through unchanged
  (already normalised, e.g. the parity fixture's tensor)."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  if images.dtype != jnp.uint8:
    raise TypeError(f"images must be uint8 (raw pixels) or floating (normalised), "
                    f"got {images.dtype}")
  lut = jnp.asarray(pixel_lut(pixel_mean, pixel_std))  # [3, 256]
  idx = jnp.asarray(images).astype(jnp.int32)
  x = jnp.stack([lut[c][idx[..., c]] for c in range(3)], axis=-1)
  inside = padding.hw_mask(image_hw, images.shape[1:3])          # [N, Hc, Wc]
  return jnp.where(inside[..., None], x, 0.0)
