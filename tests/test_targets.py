"""FCOS targets, RoI matching and mask targets vs the training fixture and re-derivations."""
import functools
import json

import jax
import numpy as np
import pycocotools.mask as mask_util
import pytest

from centermask_jax.tools.parity_train import crop_level_first, sorted_fg
from centermask_jax.training import mask_targets as MT
from centermask_jax.training import targets as T
from fixture_gt import load_gt

# pycocotools decode trips a numpy-2 copy= DeprecationWarning in the reference code below.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LEVELS = ("p3", "p4", "p5", "p6", "p7")
STRIDES = (8, 16, 32, 64, 128)
PADDED = (608, 928)


# FCOS targets jitted (level_hw, strides, sizes, radius, classes static): eagerly, every
# primitive was its own XLA compile (~110-130 per call).
_FCOS_TARGETS = jax.jit(T.fcos_targets, static_argnums=(3, 5, 6, 7, 8))


def fcos_targets(gt_boxes, gt_classes, gt_valid, level_hw, padded_hw, *static):
  """T.fcos_targets, jitted (level_hw as a hashable tuple)."""
  return _FCOS_TARGETS(gt_boxes, gt_classes, gt_valid, tuple(map(tuple, level_hw)),
                       padded_hw, *static)


def load_train(fixture, g=6, p=3, v=20):
  """gt_instances.json + train_outputs.npz -> padded batch-contract GT arrays (N = 2)."""
  tr = np.load(fixture / "train_outputs.npz")
  gt = load_gt(fixture, g, p, v)
  for i in range(2):
    n = int(gt["gt_valid"][i].sum())
    np.testing.assert_array_equal(gt["gt_boxes"][i, :n], tr[f"img{i}_gt_boxes"])
  return tr, gt


def level_shapes(fixture):
  ev = np.load(fixture / "eval_outputs.npz")
  return [tuple(ev[f"fcos_ctrness_{l}"].shape[2:]) for l in LEVELS]


@pytest.mark.parametrize("canvas", ["official", "larger"])
def test_fcos_targets_match_fixture(lite_fixture, canvas):
  tr, gt = load_train(lite_fixture)
  official = level_shapes(lite_fixture)
  level_hw = official if canvas == "official" else [(-(-640 // s), -(-1024 // s))
                                                   for s in STRIDES]
  out = fcos_targets(gt["gt_boxes"], gt["gt_classes"], gt["gt_valid"], level_hw,
                     np.array([PADDED] * 2, np.int32))
  labels, reg, valid = (np.asarray(out[k]) for k in ("labels", "reg_targets", "loc_valid"))
  # Crop every level to the official region (and check what lies outside it).
  assert valid.sum() == 2 * sum(h * w for h, w in official)
  assert crop_level_first(valid, level_hw, official).all()
  assert np.all(labels[~valid] == 80)
  lab_lf = crop_level_first(labels, level_hw, official)
  reg_lf = crop_level_first(reg, level_hw, official)
  ref_labels = tr["fcos_labels_levelfirst"]
  np.testing.assert_array_equal(lab_lf, ref_labels)
  pos = ref_labels < 80
  assert pos.sum() == tr["fcos_num_pos"] == (labels < 80).sum()
  np.testing.assert_array_equal(reg_lf[pos], tr["fcos_reg_targets_levelfirst"][pos])


def numpy_fcos_targets(boxes, classes, level_hw, strides, soi, radius, c, padded):
  """Per-location loop re-derivation of the official assignment for one image."""
  bounds = [-1.0] + list(soi) + [1e8]
  labels, regs = [], []
  if len(boxes) and (boxes[0, 0] + boxes[0, 2]) / np.float32(2) == 0:
    quirk = True
  else:
    quirk = False
  for lvl, ((h, w), s) in enumerate(zip(level_hw, strides)):
    vh, vw = -(-padded[0] // s), -(-padded[1] // s)
    for i in range(h):
      for j in range(w):
        x, y = np.float32(j * s + s // 2), np.float32(i * s + s // 2)
        best, best_area, best_reg = -1, np.float32(1e8), np.zeros(4, np.float32)
        for g, b in enumerate(boxes):
          reg = np.array([x - b[0], y - b[1], b[2] - x, b[3] - y], np.float32)
          cx, cy = (b[0] + b[2]) / np.float32(2), (b[1] + b[3]) / np.float32(2)
          rs = np.float32(s * radius)
          sb = [max(cx - rs, b[0]), max(cy - rs, b[1]), min(cx + rs, b[2]), min(cy + rs, b[3])]
          inside = min(x - sb[0], y - sb[1], sb[2] - x, sb[3] - y) > 0 and not quirk
          cared = bounds[lvl] <= reg.max() <= bounds[lvl + 1]
          area = np.float32((b[2] - b[0]) * (b[3] - b[1]))
          if inside and cared and area < best_area:
            best, best_area, best_reg = g, area, reg
        ok = i < vh and j < vw and best >= 0
        labels.append(classes[best] if ok else c)
        regs.append(best_reg / np.float32(s))
  return np.array(labels), np.array(regs)


def test_fcos_targets_numpy_rederivation():
  rng = np.random.default_rng(0)
  strides, soi, level_hw = (8, 16, 32), (16, 32), [(12, 14), (6, 7), (3, 4)]
  padded = np.array([[96, 96], [64, 64], [96, 64]], np.int32)
  g = 16
  xy = rng.uniform(0, 80, (3, g, 2))
  wh = rng.uniform(4, 70, (3, g, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  boxes[0, 2] = boxes[0, 1]  # two identical boxes: the first index must win
  boxes[0, 3] = boxes[0, 1] + np.float32([1, 1, 1, 1])
  boxes[1, 0] = [-10, 5, 10, 30]  # first GT centre x == 0: no positives (official quirk)
  classes = rng.integers(0, 7, (3, g)).astype(np.int32)
  classes[0, 2] = 5
  classes[0, 1] = 3
  valid = np.ones((3, g), bool)
  valid[2, 10:] = False
  out = fcos_targets(boxes, classes, valid, level_hw, padded, strides, soi, 1.5, 7)
  per_level = np.zeros(3, int)
  for n in range(3):
    ref_l, ref_r = numpy_fcos_targets(boxes[n][valid[n]], classes[n][valid[n]], level_hw,
                                      strides, soi, 1.5, 7, padded[n])
    labels = np.asarray(out["labels"][n])
    np.testing.assert_array_equal(labels, ref_l)
    pos = ref_l < 7
    per_level += [x.sum() for x in T.split_levels(pos[None], level_hw)]
    np.testing.assert_array_equal(np.asarray(out["reg_targets"][n])[pos], ref_r[pos])
  assert (np.asarray(out["labels"][1]) == 7).all()
  assert (per_level >= 5).all(), per_level  # every level has positives


def test_fcos_targets_no_recompile():
  level_hw = ((8, 8), (4, 4))
  f = jax.jit(functools.partial(T.fcos_targets, level_hw=level_hw, strides=(8, 16),
                                sizes_of_interest=(32,)))
  rng = np.random.default_rng(1)
  for _ in range(2):
    xy = rng.uniform(0, 40, (2, 3, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (2, 3, 2))], -1).astype(np.float32)
    out = f(boxes, rng.integers(0, 80, (2, 3)).astype(np.int32), np.ones((2, 3), bool),
            padded_hw=np.array([[64, 64], [32, 64]], np.int32))
    jax.block_until_ready(out)
  assert f._cache_size() == 1


def fixture_rois(tr, gt):
  props = np.stack([tr[f"img{i}_train_proposals_boxes"] for i in range(2)])
  return T.match_rois(props, np.ones(props.shape[:2], bool), gt["gt_boxes"], gt["gt_classes"],
                      gt["gt_valid"], gt["image_hw"])


def test_match_rois_fixture(lite_fixture):
  tr, gt = load_train(lite_fixture)
  rois = fixture_rois(tr, gt)
  assert rois["boxes"].shape == (2, 100 + 6, 4)
  for i in range(2):
    boxes, cls, gtb, lvl = sorted_fg(rois, i, rois["boxes"], rois["gt_classes"],
                                     rois["gt_boxes"], rois["levels"])
    np.testing.assert_array_equal(boxes, tr[f"img{i}_fg_roi_boxes"])
    np.testing.assert_array_equal(cls, tr[f"img{i}_fg_roi_gt_classes"])
    np.testing.assert_array_equal(gtb, tr[f"img{i}_fg_roi_gt_boxes"])
    np.testing.assert_array_equal(lvl + 3, tr[f"img{i}_fg_roi_level"])


def numpy_iou(a, b):
  """[G, 4], [R, 4] -> [G, R] detectron2 pairwise IoU in float64."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.clip(rb - lt, 0, None).prod(-1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(inter > 0, inter / np.where(inter > 0, union, 1), 0)


def test_match_rois_rederivation_cap_and_ties():
  rng = np.random.default_rng(2)
  n, p, g, max_fg = 2, 40, 4, 10
  gt_boxes = np.array([[10, 10, 50, 60], [10, 10, 50, 60], [60, 20, 90, 40], [0, 0, 0, 0]],
                      np.float32)[None].repeat(n, 0)
  gt_classes = np.array([[3, 4, 5, 6]] * n, np.int32)
  gt_valid = np.array([[True, True, True, False]] * n)
  gt_valid[1, 2] = False
  jitter = rng.uniform(-6, 6, (n, p, 4)).astype(np.float32)
  props = (gt_boxes[:, rng.integers(0, 3, p)] + jitter).astype(np.float32)
  pvalid = rng.uniform(size=(n, p)) > 0.2
  image_hw = np.array([[100, 120], [80, 80]], np.int32)
  out = T.match_rois(props, pvalid, gt_boxes, gt_classes, gt_valid, image_hw, max_fg=max_fg)
  for i in range(n):
    boxes = np.concatenate([props[i], gt_boxes[i]])
    valid = np.concatenate([pvalid[i], gt_valid[i]])
    iou = numpy_iou(gt_boxes[i][gt_valid[i]], boxes)
    gidx = np.nonzero(gt_valid[i])[0]
    matched = gidx[iou.argmax(0)]
    cand = valid & (iou.max(0) >= 0.5)
    fg = cand & (np.cumsum(cand) <= max_fg)
    assert cand.sum() > max_fg
    np.testing.assert_array_equal(np.asarray(out["fg"][i]), fg)
    np.testing.assert_array_equal(np.asarray(out["matched_idx"][i])[cand], matched[cand])
    np.testing.assert_array_equal(np.asarray(out["gt_classes"][i])[cand],
                                  gt_classes[i][matched[cand]])
    assert np.asarray(out["matched_idx"][i])[p] == 0  # tie between GT 0 and 1 -> first
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with np.errstate(divide="ignore"):
      k = np.ceil(5 - np.log2(np.float32(image_hw[i].prod()) / area))
    np.testing.assert_array_equal(np.asarray(out["levels"][i])[area > 0],
                                  np.clip(k, 3, 5)[area > 0] - 3)
  # Random cap: exactly max_fg, drawn among the candidates, depends on the key.
  picks = []
  for seed in (0, 1):
    o = T.match_rois(props, pvalid, gt_boxes, gt_classes, gt_valid, image_hw, max_fg=max_fg,
                     rng=jax.random.PRNGKey(seed))
    fg = np.asarray(o["fg"])
    assert (fg.sum(1) == max_fg).all()
    full = np.asarray(T.match_rois(props, pvalid, gt_boxes, gt_classes, gt_valid, image_hw,
                                   max_fg=1000)["fg"])
    assert not (fg & ~full).any()
    picks.append(fg)
  assert (picks[0] != picks[1]).any()


def test_select_fg_and_no_recompile():
  rng = np.random.default_rng(3)
  f = jax.jit(functools.partial(T.match_rois, max_fg=5))
  sel = jax.jit(functools.partial(T.select_fg, k=8))
  for _ in range(2):
    gt = np.array([[[0, 0, 30, 30], [40, 40, 80, 90]]] * 2, np.float32)
    props = (gt[:, rng.integers(0, 2, 12)] + rng.uniform(-8, 8, (2, 12, 4))).astype(np.float32)
    rois = f(props, np.ones((2, 12), bool), gt, np.array([[1, 2]] * 2, np.int32),
             np.ones((2, 2), bool), np.array([[100, 100]] * 2, np.int32),
             rng=jax.random.PRNGKey(int(rng.integers(100))))
    s = sel(rois)
    fg = np.asarray(rois["fg"])
    for i in range(2):
      idx = np.nonzero(fg[i])[0]
      kept = np.asarray(s["boxes"][i])[np.asarray(s["fg"][i])]
      np.testing.assert_array_equal(kept, np.asarray(rois["boxes"][i])[idx])
      assert np.asarray(s["fg"][i])[:len(idx)].all() and not np.asarray(s["fg"][i])[len(idx):].any()
  assert f._cache_size() == 1 and sel._cache_size() == 1


def test_mask_targets_fixture_bit_exact(lite_fixture):
  tr, gt = load_train(lite_fixture)
  rois = fixture_rois(tr, gt)
  targets, ratio = jax.jit(MT.mask_targets)(rois["boxes"], rois["matched_idx"], rois["fg"],
                                            gt["gt_polys"], gt["gt_poly_len"])
  targets, ratio = np.asarray(targets), np.asarray(ratio)
  assert targets.shape == (2, 106, 28, 28) and targets.dtype == bool
  fg = np.asarray(rois["fg"])
  assert not targets[~fg].any() and not ratio[~fg].any()
  for i in range(2):
    t, = sorted_fg(rois, i, targets)
    np.testing.assert_array_equal(t, tr[f"img{i}_fg_roi_mask_targets_28"])
    assert t.sum() > 100
    # Ratios vs the official recipe on the float64 polygons of gt_instances.json.
    r, boxes, midx = sorted_fg(rois, i, ratio, rois["boxes"], rois["matched_idx"])
    polys = json.loads((lite_fixture / "gt_instances.json").read_text())[f"img{i}"]["polygons"]
    ref = [official_style_target([np.asarray(p, np.float64) for p in polys[m]], b)[1]
           for b, m in zip(boxes, midx)]
    np.testing.assert_allclose(r, ref, rtol=1e-6)
    assert (r > 0.5).all() and (r < 1).any()


def official_style_target(parts, box, size=28):
  """Test-side transliteration of the detectron2/centermask2 recipe for one RoI."""
  box = box.astype(np.float32)
  w, h = box[2] - box[0], box[3] - box[1]
  shifted = [np.concatenate([[px - box[0], py - box[1]] for px, py in p.reshape(-1, 2)])
             for p in parts]
  area = mask_util.area(mask_util.frPyObjects(shifted, int(h), int(w))).sum()
  shoelace = sum(0.5 * abs(np.dot(p[0::2], np.roll(p[1::2], 1))
                           - np.dot(p[1::2], np.roll(p[0::2], 1))) for p in parts)
  rh, rw = size / max(h, 0.1), size / max(w, 0.1)
  scaled = [np.concatenate([[x * rw, y * rh] for x, y in q.reshape(-1, 2)]) for q in shifted]
  mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(scaled, size, size)))
  return mask.astype(bool), min(max(area / shoelace, 0.0), 1.0)


def test_mask_targets_edge_cases_and_no_recompile():
  rng = np.random.default_rng(4)
  polys = np.zeros((1, 2, 3, 8, 2), np.float32)
  lens = np.zeros((1, 2, 3), np.int32)
  polys[0, 0, 0, :4] = [[10, 10], [30, 12], [28, 35], [12, 30]]
  polys[0, 0, 1, :3] = [[20, 20], [40, 22], [35, 40]]  # overlapping second part
  polys[0, 1, 2, :5] = [[50, 50], [70, 52], [75, 70], [60, 80], [48, 66]]
  lens[0, 0, :2] = [4, 3]
  lens[0, 1, 2] = 5
  boxes = np.array([[[10, 10, 40, 40], [15.3, 14.7, 33.9, 27.2], [50, 50, 50.05, 80],
                     [45.5, 48.2, 80.7, 82.1], [0, 0, 5, 5], [55, 55, 90, 95]]], np.float32)
  matched = np.array([[0, 0, 1, 1, 1, 1]], np.int32)
  valid = np.array([[True, True, True, True, True, False]])
  f = jax.jit(functools.partial(MT.mask_targets, mask_size=28))  # own cache
  t, r = f(boxes, matched, valid, polys, lens)
  compiled = f._cache_size()
  for k in range(5):
    parts = [polys[0, matched[0, k], j, :lens[0, matched[0, k], j]].reshape(-1).astype(np.float64)
             for j in range(3) if lens[0, matched[0, k], j]]
    ref_t, ref_r = official_style_target(parts, boxes[0, k])
    np.testing.assert_array_equal(np.asarray(t[0, k]), ref_t)
    np.testing.assert_allclose(float(r[0, k]), ref_r, rtol=1e-6)
  assert float(r[0, 4]) == 0.0 and not np.asarray(t[0, 5]).any()
  assert np.asarray(t[0, 2]).any()  # width 0.05 < 0.1 branch still rasterises
  t2, _ = f(boxes + rng.uniform(0, 1, boxes.shape).astype(np.float32), matched, valid, polys,
            lens)
  assert not np.array_equal(np.asarray(t2), np.asarray(t))
  assert f._cache_size() == compiled == 1


def test_mask_targets_in_pmap(lite_fixture):
  tr, gt = load_train(lite_fixture)
  rois = fixture_rois(tr, gt)
  ref_t, ref_r = MT.mask_targets(rois["boxes"], rois["matched_idx"], rois["fg"],
                                 gt["gt_polys"], gt["gt_poly_len"])
  order = np.array([0, 1, 1, 0])  # 4 devices, one image each
  shard = lambda a: np.asarray(a)[order][:, None]
  t, r = jax.pmap(MT.mask_targets)(shard(rois["boxes"]), shard(rois["matched_idx"]),
                                   shard(rois["fg"]), shard(gt["gt_polys"]),
                                   shard(gt["gt_poly_len"]))
  np.testing.assert_array_equal(np.asarray(t)[:, 0], np.asarray(ref_t)[order])
  np.testing.assert_array_equal(np.asarray(r)[:, 0], np.asarray(ref_r)[order])
  # vmap over a leading axis also goes through the callback (broadcast_all).
  tv, _ = jax.vmap(MT.mask_targets)(shard(rois["boxes"]), shard(rois["matched_idx"]),
                                    shard(rois["fg"]), shard(gt["gt_polys"]),
                                    shard(gt["gt_poly_len"]))
  np.testing.assert_array_equal(np.asarray(tv)[:, 0], np.asarray(ref_t)[order])


def test_mask_targets_float64_words_exact():
  # Vertices 5x-upsampled onto .5 boundaries: float32 rounding flips pixels, the float64
  # bit pattern (uint32 words) reproduces the official float64 rasterisation exactly.
  xs = np.arange(5.1, 22, 0.8)
  m = len(xs)
  p64 = np.stack([np.array([[x - 1e-9, 3.0], [22.0, 5.3], [x - 1e-9, 20.1 - 1e-9], [3.3, 12.0]])
                  for x in xs])[None, :, None]  # [1, M, 1, 4, 2]
  lens = np.full((1, m, 1), 4, np.int32)
  boxes = np.tile(np.array([0, 0, 28, 28], np.float32), (1, m, 1))
  args = (boxes, np.arange(m, dtype=np.int32)[None], np.ones((1, m), bool))
  t64, _ = jax.jit(MT.mask_targets)(*args, MT.float64_words(p64), lens)
  t32, _ = MT.mask_targets(*args, p64.astype(np.float32), lens)
  ref = np.stack([official_style_target([p64[0, k, 0].reshape(-1)], boxes[0, k])[0]
                  for k in range(m)])
  np.testing.assert_array_equal(np.asarray(t64)[0], ref)
  assert (np.asarray(t32)[0] != ref).any()
