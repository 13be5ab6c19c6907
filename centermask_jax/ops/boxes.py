"""Box operations on (x0, y0, x1, y1) boxes in absolute pixels.

All functions are pure jnp, shape-polymorphic over leading batch dims, and follow
detectron2/torchvision conventions: areas are (x1 - x0) * (y1 - y0) without +1.
"""
import jax.numpy as jnp


def area(boxes):
  """[..., 4] -> [...] box areas (may be negative for inverted boxes)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_intersection(a, b):
  """[..., N, 4], [..., M, 4] -> [..., N, M] intersection areas (>= 0)."""
  lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0.0)
  return wh[..., 0] * wh[..., 1]


def pairwise_iou(a, b):
  """[..., N, 4], [..., M, 4] -> [..., N, M] IoU, 0 where the union is empty.

  detectron2 `pairwise_iou` semantics: inter / (area_a + area_b - inter), and 0
  when the intersection is 0 (so empty boxes never match).
  """
  inter = pairwise_intersection(a, b)
  union = area(a)[..., :, None] + area(b)[..., None, :] - inter
  return jnp.where(inter > 0, inter / jnp.where(inter > 0, union, 1.0), 0.0)


def scale(boxes, sx, sy):
  """Scales x coordinates by sx and y by sy (broadcastable to boxes[..., 0])."""
  sx = jnp.asarray(sx, boxes.dtype)
  sy = jnp.asarray(sy, boxes.dtype)
  return jnp.stack([boxes[..., 0] * sx, boxes[..., 1] * sy,
                    boxes[..., 2] * sx, boxes[..., 3] * sy], axis=-1)


def clip(boxes, height, width):
  """Clips boxes to [0, width] x [0, height] (broadcastable to boxes[..., 0])."""
  height = jnp.asarray(height, boxes.dtype)
  width = jnp.asarray(width, boxes.dtype)
  return jnp.stack([jnp.clip(boxes[..., 0], 0, width), jnp.clip(boxes[..., 1], 0, height),
                    jnp.clip(boxes[..., 2], 0, width), jnp.clip(boxes[..., 3], 0, height)],
                   axis=-1)


def nonempty(boxes):
  """[..., 4] -> [...] bool: width > 0 and height > 0."""
  return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
