"""Predictor on a list: batches per canvas bucket, equal to one image at a time."""
import pathlib

import numpy as np
import pytest

from centermask_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py")
SMALL = {"input.min_size_test": 128, "input.max_size_test": 192,
         "model.fcos.pre_nms_topk": 200, "model.fcos.post_nms_topk_test": 20}


def test_list_batches_by_bucket_and_equals_single(lite_fixture, tiny_coco):
  pytest.importorskip("torch")  # reads the fixture's .pth
  from centermask_jax.checkpoints.io import load_model_variables
  from centermask_jax.models.centermask import CenterMask
  from centermask_jax.predictor import Predictor
  from centermask_jax.serving import load_rgb
  cfg = load_config(CONFIG, SMALL)
  model = CenterMask(cfg)
  variables = load_model_variables(str(lite_fixture / "model_random_fp16.pth"), model)
  inp = np.load(lite_fixture / "inputs.npz")
  images = [inp["img0_orig_rgb_uint8"], inp["img1_orig_rgb_uint8"],
            load_rgb(str(tiny_coco / "val2017" / "000000006818.jpg")),   # portrait
            load_rgb(str(tiny_coco / "val2017" / "000000037777.jpg"))]
  assert images[2].shape[0] > images[2].shape[1] and images[3].shape[1] > images[3].shape[0]
  batched = Predictor(cfg, variables, model)
  outs = batched(images, batch_size=2)  # landscape: 3 images = 2 batches; portrait: 1
  assert batched._predict._cache_size() == 2  # one compile per canvas bucket
  again = batched(images[::-1], batch_size=2)[::-1]
  assert batched._predict._cache_size() == 2
  single = Predictor(cfg, variables, model)
  for img, got, got2 in zip(images, outs, again):
    ref = single(img)
    assert got["masks"].shape[1:] == img.shape[:2]
    for r in (got, got2):
      np.testing.assert_array_equal(r["classes"], ref["classes"])
      np.testing.assert_allclose(r["boxes"], ref["boxes"], atol=1e-3, rtol=0)
      np.testing.assert_allclose(r["scores"], ref["scores"], atol=1e-5, rtol=0)
      np.testing.assert_allclose(r["mask_scores"], ref["mask_scores"], atol=1e-4, rtol=0)
      assert np.sum(r["masks"] != ref["masks"], axis=(1, 2)).max(initial=0) <= 4
  assert len(ref["scores"]) > 0


def test_batch_size_must_be_positive(lite_fixture):
  from centermask_jax.predictor import Predictor

  class _Model:
    predict = staticmethod(lambda *a: None)
  with pytest.raises(ValueError, match="batch_size"):
    Predictor(load_config(CONFIG, SMALL), {}, _Model()).predict_batch([], 0)
