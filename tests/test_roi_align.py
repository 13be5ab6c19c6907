"""RoIAlign and level assignment vs. a scalar NumPy kernel transliteration and the fixtures."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centermask_jax.ops import roi_align as ra

F32 = np.float32


# ---------------------------------------------------------------------------------------
# Scalar reference: torchvision roi_align CPU kernel semantics, one RoI, float32 arithmetic.
# ---------------------------------------------------------------------------------------

def _kernel_samples(box, height, width, scale, size, sampling_ratio, aligned):
  """Yields (ph, pw, [(row, col, weight), ...] per sample, count) for one RoI."""
  off = F32(0.5) if aligned else F32(0.0)
  scale = F32(scale)
  x0, y0, x1, y1 = (F32(v) for v in box)
  start_w, start_h = F32(x0 * scale - off), F32(y0 * scale - off)
  end_w, end_h = F32(x1 * scale - off), F32(y1 * scale - off)
  roi_w, roi_h = F32(end_w - start_w), F32(end_h - start_h)
  if not aligned:
    roi_w, roi_h = max(roi_w, F32(1.0)), max(roi_h, F32(1.0))
  bin_h, bin_w = F32(roi_h / F32(size)), F32(roi_w / F32(size))
  gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(F32(roi_h / F32(size))))
  gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(F32(roi_w / F32(size))))
  count = max(gh * gw, 1)
  for ph in range(size):
    for pw in range(size):
      samples = []
      for iy in range(gh):
        y = F32(F32(start_h + F32(ph) * bin_h) + F32(F32(F32(iy + 0.5) * bin_h) / F32(gh)))
        for ix in range(gw):
          x = F32(F32(start_w + F32(pw) * bin_w) + F32(F32(F32(ix + 0.5) * bin_w) / F32(gw)))
          if y < -1.0 or y > height or x < -1.0 or x > width:
            continue
          yy, xx = max(y, F32(0.0)), max(x, F32(0.0))
          yl, xl = int(yy), int(xx)
          if yl >= height - 1:
            yl = yh = height - 1
            yy = F32(yl)
          else:
            yh = yl + 1
          if xl >= width - 1:
            xl = xh = width - 1
            xx = F32(xl)
          else:
            xh = xl + 1
          ly, lx = F32(yy - yl), F32(xx - xl)
          hy, hx = F32(1.0 - ly), F32(1.0 - lx)
          samples += [(yl, xl, hy * hx), (yl, xh, hy * lx), (yh, xl, ly * hx), (yh, xh, ly * lx)]
      yield ph, pw, samples, count


def ref_roi_align(feat, box, scale, size, sampling_ratio, aligned):
  """feat [H, W, C] official map -> [S, S, C] (scalar kernel loops)."""
  height, width, _ = feat.shape
  out = np.zeros((size, size, feat.shape[-1]), F32)
  for ph, pw, samples, count in _kernel_samples(box, height, width, scale, size,
                                                sampling_ratio, aligned):
    acc = np.zeros(feat.shape[-1], F32)
    for r, c, w in samples:
      acc += F32(w) * feat[r, c]
    out[ph, pw] = acc / F32(count)
  return out


def ref_roi_align_backward(grad_out, box, height, width, scale, size, sampling_ratio, aligned):
  """Kernel backward: [S, S, C] output cotangent -> [H, W, C] feature gradient."""
  grad = np.zeros((height, width, grad_out.shape[-1]), np.float64)
  for ph, pw, samples, count in _kernel_samples(box, height, width, scale, size,
                                                sampling_ratio, aligned):
    for r, c, w in samples:
      grad[r, c] += float(w) / count * grad_out[ph, pw].astype(np.float64)
  return grad


# ---------------------------------------------------------------------------------------
# Random cases
# ---------------------------------------------------------------------------------------

STRIDE = 8
PADDED_HW = np.array([[80, 96], [64, 128]], np.int32)   # official maps 10x12 and 8x16
CANVAS = (16, 20)


def _boxes(rng):
  """Per image 12 boxes in input pixels: random, outside, tiny, zero-size, huge."""
  out = []
  for hp, wp in PADDED_HW:
    x0 = rng.uniform(-30, wp, 4)
    y0 = rng.uniform(-30, hp, 4)
    rand = np.stack([x0, y0, x0 + rng.uniform(1, 70, 4), y0 + rng.uniform(1, 60, 4)], -1)
    special = np.array([
        [-50.0, -40.0, 20.5, 30.25],              # sticks out top-left
        [wp - 20.0, hp - 10.0, wp + 60.0, hp + 45.0],  # sticks out bottom-right
        [wp + 20.0, 10.0, wp + 90.0, 40.0],        # fully right of the map
        [30.3, 20.7, 30.9, 21.1],                 # tiny (< 1 cell)
        [40.0, 12.0, 40.0, 50.0],                 # zero width
        [35.0, 25.0, 20.0, 40.0],                 # inverted (negative width)
        [-900.0, -20.0, 1200.0, 50.0],            # huge in x (large adaptive grid)
        [10.0, -1700.0, 60.0, 1800.0],            # huge in y, bins larger than the map
    ])
    out.append(np.concatenate([rand, special]).astype(F32))
  return np.stack(out)


def _features(rng, canvas=CANVAS, channels=3, garbage=np.nan):
  feats = np.full((2, *canvas, channels), garbage, F32)
  maps = []
  for i, (hp, wp) in enumerate(PADDED_HW):
    h, w = hp // STRIDE, wp // STRIDE
    m = rng.normal(size=(h, w, channels)).astype(F32)
    feats[i, :h, :w] = m
    maps.append(m)
  return feats, maps


@functools.partial(jax.jit, static_argnames=("stride", "sampling_ratio", "aligned", "max_grid"))
def _roi_align_jit(feats, boxes, padded_hw, stride, sampling_ratio, aligned, max_grid=None):
  return ra.roi_align(feats, boxes, padded_hw, stride, output_size=14,
                      sampling_ratio=sampling_ratio, aligned=aligned, max_grid=max_grid)


@pytest.mark.parametrize("canvas", [CANVAS, (24, 16)])  # both contraction orders
@pytest.mark.parametrize("sampling_ratio,aligned", [(0, True), (2, True), (0, False), (2, False)])
def test_roi_align_matches_kernel_transliteration(sampling_ratio, aligned, canvas):
  rng = np.random.default_rng(sampling_ratio + 10 * aligned)
  feats, maps = _features(rng, canvas=canvas, garbage=1e6)
  boxes = _boxes(rng)
  got = np.asarray(_roi_align_jit(feats, boxes, PADDED_HW, STRIDE, sampling_ratio, aligned))
  assert got.shape == (2, boxes.shape[1], 14, 14, 3)
  err = 0.0
  for i in range(2):
    for r in range(boxes.shape[1]):
      want = ref_roi_align(maps[i], boxes[i, r], 1 / STRIDE, 14, sampling_ratio, aligned)
      err = max(err, float(np.abs(got[i, r] - want).max()))
  print(f"sr={sampling_ratio} aligned={aligned} canvas={canvas}: max abs err {err:.3g}")
  assert err <= 1e-5, err
  # The cases are non-trivial: a fully-outside box and zero-size boxes pool to 0
  # (adaptive grid), the others not (with a fixed 2x2 grid, all samples of the box
  # taller than 14 maps miss the map).
  assert np.all(got[:, 6] == 0)
  if sampling_ratio == 0 and aligned:
    assert np.all(got[:, 8:10] == 0)
  nonzero = [0, 4, 7, 10, 11] if sampling_ratio == 0 else [0, 4, 7, 10]
  assert np.all(np.abs(got[:, nonzero]).max(axis=(2, 3, 4)) > 0)


def test_sample_window_matters_for_big_boxes():
  """A too-short static sample window (max_grid) breaks the huge box: the default is exact."""
  rng = np.random.default_rng(2)
  feats, maps = _features(rng, garbage=0.0)
  boxes = _boxes(rng)[:, 11:12]
  want = ref_roi_align(maps[0], boxes[0, 0], 1 / STRIDE, 14, 0, True)
  # jitted (roi_align's defaults: 14 x 14, adaptive grid, aligned): eagerly ~160 compiles
  full = _roi_align_jit(feats, boxes, PADDED_HW, STRIDE, 0, True)
  short = _roi_align_jit(feats, boxes, PADDED_HW, STRIDE, 0, True, max_grid=4)
  assert np.abs(np.asarray(full[0, 0]) - want).max() <= 1e-5
  assert np.abs(np.asarray(short[0, 0]) - want).max() > 1e-2


def test_adaptive_grid_is_large_for_big_boxes():
  """The huge boxes of the test really use grids well above 2 (guards the test's intent)."""
  boxes = _boxes(np.random.default_rng(0))
  roi_w = (boxes[0, 10, 2] - boxes[0, 10, 0]) / STRIDE
  roi_h = (boxes[0, 11, 3] - boxes[0, 11, 1]) / STRIDE
  assert math.ceil(roi_w / 14) >= 18 and math.ceil(roi_h / 14) >= 30
  assert roi_h / 14 > 2 * (PADDED_HW[0, 0] / STRIDE)  # one bin spans more than the map


def test_nan_and_garbage_outside_official_map_do_not_matter():
  rng = np.random.default_rng(3)
  boxes = _boxes(rng)
  feats_small, maps = _features(rng, canvas=(16, 16), garbage=0.0)
  big = np.full((2, 24, 40, 3), np.nan, F32)
  big[:, 16:, :] = 1e7
  for i, m in enumerate(maps):
    big[i, :m.shape[0], :m.shape[1]] = m
  a = np.asarray(_roi_align_jit(feats_small, boxes, PADDED_HW, STRIDE, 0, True))
  b = np.asarray(_roi_align_jit(big, boxes, PADDED_HW, STRIDE, 0, True))
  assert np.isfinite(b).all()
  # Same numbers up to float summation order (the contraction length differs); any
  # leak of the 1e7 / NaN garbage would show as O(1e6) or NaN.
  np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)


def test_jit_does_not_recompile():
  rng = np.random.default_rng(5)
  traces = []

  @jax.jit
  def f(feats_list, boxes, image_hw, padded_hw):
    traces.append(1)
    levels = ra.assign_levels(boxes, image_hw)
    return ra.multilevel_roi_align(feats_list, boxes, levels, padded_hw, strides=(8, 16))

  for _ in range(2):
    feats = [rng.normal(size=(2, 16, 16, 3)).astype(F32),
             rng.normal(size=(2, 8, 8, 3)).astype(F32)]
    out = f(feats, _boxes(rng), PADDED_HW - 8, PADDED_HW)
    assert out.shape == (2, 12, 14, 14, 3)
  feats, _ = _features(rng)
  _roi_align_jit(feats, _boxes(rng), PADDED_HW, STRIDE, 0, True)
  n0 = _roi_align_jit._cache_size()
  feats, _ = _features(rng, garbage=1.0)  # larger official maps below: no NaN inside
  out = _roi_align_jit(feats, _boxes(rng) + 3.0, PADDED_HW + 32, STRIDE, 0, True)
  assert np.abs(np.asarray(out)).max() > 0
  assert len(traces) == 1
  assert _roi_align_jit._cache_size() == n0


def test_skip_empty_levels_gives_the_same_pooling():
  """Inference's skip_empty_levels (a level no RoI is assigned to is not pooled) returns
  exactly what pooling every level returns: with a level empty (all RoIs on P3, P5 full of
  NaN, which the skip never reads and the select never keeps) and with all levels used,
  one compilation for both."""
  rng = np.random.default_rng(8)
  traces = []

  @functools.partial(jax.jit, static_argnums=3)
  def pool(feats_list, boxes, levels, skip):
    traces.append(skip)
    return ra.multilevel_roi_align(feats_list, boxes, levels, PADDED_HW, strides=(8, 16, 32),
                                   skip_empty_levels=skip)

  feats = [rng.normal(size=(2, 16, 16, 4)).astype(F32),
           rng.normal(size=(2, 8, 8, 4)).astype(F32),
           np.full((2, 4, 4, 4), np.nan, F32)]
  boxes = _boxes(rng)
  mixed = rng.integers(0, 3, boxes.shape[:2]).astype(np.int32)
  assert set(mixed.ravel()) == {0, 1, 2}
  for levels in (np.zeros_like(mixed), np.where(mixed == 2, 1, mixed), mixed):
    want = np.asarray(pool(feats, boxes, levels, False))
    got = np.asarray(pool(feats, boxes, levels, True))
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all() == (2 not in levels)
  assert traces == [False, True]


def test_assign_levels_rule():
  """Ratio rule on hand-computed area ratios (incl. exact boundaries and zero area)."""
  hw = np.array([[600, 800]], np.int32)
  a_img = 600 * 800
  # (w, h) with area ratios: 0.01, 0.25 (P3 boundary), 0.2501, 0.5 (P4 boundary), 0.6, 1.0, 2.0
  sizes = [(80, 60), (400, 300), (400, 300.12), (400, 600), (480, 600), (800, 600), (1600, 600),
           (0, 100), (10, -5)]
  boxes = np.array([[[5, 7, 5 + w, 7 + h] for w, h in sizes]], F32)
  got = np.asarray(ra.assign_levels(boxes, hw))
  want = []
  for w, h in sizes:
    area = F32(w) * F32(h)
    if area <= 0:
      want.append(0)
      continue
    k = math.ceil(5 - math.log2(a_img / float(area)))
    want.append(min(max(k, 3), 5) - 3)
  np.testing.assert_array_equal(got[0], want)
  assert list(got[0][:7]) == sorted(got[0][:7]) and got[0][3] == 1 and got[0][2] == 1


def _torch_levels(boxes, hw):
  """centermask2's assign_boxes_to_levels_by_ratio in PyTorch float32 (eps included)."""
  import sys
  torch = pytest.importorskip("torch")
  b = torch.from_numpy(boxes)
  box_area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  img_area = torch.tensor(float(hw[0] * hw[1]), dtype=torch.float32).expand_as(box_area)
  k = torch.ceil(5 - torch.log2(img_area / box_area + sys.float_info.epsilon))
  return (torch.clamp(k, min=3, max=5).to(torch.int64) - 3).numpy()


def test_assign_levels_comparisons_match_pytorch_and_exact_boundaries():
  """Ratio rule as comparisons (r >= 4 -> P3, r >= 2 -> P4): equal to PyTorch's log2 form
  on random boxes of every level, and at r = 2, 4 exactly and one float32 ulp either side
  the exact-arithmetic answer (where log2 rounding could move a box)."""
  rng = np.random.default_rng(3)
  hw = (600, 800)
  a_img = F32(hw[0] * hw[1])
  w = rng.uniform(1, 1200, 4000).astype(F32)
  h = rng.uniform(1, 900, 4000).astype(F32)
  x0 = rng.uniform(-50, 700, 4000).astype(F32)
  y0 = rng.uniform(-50, 500, 4000).astype(F32)
  boxes = np.stack([x0, y0, x0 + w, y0 + h], -1)[None]
  got = np.asarray(jax.jit(ra.assign_levels)(boxes, np.array([hw], np.int32)))
  want = _torch_levels(boxes, hw)
  np.testing.assert_array_equal(got, want)
  assert set(np.unique(got)) == {0, 1, 2}
  # boundaries: box area a_img / r for r at 2, 4 and their float32 neighbours (x1 = area / h)
  rows = []
  for r0 in (4.0, 2.0):
    for r in (np.nextafter(F32(r0), F32(0)), F32(r0), np.nextafter(F32(r0), F32(10))):
      rows.append((0, 0, a_img / r / F32(100), F32(100)))
  b = np.array([rows], F32)
  ratio = a_img / ((b[0, :, 2] - b[0, :, 0]) * (b[0, :, 3] - b[0, :, 1]))
  assert {F32(2), F32(4)} <= set(ratio.tolist())
  want = [(0 if q >= 4 else 1 if q >= 2 else 2) for q in ratio]
  got = np.asarray(jax.jit(ra.assign_levels)(b, np.array([hw], np.int32)))[0]
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------
# Official fixture
# ---------------------------------------------------------------------------------------

def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def _on_canvas(x, canvas_hw, fill):
  """[N, H, W, C] -> [N, Hc, Wc, C] with `fill` outside."""
  out = np.full((x.shape[0], *canvas_hw, x.shape[-1]), fill, F32)
  out[:, :x.shape[1], :x.shape[2]] = x
  return out


@pytest.fixture(scope="module")
def official(lite_fixture):
  ev = dict(np.load(lite_fixture / "eval_outputs.npz"))
  gv = dict(np.load(lite_fixture / "given_boxes_outputs.npz"))
  inp = np.load(lite_fixture / "inputs.npz")
  return ev, gv, inp["image_sizes"].astype(np.int32), np.array(inp["images_tensor"].shape[2:])


def test_assign_levels_matches_fixture(official):
  ev, gv, image_hw, _ = official
  for name, key in [("given_boxes", "given_roi_level"), ("det_boxes", "det_roi_level")]:
    boxes = np.stack([(ev if name == "det_boxes" else gv)[f"img{i}_{name}"] for i in range(2)])
    want = np.stack([(ev if name == "det_boxes" else gv)[f"img{i}_{key}"] for i in range(2)])
    got = np.asarray(jax.jit(ra.assign_levels)(boxes, image_hw)) + 3
    np.testing.assert_array_equal(got, want)
  assert set(np.unique(np.stack([gv[f"img{i}_given_roi_level"] for i in range(2)]))) == {3, 4, 5}


def test_roi_align_matches_fixture_per_level(official):
  ev, gv, _, padded = official
  padded_hw = np.tile(padded[None].astype(np.int32), (2, 1))
  canvas = {3: (80, 128), 4: (40, 64), 5: (20, 32)}  # padded 640x1024 canvas
  max_err = 0.0
  for lvl, stride in [(3, 8), (4, 16), (5, 32)]:
    fmap = _nhwc(ev[f"fpn_p{lvl}"])
    chans = ev.get(f"fpn_p{lvl}__channels", np.arange(fmap.shape[-1]))
    feats = _on_canvas(fmap, canvas[lvl], fill=np.nan)
    for src, bname, pname in [(gv, "given_boxes", "given_mask_pooled"),
                              (ev, "det_boxes", "mask_pooled_first6")]:
      want = np.stack([src[f"img{i}_{pname}"] for i in range(2)])[:, :, chans]
      boxes = np.stack([src[f"img{i}_{bname}"] for i in range(2)])[:, :want.shape[1]]
      lv = np.stack([src[f"img{i}_{bname.replace('boxes', 'roi_level')}"]
                     for i in range(2)])[:, :want.shape[1]]
      got = np.asarray(_roi_align_jit(feats, boxes, padded_hw, stride, 0, True))
      got = np.transpose(got, (0, 1, 4, 2, 3))
      sel = lv == lvl
      if not sel.any():
        continue
      scale = np.abs(want[sel]).max()
      err = np.abs(got[sel] - want[sel]).max()
      max_err = max(max_err, err / scale)
      assert err <= 1e-4 * scale, (lvl, bname, err, scale)
  print(f"max rel err vs fixture {max_err:.3g}")


def test_multilevel_matches_fixture(official):
  ev, gv, image_hw, padded = official
  padded_hw = np.tile(padded[None].astype(np.int32), (2, 1))
  c3, c4 = ev["fpn_p3__channels"], ev["fpn_p4__channels"]
  common = np.intersect1d(c3, c4)
  assert len(common) >= 8
  feats = [
      _on_canvas(_nhwc(ev["fpn_p3"])[..., np.searchsorted(c3, common)], (80, 128), 1e8),
      _on_canvas(_nhwc(ev["fpn_p4"])[..., np.searchsorted(c4, common)], (40, 64), 1e8),
      _on_canvas(_nhwc(ev["fpn_p5"])[..., common], (20, 32), 1e8),
  ]
  boxes = np.stack([gv[f"img{i}_given_boxes"] for i in range(2)])
  levels = jax.jit(ra.assign_levels)(boxes, image_hw)
  got = jax.jit(ra.multilevel_roi_align)(feats, boxes, levels, padded_hw)
  got = np.transpose(np.asarray(got), (0, 1, 4, 2, 3))
  want = np.stack([gv[f"img{i}_given_mask_pooled"] for i in range(2)])[:, :, common]
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 1e-4 * scale
  assert np.all(want[:, 6] == 0) and np.abs(want[:, [2, 3]]).max() > 0


# ---------------------------------------------------------------------------------------
# Gradient
# ---------------------------------------------------------------------------------------

def test_gradient_matches_kernel_adjoint():
  rng = np.random.default_rng(11)
  feats, maps = _features(rng, canvas=(12, 16), channels=2, garbage=5.0)
  boxes = _boxes(rng)[:, [0, 1, 4, 5, 8, 10]]
  cot = rng.normal(size=(2, boxes.shape[1], 14, 14, 2)).astype(F32)

  @jax.jit
  def loss(f, b):
    return jnp.sum(ra.roi_align(f, b, PADDED_HW, STRIDE) * cot)

  g_feat, g_box = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(feats), jnp.asarray(boxes))
  g_feat = np.asarray(g_feat)
  assert np.isfinite(g_feat).all()
  assert np.all(np.asarray(g_box) == 0)  # like the kernel: no gradient to the boxes
  for i, m in enumerate(maps):
    h, w, _ = m.shape
    want = np.zeros(g_feat.shape[1:], np.float64)
    for r in range(boxes.shape[1]):
      want[:h, :w] += ref_roi_align_backward(cot[i, r], boxes[i, r], h, w, 1 / STRIDE, 14, 0, True)
    np.testing.assert_allclose(g_feat[i], want, atol=1e-4 * np.abs(want).max(), rtol=0)
    assert np.all(g_feat[i, h:] == 0) and np.all(g_feat[i, :, w:] == 0)
  # Finite difference along a random direction (the op is linear in the features).
  d = rng.normal(size=feats.shape).astype(F32)
  eps = F32(0.5)
  fd = (loss(feats + eps * d, boxes) - loss(feats - eps * d, boxes)) / (2 * eps)
  np.testing.assert_allclose(float(fd), float(np.sum(g_feat * d)), rtol=1e-4)
