"""On-device mask targets (ops/polygon_raster) vs pycocotools and detectron2's recipe."""
import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pycocotools.mask as mask_util
import pytest

from centermask_jax.data import transforms
from centermask_jax.training import mask_targets as MT

S = 28


# --- detectron2's recipe, re-derived here in NumPy + pycocotools ----------------------------
def d2_transform(poly, in_hw, out_hw, flip):
  """ResizeTransform then HFlipTransform on flat float64 [x0, y0, ...] (apply_coords)."""
  c = np.asarray(poly, dtype=float).reshape(-1, 2).copy()
  c[:, 0] = c[:, 0] * (out_hw[1] * 1.0 / in_hw[1])
  c[:, 1] = c[:, 1] * (out_hw[0] * 1.0 / in_hw[0])
  if flip:
    c[:, 0] = out_hw[1] - c[:, 0]
  return c.reshape(-1)


def d2_within_box(polygons, box):
  """rasterize_polygons_within_box semantics (box float32 [4]) -> bool [S, S]."""
  w, h = box[2] - box[0], box[3] - box[1]
  polygons = copy.deepcopy(polygons)
  for p in polygons:
    p[0::2] = p[0::2] - box[0]
    p[1::2] = p[1::2] - box[1]
  ratio_h = S / max(h, 0.1)
  ratio_w = S / max(w, 0.1)
  for p in polygons:
    p[0::2] *= ratio_w
    p[1::2] *= ratio_h
  rle = mask_util.merge(mask_util.frPyObjects(polygons, S, S))
  return mask_util.decode(rle).astype(bool)


def d2_ratio(polygons, box):
  """centermask2's MaskIoU ratio: per-part areas on the int(h) x int(w) crop / area."""
  shifted = []
  for p in polygons:
    q = p.copy()
    q[0::2] -= box[0]
    q[1::2] -= box[1]
    shifted.append(q)
  hi, wi = max(int(box[3] - box[1]), 0), max(int(box[2] - box[0]), 0)
  crop = float(mask_util.area(mask_util.frPyObjects(shifted, hi, wi)).sum())
  full = sum(0.5 * np.abs(np.dot(p[0::2], np.roll(p[1::2], 1)) -
                          np.dot(p[1::2], np.roll(p[0::2], 1))) for p in polygons)
  return np.float32(min(max(crop / full, 0.0), 1.0) if full > 0 else 0.0)


# --- the device function under test, one compiled instance ----------------------------------
@functools.lru_cache(maxsize=None)
def device_fn():
  return jax.jit(lambda boxes, valid, batch: MT.device_mask_targets(
      boxes[None], jnp.arange(boxes.shape[0])[None], valid[None], batch, S, num_parts=16))


def run_device(boxes, packed, chunk=256):
  """boxes [R, 4], packed (xy [R, K, 2, 2], part [R, K], area [R, 2]), one GT per RoI;
  run in padded chunks of `chunk` RoIs (one compiled shape)."""
  ms, rs = [], []
  for i in range(0, len(boxes), chunk):
    n = min(chunk, len(boxes) - i)
    pad = lambda a: np.concatenate([a[i:i + n], np.zeros((chunk - n,) + a.shape[1:], a.dtype)])
    batch = {"gt_poly_xy64": pad(packed[0])[None], "gt_poly_part": pad(packed[1])[None],
             "gt_poly_area64": pad(packed[2])[None]}
    valid = np.arange(chunk) < n
    m, r, over = device_fn()(jnp.asarray(pad(np.asarray(boxes))), jnp.asarray(valid), batch)
    assert not bool(over)
    ms.append(np.asarray(m[0])[:n])
    rs.append(np.asarray(r[0])[:n])
  return np.concatenate(ms), np.concatenate(rs)


def random_boxes(rng, parts, n):
  """n float32 boxes around an instance: jittered bounds, some thin (w < 1, < 0.1)."""
  allp = np.concatenate(parts)
  (x0, y0), (x1, y1) = allp.min(0), allp.max(0)
  bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
  out = []
  for i in range(n):
    b = np.array([x0, y0, x1, y1]) + rng.normal(0, 0.15, 4) * [bw, bh, bw, bh]
    if i == n - 1:
      b[2] = b[0] + rng.choice([0.0, 0.05, 0.5])
    out.append(np.array([b[0], b[1], max(b[0], b[2]), max(b[1], b[3])], np.float32))
  return out


def compare(boxes, instances, packed):
  """Device targets vs detectron2's recipe and the pycocotools callback body."""
  m, r = run_device(np.stack(boxes), packed)
  ref_m = np.stack([d2_within_box([p.reshape(-1).copy() for p in inst], b)
                    for b, inst in zip(boxes, instances)])
  ref_r = np.stack([d2_ratio([p.reshape(-1).copy() for p in inst], b)
                    for b, inst in zip(boxes, instances)])
  cb_m, cb_r = MT._host_packed_targets(
      np.stack(boxes)[None], np.arange(len(boxes))[None], np.ones((1, len(boxes)), bool),
      packed[0][None], packed[1][None], S)
  return (int((m != ref_m).sum()), int((r != ref_r).sum()), int((m != cb_m[0]).sum()),
          int((r != cb_r[0]).sum()))


def test_tiny_coco_every_instance_exact(tiny_coco):
  """Every polygon instance of tiny_coco train, transformed as in training (resize to a
  training scale, flip) by the pipeline's code, 4 random boxes each: 0 differing pixels
  and equal MaskIoU ratios against detectron2's recipe (float64 transform from the JSON
  here) and against the pycocotools callback; the pipeline's float64 bits are detectron2's."""
  with open(tiny_coco / "annotations" / "instances_train2017.json") as f:
    data = json.load(f)
  anns = {}
  for a in data["annotations"]:
    anns.setdefault(a["image_id"], []).append(a)
  rng = np.random.default_rng(0)
  k = 512
  n_inst = 0
  boxes, instances, xy, part, area = [], [], [], [], []
  for img in data["images"]:
    objs = [a for a in anns.get(img["id"], []) if not a["iscrowd"]
            and isinstance(a["segmentation"], list)]
    if not objs:
      continue
    in_hw = (img["height"], img["width"])
    short = int(rng.choice([640, 672, 704, 736, 768, 800]))
    out_hw = transforms.get_output_shape(*in_hw, short, 1333)
    flip = bool(rng.random() < 0.5)
    segs = [a["segmentation"] for a in objs]
    gt, counts = transforms.instance_targets(
        in_hw=in_hw, out_hw=out_hw, flip=flip, bbox=np.array([a["bbox"] for a in objs]),
        label=np.zeros(len(objs), np.int32), is_crowd=np.zeros(len(objs), bool),
        num_parts=np.array([len(s) for s in segs]),
        poly_len=np.array([len(p) // 2 for s in segs for p in s]),
        poly_xy=np.concatenate([np.asarray(p, np.float64).reshape(-1, 2)
                                for s in segs for p in s]),
        max_instances=100, max_parts=16, max_vertices=256, max_instance_vertices=k)
    assert not counts.any()
    for i, s in enumerate(segs):
      parts = [d2_transform(p, in_hw, out_hw, flip) for p in s]
      # The pipeline carries detectron2's float64 coordinates and area bit for bit.
      ref_xy, ref_part, ref_area = transforms.pack_polygons([p.reshape(-1, 2) for p in parts], k)
      np.testing.assert_array_equal(gt["gt_poly_xy64"][i], ref_xy)
      np.testing.assert_array_equal(gt["gt_poly_part"][i], ref_part)
      full = sum(0.5 * np.abs(np.dot(p[0::2], np.roll(p[1::2], 1)) -
                              np.dot(p[1::2], np.roll(p[0::2], 1))) for p in parts)
      assert gt["gt_poly_area64"][i].view(np.float64)[0] == full
      for b in random_boxes(rng, [p.reshape(-1, 2) for p in parts], 4):
        boxes.append(b)
        instances.append([p.reshape(-1, 2) for p in parts])
        xy.append(gt["gt_poly_xy64"][i])
        part.append(gt["gt_poly_part"][i])
        area.append(gt["gt_poly_area64"][i])
      n_inst += 1
  assert n_inst == 465
  totals = compare(boxes, instances, (np.stack(xy), np.stack(part), np.stack(area)))
  assert totals == (0, 0, 0, 0), totals


def test_exact_ties_and_fma():
  """Vertices on the 1/5-pixel grid make pycocotools' float64 rounding land on exact ties
  (e.g. 0.7 * 15 - 3 + .5 = 8 exactly, 7.999... if fused into an FMA): random polygons
  and boxes on that grid, also reaching outside the box and above/left of it."""
  rng = np.random.default_rng(1)
  boxes, instances, xy, part, area = [], [], [], [], []
  for _ in range(300):
    parts = [rng.integers(-40, 200, (int(rng.integers(3, 12)), 2)) / 5.0
             for _ in range(int(rng.integers(1, 3)))]
    b = np.sort(rng.integers(-10, 150, (2, 2)) / 5.0, axis=0).reshape(-1)[[0, 2, 1, 3]]
    b = np.array([b[0], b[1], b[0] + max(b[2] - b[0], 0), b[1] + max(b[3] - b[1], 0)],
                 np.float32)
    p = transforms.pack_polygons(parts, 512)
    boxes.append(b)
    instances.append(parts)
    xy.append(p[0])
    part.append(p[1])
    area.append(p[2])
  # The reported XLA:CPU FMA case: edge (11, 118) -> (-3, 98) on the 5x grid at column 1.
  parts = [np.array([[2.2, 23.6], [-0.6, 19.6], [3.0, 30.0]])]
  p = transforms.pack_polygons(parts, 512)
  boxes.append(np.array([0, 0, 8, 40], np.float32))
  instances.append(parts)
  xy.append(p[0])
  part.append(p[1])
  area.append(p[2])
  assert compare(boxes, instances, (np.stack(xy), np.stack(part), np.stack(area))) == (0, 0, 0, 0)


def test_no_recompile_same_shapes():
  rng = np.random.default_rng(2)
  fn = device_fn()

  def batch(seed):
    r = np.random.default_rng(seed)
    parts = [r.uniform(0, 50, (6, 2))]
    p = transforms.pack_polygons(parts, 512)
    return (np.stack([np.array([5, 5, 45, 45], np.float32)] * 3),
            tuple(np.stack([a] * 3) for a in p))
  run_device(*batch(0))
  n = fn._cache_size()
  run_device(*batch(1))
  assert fn._cache_size() == n == 1
  del rng


def test_padded_layout_fallback_equals_packed():
  """Batches without the packed fields (float32 [M, P, V, 2]) give the targets of their
  float32 coordinates: same as packing those float32 values."""
  rng = np.random.default_rng(3)
  polys = np.zeros((1, 2, 3, 8, 2), np.float32)
  plen = np.zeros((1, 2, 3), np.int32)
  polys[0, 0, 0, :5] = rng.uniform(0, 60, (5, 2))
  polys[0, 0, 2, :4] = rng.uniform(0, 60, (4, 2))
  polys[0, 1, 1, :7] = rng.uniform(0, 60, (7, 2))
  plen[0, 0, 0], plen[0, 0, 2], plen[0, 1, 1] = 5, 4, 7
  boxes = np.array([[[3, 4, 50, 55], [10, 2, 30, 70], [0, 0, 60, 60]]], np.float32)
  idx = np.array([[0, 1, 0]])
  valid = np.ones((1, 3), bool)
  m, r, _ = jax.jit(MT.device_mask_targets)(boxes, idx, valid,
                                             {"gt_polys": polys, "gt_poly_len": plen})
  packed = [transforms.pack_polygons(
      [polys[0, g, j, :plen[0, g, j]].astype(np.float64) for j in range(3) if plen[0, g, j]], 32)
      for g in range(2)]
  cb_m, cb_r = MT._host_packed_targets(boxes, idx, valid, np.stack([p[0] for p in packed])[None],
                                       np.stack([p[1] for p in packed])[None], S)
  np.testing.assert_array_equal(np.asarray(m), cb_m)
  np.testing.assert_allclose(np.asarray(r), cb_r, rtol=1e-6)  # area summed in another order


def _lowered_step_text(impl):
  from centermask_jax.config import base_config, lite, vovnet
  from centermask_jax.models.centermask import CenterMask
  from centermask_jax.training import optimizer as O
  from centermask_jax.training import step as step_lib
  c = lite(base_config())
  vovnet(c, "V-19-slim-dw-eSE")
  c.model.num_classes = 3
  c.model.fpn_channels = c.model.mask_head.conv_dim = c.model.maskiou_head.conv_dim = 32
  c.model.fcos.post_nms_topk_train, c.model.fcos.pre_nms_topk = 8, 50
  c.model.roi.max_fg_per_image = 10
  c.data.max_instances, c.data.max_polygon_parts, c.data.max_polygon_vertices = 2, 2, 4
  c.model.mask_head.target_impl = impl
  model = CenterMask(c)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
  tx = O.make_optimizer(c, v["params"])
  state = jax.eval_shape(lambda: step_lib.init_state(v["params"], v["frozen_bn"], tx))
  d, b, m, k = 1, 1, 2, 8
  sds = jax.ShapeDtypeStruct
  batch = dict(
      image=sds((d, b, 64, 64, 3), jnp.float32), image_hw=sds((d, b, 2), jnp.int32),
      padded_hw=sds((d, b, 2), jnp.int32), gt_boxes=sds((d, b, m, 4), jnp.float32),
      gt_classes=sds((d, b, m), jnp.int32), gt_valid=sds((d, b, m), jnp.bool_),
      gt_polys=sds((d, b, m, 2, 4, 2), jnp.float32), gt_poly_len=sds((d, b, m, 2), jnp.int32),
      gt_poly_xy64=sds((d, b, m, k, 2, 2), jnp.uint32), gt_poly_part=sds((d, b, m, k), jnp.int32),
      gt_poly_area64=sds((d, b, m, 2), jnp.uint32))
  state = jax.tree_util.tree_map(lambda s: sds((d,) + s.shape, s.dtype), state)
  step = step_lib.make_train_step(model, c, tx, O.lr_schedule(c), devices=jax.local_devices()[:1])
  return step.lower(state, batch, jax.random.PRNGKey(0)).as_text()


def test_default_train_step_has_no_host_callback():
  from centermask_jax.config import base_config
  assert base_config().model.mask_head.target_impl == "device"
  assert "callback" not in _lowered_step_text("device")
  assert "callback" in _lowered_step_text("pycocotools")  # the check can see one
