"""Mask paste-back vs the centermask2 fixtures, a NumPy grid_sample re-derivation, pycocotools."""
import jax
import numpy as np
import pytest
from pycocotools import mask as mask_util

from centermask_jax.ops import masks as mask_ops

# A pixel may legitimately differ from the reference only where the bilinear value is
# within float rounding of the threshold; allow at most this many such pixels per instance.
MAX_FLIPS_PER_INSTANCE = 3
NEAR_THRESHOLD = 1e-5

# The soft paste as it runs inside jit (XLA fusion must not change the grid arithmetic).
_soft_paste = jax.jit(mask_ops.paste_mask_probs, static_argnums=2)


def _unpack(packed, shape):
  return np.unpackbits(packed, axis=-1)[..., :int(shape[2])].astype(bool)


def _check_against_reference(probs, boxes, ref_masks):
  """Pastes and compares with reference bool masks; returns the per-instance flip counts."""
  hw = ref_masks.shape[1:]
  out = np.asarray(mask_ops.paste_masks(probs, boxes, hw))
  soft = np.asarray(_soft_paste(probs, boxes, hw))
  diff = out != ref_masks
  flips = diff.sum(axis=(1, 2))
  assert flips.max() <= MAX_FLIPS_PER_INSTANCE, flips
  assert np.all(np.abs(soft[diff] - 0.5) < NEAR_THRESHOLD)
  assert ref_masks.sum() > 0
  return flips


def test_paste_matches_fixture_detections(lite_fixture):
  ev = np.load(lite_fixture / "eval_outputs.npz")
  for i in range(2):
    ref = _unpack(ev[f"img{i}_final_masks_packed"], ev[f"img{i}_final_masks_shape"])
    flips = _check_against_reference(ev[f"img{i}_mask_probs"][:, 0], ev[f"img{i}_final_boxes"],
                                     ref)
    print(f"img{i}: {flips.sum()} differing pixels over {ref.sum()} foreground")


def test_paste_matches_fixture_given_boxes(lite_fixture):
  gv = np.load(lite_fixture / "given_boxes_outputs.npz")
  for i in range(2):
    src = gv[f"img{i}_given_final_src_index"]
    ref = _unpack(gv[f"img{i}_given_final_masks_packed"], gv[f"img{i}_given_final_masks_shape"])
    flips = _check_against_reference(gv[f"img{i}_given_mask_probs"][src, 0],
                                     gv[f"img{i}_given_final_boxes"], ref)
    print(f"img{i} given: {flips.sum()} differing pixels over {ref.sum()} foreground")


def _numpy_grid_sample_paste(mask, box, h, w):
  """Scalar re-derivation: F.grid_sample(bilinear, align_corners=False, zeros) per pixel.

  Grid coordinates are computed in float32 exactly as detectron2 builds them (and as
  ATen's CPU kernel unnormalises them: (g + 1) * size / 2 - 0.5); the bilinear
  interpolation itself is done in float64.
  """
  f32 = np.float32
  m_h, m_w = mask.shape
  x0, y0, x1, y1 = (f32(v) for v in box)
  out = np.zeros((h, w), np.float64)
  for py in range(h):
    gy = (f32(py) + f32(0.5) - y0) / (y1 - y0) * f32(2) - f32(1)
    sy = float((gy + f32(1)) * f32(m_h / 2) - f32(0.5))
    for px in range(w):
      gx = (f32(px) + f32(0.5) - x0) / (x1 - x0) * f32(2) - f32(1)
      sx = float((gx + f32(1)) * f32(m_w / 2) - f32(0.5))
      iy, ix = int(np.floor(sy)), int(np.floor(sx))
      ty, tx = sy - iy, sx - ix
      val = 0.0
      for yy, wy in ((iy, 1 - ty), (iy + 1, ty)):
        for xx, wx in ((ix, 1 - tx), (ix + 1, tx)):
          if 0 <= yy < m_h and 0 <= xx < m_w:
            val += wy * wx * float(mask[yy, xx])
      out[py, px] = val
  return out


def _random_case(rng, r, h, w, m=28):
  probs = rng.random((r, m, m), dtype=np.float32)
  xs = np.sort(rng.uniform(-0.4 * w, 1.4 * w, (r, 2)), axis=1)
  ys = np.sort(rng.uniform(-0.4 * h, 1.4 * h, (r, 2)), axis=1)
  boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)
  boxes[0] = [-3.2, -2.7, 0.6 * w, 0.5 * h]  # partly outside top-left
  boxes[1] = [0.5 * w, 0.3 * h, w + 5.3, h + 2.1]  # partly outside bottom-right
  boxes[2] = [1.3, 2.2, 4.9, 5.1]  # smaller than the mask grid: strong upsampling
  return probs, boxes


def test_paste_matches_numpy_grid_sample():
  rng = np.random.default_rng(0)
  r, h, w = 7, 13, 17
  probs, boxes = _random_case(rng, r, h, w)
  soft = np.asarray(_soft_paste(probs, boxes, (h, w)))
  hard = np.asarray(mask_ops.paste_masks(probs, boxes, (h, w)))
  ref = np.stack([_numpy_grid_sample_paste(probs[k], boxes[k], h, w) for k in range(r)])
  assert soft.shape == (r, h, w) and hard.dtype == bool
  np.testing.assert_allclose(soft, ref, rtol=0, atol=1e-6)
  ambiguous = np.abs(ref - 0.5) < NEAR_THRESHOLD
  np.testing.assert_array_equal(hard[~ambiguous], (ref >= 0.5)[~ambiguous])
  assert 0 < hard.sum() < hard.size
  assert np.any(ref[0] > 0) and np.any(ref[1] > 0)


def test_paste_empty_boxes_are_false():
  probs = np.ones((3, 28, 28), np.float32)
  boxes = np.array([[4, 2, 4, 9], [1, 5, 8, 5], [9, 9, 3, 3]], np.float32)
  out = np.asarray(mask_ops.paste_masks(probs, boxes, (12, 10)))
  assert not out.any()
  # Sanity: the same probabilities with a proper box do paste.
  out = np.asarray(mask_ops.paste_masks(probs[:1], np.array([[1, 1, 6, 6]], np.float32), (12, 10)))
  np.testing.assert_array_equal(np.argwhere(out[0]).min(0), [1, 1])
  np.testing.assert_array_equal(np.argwhere(out[0]).max(0), [5, 5])


def test_canvas_equals_exact_size_cropped():
  rng = np.random.default_rng(1)
  n, k, canvas = 2, 5, (24, 32)
  sizes = np.array([[19, 23], [24, 17]], np.int32)
  probs = rng.random((n, k, 28, 28), dtype=np.float32)
  boxes = np.stack([_random_case(rng, k, int(h), int(w))[1] for h, w in sizes])
  out = np.asarray(mask_ops.paste_masks_on_canvas(probs, boxes, sizes, canvas))
  assert out.shape == (n, k) + canvas
  for i, (h, w) in enumerate(sizes):
    exact = np.asarray(mask_ops.paste_masks(probs[i], boxes[i], (int(h), int(w))))
    np.testing.assert_array_equal(out[i, :, :h, :w], exact)
    assert not out[i, :, h:, :].any() and not out[i, :, :, w:].any()
    assert exact.any()
  # Boxes reaching beyond the image do paint the canvas margin without image_hw.
  unmasked = np.asarray(mask_ops.paste_masks(probs, boxes, canvas))
  assert unmasked[1, :, :, 17:].any()


def test_paste_masks_does_not_recompile():
  hw = (11, 9)
  before = mask_ops.paste_masks._cache_size()
  for seed in range(3):
    probs, boxes = _random_case(np.random.default_rng(seed), 4, *hw)
    out = mask_ops.paste_masks(probs, boxes, hw, 0.5, image_hw=np.array([10, 8], np.int32))
    out.block_until_ready()
    assert mask_ops.paste_masks._cache_size() == before + 1


def test_rle_round_trip():
  rng = np.random.default_rng(3)
  masks = rng.random((4, 9, 13)) < 0.4
  masks[3] = False
  rles = mask_ops.encode_masks(masks)
  assert len(rles) == 4
  for k, rle in enumerate(rles):
    assert isinstance(rle["counts"], str) and list(rle["size"]) == [9, 13]
    dec = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode("utf-8")})
    np.testing.assert_array_equal(dec.astype(bool), masks[k])
    assert mask_util.area({"size": rle["size"], "counts": rle["counts"].encode()}) == masks[k].sum()
  np.testing.assert_array_equal(mask_ops.decode_masks(rles), masks)
  # Canvas crop.
  cropped = mask_ops.encode_masks(masks, hw=(7, 5))
  np.testing.assert_array_equal(mask_ops.decode_masks(cropped), masks[:, :7, :5])
  assert mask_ops.encode_masks(np.zeros((0, 9, 13), bool)) == []


@pytest.mark.parametrize("seed", [4])
def test_rle_matches_single_mask_encoding(seed):
  """Batch encoding equals detectron2's per-instance `encode(mask[:, :, None])` route."""
  masks = np.random.default_rng(seed).random((3, 6, 5)) < 0.5
  rles = mask_ops.encode_masks(masks)
  for k in range(3):
    single = mask_util.encode(np.array(masks[k][:, :, None], order="F", dtype=np.uint8))[0]
    assert rles[k]["counts"] == single["counts"].decode("utf-8")


def test_tiled_paste_equals_paste_and_compiles_once(compiles):
  """paste_masks_tiled == paste_masks pixel for pixel (boxes across tile borders, partly
  outside the image, tiny, empty; thresholds 0.5 and 0.3) for several image sizes and
  detection counts, with a single compilation of the tile function for all of them."""
  r = np.random.RandomState(7)
  m = 28
  mark = None
  for (h, w), k in zip(((300, 420), (512, 700), (97, 515), (600, 257)), (6, 6, 9, 40)):
    probs = r.rand(k, m, m).astype(np.float32)
    x0 = r.uniform(-40, w, k)
    y0 = r.uniform(-40, h, k)
    boxes = np.stack([x0, y0, x0 + r.uniform(0.5, 300, k), y0 + r.uniform(0.5, 300, k)],
                     1).astype(np.float32)
    boxes[1] = [250.3, 240.7, 270.1, 262.9]  # across a tile corner (tiles of 128 px)
    boxes[2] = [5.0, 5.0, 5.0, 20.0]  # empty
    for thr in (0.5, 0.3):
      ref = np.asarray(mask_ops.paste_masks(probs, boxes, (h, w), thr))
      if mark is None:
        mark = len(compiles.names)
      got = mask_ops.paste_masks_tiled(probs, boxes, (h, w), thr)
      np.testing.assert_array_equal(got, ref)
      rows = np.array([4, 1, 3])
      np.testing.assert_array_equal(mask_ops.paste_masks_tiled(probs, boxes, (h, w), thr,
                                                               rows=rows), ref[rows])
    empty = mask_ops.paste_masks_tiled(probs, boxes, (h, w), thr, rows=[2])
    assert empty.shape == (1, h, w) and not empty.any()
    assert ref[:, :, :].any()
  tiles = [n for n in compiles.since(mark) if "paste_tile" in n]
  assert len(tiles) == 1, compiles.since(mark)
