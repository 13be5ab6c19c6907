"""FCOS post-processing vs. the centermask2 fixture and a NumPy re-derivation."""
import numpy as np
import pytest

from centermask_jax.ops.fcos_postprocess import fcos_inference, fcos_locations
from test_nms import np_greedy_nms

LEVELS = ("p3", "p4", "p5", "p6", "p7")
STRIDES = (8, 16, 32, 64, 128)
PADDED = np.array([[608, 928], [608, 928]], np.int32)
KEYS = ("boxes", "scores", "classes", "locations")


@pytest.fixture(scope="module")
def fcos_maps(lite_fixture):
  z = np.load(lite_fixture / "eval_outputs.npz")
  nhwc = lambda a: np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))
  maps = {kind: [nhwc(z[f"fcos_{kind}_{lvl}"]) for lvl in LEVELS]
          for kind in ("logits", "bbox_reg", "ctrness")}
  ref = {k: z[k] for k in z.files if k.startswith(("img0_", "img1_")) and
         any(s in k for s in ("_prenms_", "_postnms_", "_det_"))}
  return maps, ref


@pytest.fixture(scope="module")
def fixture_run(fcos_maps):
  maps, _ = fcos_maps
  out = fcos_inference(maps["logits"], maps["bbox_reg"], maps["ctrness"], PADDED,
                       return_intermediates=True)
  return {k: np.asarray(v) for k, v in out.items()}


def canonical(boxes, classes):
  return np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], classes))


def assert_same_set(got, ref, with_locations):
  """got/ref dicts of boxes/scores/classes(/locations) rows; compared as sets."""
  assert len(got["scores"]) == len(ref["scores"])
  a, b = canonical(got["boxes"], got["classes"]), canonical(ref["boxes"], ref["classes"])
  np.testing.assert_array_equal(got["classes"][a], ref["classes"][b])
  np.testing.assert_allclose(got["boxes"][a], ref["boxes"][b], rtol=0, atol=1e-3)
  np.testing.assert_allclose(got["scores"][a], ref["scores"][b], rtol=0, atol=1e-5)
  if with_locations:
    np.testing.assert_array_equal(got["locations"][a], ref["locations"][b])


def test_locations():
  loc = np.asarray(fcos_locations((3, 5), 16))
  i, j = np.divmod(np.arange(15), 5)
  np.testing.assert_array_equal(loc, np.stack([j * 16 + 8, i * 16 + 8], -1).astype(np.float32))
  assert loc.dtype == np.float32


@pytest.mark.parametrize("img", [0, 1])
def test_fixture_prenms_postnms_and_detections(fcos_maps, fixture_run, img):
  _, ref = fcos_maps
  out = fixture_run
  # pre-NMS candidate set (threshold + per-level top-1000 on P3)
  v = out["prenms_valid"][img]
  assert_same_set({k: out[f"prenms_{k}"][img][v] for k in KEYS},
                  {k: ref[f"img{img}_prenms_{k}"] for k in KEYS}, with_locations=True)
  # post-NMS set; our order must be score-descending
  v = out["postnms_valid"][img]
  got = {k: out[f"postnms_{k}"][img][v] for k in KEYS}
  assert np.all(np.diff(got["scores"]) <= 0)
  assert v[:v.sum()].all()  # survivors listed first
  assert_same_set(got, {k: ref[f"img{img}_postnms_{k}"] for k in KEYS[:3]}, with_locations=False)
  # final 50: exact order
  assert out["valid"][img].all() and out["valid"].shape == (2, 50)
  np.testing.assert_array_equal(out["classes"][img], ref[f"img{img}_det_classes"])
  np.testing.assert_allclose(out["boxes"][img], ref[f"img{img}_det_boxes"], rtol=0, atol=1e-3)
  np.testing.assert_allclose(out["scores"][img], ref[f"img{img}_det_scores"], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(out["locations"][img], ref[f"img{img}_det_locations"])
  # level index consistent with the location grid of that level
  s = np.asarray(STRIDES)[out["levels"][img]]
  np.testing.assert_array_equal(out["locations"][img] % s[:, None], np.stack([s // 2] * 2, -1))


def test_early_stop_nms_gives_the_same_detections(fcos_maps, fixture_run):
  """Without intermediates NMS stops once the top-50 survivors are settled: the final
  detections are identical to the full walk's (and so to the fixture, tested above)."""
  maps, _ = fcos_maps
  out = fcos_inference(maps["logits"], maps["bbox_reg"], maps["ctrness"], PADDED)
  for k in ("boxes", "scores", "classes", "locations", "levels", "valid"):
    np.testing.assert_array_equal(np.asarray(out[k]), fixture_run[k])


def test_train_proposals(lite_fixture, fcos_maps):
  """post_nms_topk=100 reproduces the training proposals (train maps = eval maps up to rounding)."""
  maps, _ = fcos_maps
  out = fcos_inference(maps["logits"], maps["bbox_reg"], maps["ctrness"], PADDED,
                       post_nms_topk=100)
  z = np.load(lite_fixture / "train_outputs.npz")
  for img in range(2):
    assert np.asarray(out["valid"][img]).all()
    np.testing.assert_array_equal(np.asarray(out["classes"][img]),
                                  z[f"img{img}_train_proposals_classes"])
    np.testing.assert_allclose(np.asarray(out["boxes"][img]),
                               z[f"img{img}_train_proposals_boxes"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(out["scores"][img]),
                               z[f"img{img}_train_proposals_scores"], rtol=0, atol=1e-5)


def test_larger_canvas_gives_same_detections(fcos_maps, fixture_run):
  """640x1024 canvas (P3 80x128 ... P7 5x8) with garbage outside the official region."""
  maps, _ = fcos_maps
  rng = np.random.default_rng(0)
  canvas = {}
  for kind, hi in (("logits", 8.0), ("bbox_reg", 3.0), ("ctrness", 8.0)):
    canvas[kind] = []
    for x, s in zip(maps[kind], STRIDES):
      n, h, w, c = x.shape
      big = rng.uniform(0.0, hi, (n, -(-640 // s), -(-1024 // s), c)).astype(np.float32)
      big[:, :h, :w] = x
      canvas[kind].append(big)
  assert canvas["logits"][0].shape[1:3] == (80, 128)
  out = fcos_inference(canvas["logits"], canvas["bbox_reg"], canvas["ctrness"], PADDED,
                       return_intermediates=True)
  out = {k: np.asarray(v) for k, v in out.items()}
  for k in ("boxes", "scores", "classes", "locations", "levels", "valid"):
    np.testing.assert_array_equal(out[k], fixture_run[k])
  for img in range(2):
    for stage in ("prenms", "postnms"):
      v, rv = out[f"{stage}_valid"][img], fixture_run[f"{stage}_valid"][img]
      assert_same_set({k: out[f"{stage}_{k}"][img][v] for k in KEYS},
                      {k: fixture_run[f"{stage}_{k}"][img][rv] for k in KEYS}, True)


def np_fcos(logits, reg, ctrness, padded_hw, strides, thr, topk, nms_thr, post):
  """NumPy re-derivation for one image: lists of [H, W, C] maps -> rows sorted by score."""
  sig = lambda x: 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
  rows = []
  for lg, rg, ct, s in zip(logits, reg, ctrness, strides):
    hv, wv = -(-padded_hw[0] // s), -(-padded_hw[1] // s)
    lg, rg, ct = lg[:hv, :wv], rg[:hv, :wv], ct[:hv, :wv, 0]
    cls, ctr = sig(lg), sig(ct)
    ii, jj, cc = np.nonzero(cls > thr)
    prod = cls[ii, jj, cc] * ctr[ii, jj]
    sel = np.argsort(-prod, kind="stable")[:topk]
    for q in sel:
      i, j, c = ii[q], jj[q], cc[q]
      x, y = j * s + s // 2, i * s + s // 2
      l, t, r, b = rg[i, j] * s
      rows.append((x - l, y - t, x + r, y + b, np.sqrt(prod[q]), c))
  rows = np.asarray(rows, np.float64).reshape(-1, 6)
  keep = np_greedy_nms(rows[:, :4].astype(np.float32), rows[:, 4], rows[:, 5].astype(int),
                       np.ones(len(rows), bool), nms_thr)
  return rows[keep[:post]]


def test_small_maps_vs_numpy():
  """Tiny random maps on a canvas: thresholding, per-level top-k, NMS, padding of K."""
  rng = np.random.default_rng(1)
  strides = (8, 16)
  n, c = 2, 3
  padded = np.array([[40, 56], [24, 32]], np.int32)
  shapes = [(6, 8), (3, 4)]  # canvas 48x64
  logits = [rng.normal(-1.0, 1.5, (n, h, w, c)).astype(np.float32) for h, w in shapes]
  reg = [rng.uniform(0.3, 2.0, (n, h, w, 4)).astype(np.float32) for h, w in shapes]
  ctr = [rng.normal(0, 1, (n, h, w, 1)).astype(np.float32) for h, w in shapes]
  k = 40
  out = fcos_inference(logits, reg, ctr, padded, strides=strides, score_thresh=0.3,
                       pre_nms_topk=25, nms_thresh=0.5, post_nms_topk=k)
  out = {key: np.asarray(v) for key, v in out.items()}
  for img in range(n):
    ref = np_fcos([x[img] for x in logits], [x[img] for x in reg], [x[img] for x in ctr],
                  padded[img], strides, 0.3, 25, 0.5, k)
    nv = len(ref)
    assert 3 < nv < k  # padding rows exist
    np.testing.assert_array_equal(out["valid"][img], np.arange(k) < nv)
    np.testing.assert_array_equal(out["classes"][img][:nv], ref[:, 5])
    np.testing.assert_allclose(out["boxes"][img][:nv], ref[:, :4], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["scores"][img][:nv], ref[:, 4], rtol=0, atol=1e-6)
    assert not out["boxes"][img][nv:].any() and not out["scores"][img][nv:].any()


def test_no_recompile():
  rng = np.random.default_rng(2)
  shapes = [(4, 4), (2, 2)]

  def maps():
    return ([rng.normal(-1, 1, (1, h, w, 5)).astype(np.float32) for h, w in shapes],
            [rng.uniform(0, 2, (1, h, w, 4)).astype(np.float32) for h, w in shapes],
            [rng.normal(0, 1, (1, h, w, 1)).astype(np.float32) for h, w in shapes])

  kw = dict(strides=(8, 16), pre_nms_topk=10, post_nms_topk=6)
  fcos_inference(*maps(), np.array([[32, 32]], np.int32), score_thresh=0.05, **kw)
  size = fcos_inference._cache_size()
  lg, rg, ct = maps()
  out = fcos_inference(lg, rg, ct, np.array([[24, 16]], np.int32), score_thresh=0.2, **kw)
  assert fcos_inference._cache_size() == size
  ref = np_fcos([x[0] for x in lg], [x[0] for x in rg], [x[0] for x in ct], (24, 16),
                (8, 16), 0.2, 10, 0.6, 6)
  np.testing.assert_allclose(np.asarray(out["scores"][0][:len(ref)]), ref[:, 4], atol=1e-6)
  assert int(np.asarray(out["valid"]).sum()) == len(ref)
