"""detector_postprocess, MaskIoU rescoring, class-mask selection vs fixtures and NumPy."""
import numpy as np

from centermask_jax.ops import postprocess as pp


def _load(lite_fixture):
  inp = np.load(lite_fixture / "inputs.npz")
  return (np.load(lite_fixture / "eval_outputs.npz"),
          np.load(lite_fixture / "given_boxes_outputs.npz"),
          inp["image_sizes"].astype(np.int32), inp["orig_sizes"].astype(np.int32))


def _unpack(packed, shape):
  return np.unpackbits(packed, axis=-1)[..., :int(shape[2])].astype(bool)


def test_detector_postprocess_matches_fixture(lite_fixture):
  ev, _, image_hw, orig_hw = _load(lite_fixture)
  boxes = np.stack([ev["img0_det_boxes"], ev["img1_det_boxes"]])
  valid = np.ones(boxes.shape[:2], bool)
  out, out_valid = map(np.asarray, pp.detector_postprocess(boxes, valid, image_hw, orig_hw))
  assert out_valid.all()  # the fixture dropped nothing
  for i in range(2):
    ref = ev[f"img{i}_final_boxes"]
    err = np.abs(out[i] - ref).max()
    print(f"img{i}: max box error {err:.3g} px")
    np.testing.assert_allclose(out[i], ref, rtol=0, atol=1e-3)
  # Some detections were actually clipped (so the test exercises the clip).
  assert np.any(boxes[:, :, 2] * (orig_hw[:, 1] / image_hw[:, 1])[:, None] > orig_hw[:, None, 1])


def test_detector_postprocess_given_boxes_drops_empty(lite_fixture):
  _, gv, image_hw, orig_hw = _load(lite_fixture)
  boxes = np.stack([gv["img0_given_boxes"], gv["img1_given_boxes"]])
  valid = np.ones(boxes.shape[:2], bool)
  valid[1, 0] = False  # an invalid input row stays invalid
  out, out_valid = map(np.asarray, pp.detector_postprocess(boxes, valid, image_hw, orig_hw))
  for i in range(2):
    src = gv[f"img{i}_given_final_src_index"]
    expect = np.isin(np.arange(8), src) & valid[i]
    np.testing.assert_array_equal(out_valid[i], expect)
    np.testing.assert_allclose(out[i, src], gv[f"img{i}_given_final_boxes"], rtol=0, atol=1e-3)


def _numpy_postprocess(boxes, valid, image_hw, orig_hw):
  out = boxes.astype(np.float64).copy()
  keep = valid.copy()
  for i in range(boxes.shape[0]):
    h, w = image_hw[i]
    h0, w0 = orig_hw[i]
    out[i, :, 0::2] *= w0 / w
    out[i, :, 1::2] *= h0 / h
    out[i, :, 0::2] = np.clip(out[i, :, 0::2], 0, w0)
    out[i, :, 1::2] = np.clip(out[i, :, 1::2], 0, h0)
    keep[i] &= (out[i, :, 2] > out[i, :, 0]) & (out[i, :, 3] > out[i, :, 1])
  return out, keep


def test_detector_postprocess_matches_numpy():
  rng = np.random.default_rng(0)
  n, k = 3, 12
  image_hw = np.array([[600, 800], [800, 533], [64, 96]], np.int32)
  orig_hw = np.array([[480, 640], [1200, 800], [100, 150]], np.int32)
  xy = rng.uniform(-0.3, 1.3, (n, k, 2, 2)) * image_hw[:, None, None, ::-1]
  boxes = np.concatenate([xy.min(2), xy.max(2)], -1).astype(np.float32)
  boxes[0, 0] = [10, 10, 10, 50]  # zero width
  boxes[0, 1] = [10, 20, 30, 20]  # zero height
  boxes[1, 0] = [-50, -40, -10, 30]  # entirely left of the image: width 0 after clipping
  boxes[2, 0] = [5, 97, 40, 120]  # entirely below: height 0 after clipping
  valid = rng.random((n, k)) < 0.9
  out, out_valid = map(np.asarray, pp.detector_postprocess(boxes, valid, image_hw, orig_hw))
  ref, ref_valid = _numpy_postprocess(boxes, valid, image_hw, orig_hw)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-4)
  np.testing.assert_array_equal(out_valid, ref_valid)
  assert not out_valid[0, :2].any() and not out_valid[1, 0] and not out_valid[2, 0]
  assert out_valid.sum() > n * k // 2


def test_maskiou_rescore_matches_fixture(lite_fixture):
  ev, gv, _, _ = _load(lite_fixture)
  scores = np.stack([ev["img0_det_scores"], ev["img1_det_scores"]])
  maskiou = np.stack([ev["img0_maskiou_pred_allcls"], ev["img1_maskiou_pred_allcls"]])
  classes = np.stack([ev["img0_det_classes"], ev["img1_det_classes"]])
  out = np.asarray(pp.maskiou_rescore(scores, maskiou, classes))
  for i in range(2):
    np.testing.assert_allclose(out[i], ev[f"img{i}_final_mask_scores"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(out[i], ev[f"img{i}_mask_scores"], rtol=1e-6, atol=0)
  for i in range(2):
    g = np.asarray(pp.maskiou_rescore(gv[f"img{i}_given_scores"],
                                      gv[f"img{i}_given_maskiou_pred_allcls"],
                                      gv[f"img{i}_given_classes"]))
    np.testing.assert_allclose(g, gv[f"img{i}_given_mask_scores"], rtol=1e-6, atol=0)
    src = gv[f"img{i}_given_final_src_index"]
    np.testing.assert_allclose(g[src], gv[f"img{i}_given_final_mask_scores"], rtol=1e-6, atol=0)


def test_select_class_masks_matches_fixture(lite_fixture):
  ev, _, _, _ = _load(lite_fixture)
  for i in range(2):
    allcls = ev[f"img{i}_mask_logits_allcls_first2"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    cls = ev[f"img{i}_det_classes"][:2]
    out = np.asarray(pp.select_class_masks(allcls[None], cls[None]))[0]
    np.testing.assert_array_equal(out, ev[f"img{i}_mask_logits_predcls"][:2])
    probs = 1.0 / (1.0 + np.exp(-out.astype(np.float64)))
    np.testing.assert_allclose(probs, ev[f"img{i}_mask_probs"][:2, 0], rtol=0, atol=1e-6)


def test_select_class_masks_random():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 4, 4, 7)).astype(np.float32)
  classes = rng.integers(0, 7, (2, 3))
  out = np.asarray(pp.select_class_masks(logits, classes))
  for n in range(2):
    for k in range(3):
      np.testing.assert_array_equal(out[n, k], logits[n, k, :, :, classes[n, k]])


def test_maxpool2x2_matches_fixture(lite_fixture):
  _, gv, _, _ = _load(lite_fixture)
  for i in range(2):
    probs = gv[f"img{i}_given_mask_probs"][:, 0]  # [8, 28, 28]
    out = np.asarray(pp.maxpool2x2(probs))
    np.testing.assert_array_equal(out, gv[f"img{i}_given_maskiou_input_maskpool"][:, 0])


def _fixture_batch(ev, gv, given: bool):
  """Both images' mask-branch inputs and final references, from eval or given-boxes outputs."""
  src, pre = (gv, "_given") if given else (ev, "")
  det = "_given" if given else "_det"
  stack = lambda fmt: np.stack([src[fmt.format(i=i)] for i in range(2)])
  inputs = dict(boxes=stack("img{i}" + det + "_boxes"), scores=stack("img{i}" + det + "_scores"),
                classes=stack("img{i}" + det + "_classes"),
                mask_probs=stack("img{i}" + pre + "_mask_probs")[:, :, 0],
                maskiou=stack("img{i}" + pre + "_maskiou_pred_allcls"))
  finals = [{n: src[f"img{i}{pre}_final_{n}"] for n in
             ("boxes", "scores", "classes", "mask_scores", "masks_packed", "masks_shape")}
            for i in range(2)]
  for i in range(2):
    finals[i]["rows"] = (gv[f"img{i}_given_final_src_index"] if given
                         else np.arange(inputs["boxes"].shape[1]))
  return inputs, finals


def test_postprocess_detections_end_to_end(lite_fixture):
  ev, gv, image_hw, orig_hw = _load(lite_fixture)
  canvas = (512, 640)
  for given in (False, True):
    x, finals = _fixture_batch(ev, gv, given)
    valid = np.ones(x["scores"].shape, bool)
    out = pp.postprocess_detections(x["boxes"], x["scores"], x["classes"], valid,
                                    x["mask_probs"], x["maskiou"], image_hw, orig_hw, canvas)
    out = {k: np.asarray(v) for k, v in out.items()}
    assert out["masks"].shape == x["scores"].shape + canvas
    for i, fin in enumerate(finals):
      rows = fin["rows"]
      np.testing.assert_array_equal(np.flatnonzero(out["valid"][i]), rows)
      np.testing.assert_allclose(out["boxes"][i, rows], fin["boxes"], rtol=0, atol=1e-3)
      np.testing.assert_allclose(out["mask_scores"][i, rows], fin["mask_scores"], rtol=1e-6)
      np.testing.assert_array_equal(out["scores"][i, rows], fin["scores"])
      np.testing.assert_array_equal(out["classes"][i, rows], fin["classes"])
      h0, w0 = orig_hw[i]
      ref = _unpack(fin["masks_packed"], fin["masks_shape"])
      got = out["masks"][i, rows]
      flips = (got[:, :h0, :w0] != ref).sum(axis=(1, 2))
      print(f"given={given} img{i}: {flips.sum()} differing mask pixels")
      assert flips.max() <= 3, flips
      assert not got[:, h0:].any() and not got[:, :, w0:].any()
      assert not out["masks"][i, ~out["valid"][i]].any()  # dropped rows carry no mask


def test_jitted_postprocess_functions_do_not_recompile():
  rng = np.random.default_rng(2)
  n, k, c = 2, 5, 6
  fns = {
      "detector_postprocess": lambda: pp.detector_postprocess(
          rng.uniform(0, 50, (n, k, 4)).astype(np.float32), rng.random((n, k)) < 0.5,
          rng.integers(40, 60, (n, 2)).astype(np.int32),
          rng.integers(40, 60, (n, 2)).astype(np.int32)),
      "maskiou_rescore": lambda: pp.maskiou_rescore(
          rng.random((n, k), dtype=np.float32), rng.random((n, k, c), dtype=np.float32),
          rng.integers(0, c, (n, k)).astype(np.int32)),
      "select_class_masks": lambda: pp.select_class_masks(
          rng.random((n, k, 6, 6, c), dtype=np.float32), rng.integers(0, c, (n, k)).astype(np.int32)),
      "maxpool2x2": lambda: pp.maxpool2x2(rng.random((n, k, 6, 6), dtype=np.float32)),
      "postprocess_detections": lambda: pp.postprocess_detections(
          rng.uniform(0, 50, (n, k, 4)).astype(np.float32), rng.random((n, k), dtype=np.float32),
          rng.integers(0, c, (n, k)).astype(np.int32), rng.random((n, k)) < 0.5,
          rng.random((n, k, 6, 6), dtype=np.float32), rng.random((n, k, c), dtype=np.float32),
          rng.integers(40, 60, (n, 2)).astype(np.int32),
          rng.integers(40, 60, (n, 2)).astype(np.int32), (64, 64)),
  }
  for name, call in fns.items():
    fn = getattr(pp, name)
    before = fn._cache_size()
    for _ in range(3):
      call()
      assert fn._cache_size() == before + 1, name
