"""Predictor (official preprocessing, one image) and the import_weights CLI vs the fixture."""
import pathlib

import numpy as np
import pytest

from centermask_jax.checkpoints import io
from centermask_jax.config import load_config
from centermask_jax.models.centermask import CenterMask
from centermask_jax.predictor import Predictor, preprocess
from centermask_jax.tools import import_weights
from centermask_jax.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py")


def test_preprocess_matches_official_bytes(lite_fixture):
  cfg = load_config(CONFIG)
  inp = np.load(lite_fixture / "inputs.npz")
  for i in range(2):
    x, hw, padded = preprocess(inp[f"img{i}_orig_rgb_uint8"], cfg)
    ref = inp[f"img{i}_resized_bgr_uint8"]
    assert tuple(hw) == ref.shape[:2]
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x[:hw[0], :hw[1]], ref)
    assert np.all(x[hw[0]:] == 0) and np.all(x[:, hw[1]:] == 0)
    assert tuple(padded) == tuple(-(-v // 32) * 32 for v in hw)


def test_device_normalize_is_bit_exact_to_detectron2(lite_fixture):
  """CenterMask.normalize (uint8 on the device) == detectron2's float batch tensor, both
  images in one batch (zero padding included), on the official padding and on a canvas."""
  import jax
  cfg = load_config(CONFIG)
  model = CenterMask(cfg)
  inp = np.load(lite_fixture / "inputs.npz")
  ref = inp["images_tensor"].transpose(0, 2, 3, 1)  # [2, 608, 928, 3] float32
  hw = np.asarray(inp["image_sizes"], np.int32)
  norm = jax.jit(model.normalize)
  for canvas in (ref.shape[1:3], (640, 1024)):
    x = np.zeros((2, *canvas, 3), np.uint8)
    for i in range(2):
      im = inp[f"img{i}_resized_bgr_uint8"]
      x[i, :im.shape[0], :im.shape[1]] = im
    out = np.asarray(norm(x, hw))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :ref.shape[1], :ref.shape[2]], ref)
    assert not out[:, ref.shape[1]:].any() and not out[:, :, ref.shape[2]:].any()
    norm(255 - x, hw[::-1])  # same canvas, other pixels and sizes: no new compile
  assert norm._cache_size() == 2  # one compile per canvas
  # every uint8 value of every channel, with a non-trivial std, vs the NumPy float32 formula
  cfg.unlock()
  cfg.input.pixel_std = (57.375, 57.12, 58.395)
  vals = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None, None], (1, 256, 1, 3))
  out = np.asarray(jax.jit(CenterMask(cfg).normalize)(np.ascontiguousarray(vals),
                                                        np.array([[256, 1]], np.int32)))
  want = ((vals.astype(np.float32) - np.asarray(cfg.input.pixel_mean, np.float32))
          / np.asarray(cfg.input.pixel_std, np.float32))
  np.testing.assert_array_equal(out, want)
  f = np.ones((1, 32, 32, 3), np.float32)
  assert model.normalize(f, np.array([[8, 8]], np.int32)) is f


def test_import_cli_then_predictor_reproduces_fixture(lite_fixture, tmp_path):
  """coffee (400x600 -> 600x900) alone pads to 608x928 like the fixture batch, so the
  predictor's output must equal the fixture's final img1 results."""
  out = tmp_path / "ckpt"
  rc = import_weights.main(["--config", CONFIG, "--weights",
                            str(lite_fixture / "model_random_fp16.pth"), "--out", str(out)])
  assert rc == 0
  cfg = load_config(CONFIG)
  model = CenterMask(cfg)
  variables = io.load_model_variables(str(out), model)
  pred = Predictor(cfg, variables, model)
  inp = np.load(lite_fixture / "inputs.npz")
  ev = np.load(lite_fixture / "eval_outputs.npz")
  res = pred(inp["img1_orig_rgb_uint8"])
  np.testing.assert_allclose(res["boxes"], ev["img1_final_boxes"], atol=1e-3)
  np.testing.assert_allclose(res["scores"], ev["img1_final_scores"], atol=1e-5)
  np.testing.assert_array_equal(res["classes"], ev["img1_final_classes"])
  np.testing.assert_allclose(res["mask_scores"], ev["img1_final_mask_scores"], atol=1e-4)
  shape = tuple(ev["img1_final_masks_shape"])
  ref = np.unpackbits(ev["img1_final_masks_packed"], axis=-1)[..., :shape[2]].astype(bool)
  assert res["masks"].shape == ref.shape
  assert np.sum(res["masks"] != ref, axis=(1, 2)).max() <= 8


def test_import_cli_reports_mismatch(lite_fixture, tmp_path, capsys):
  other = str(REPO / "configs" / "centermask_lite_V_19_eSE_FPN_ms_4x.py")
  rc = import_weights.main(["--config", other, "--weights",
                            str(lite_fixture / "model_random_fp16.pth"), "--out", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert rc == 2
  assert "missing keys" in err and "backbone.bottom_up.stage2.OSA2_1.layers.0.OSA2_1_0/conv.weight" in err
  assert "unexpected keys" in err and "OSA2_1_0/dw_conv3x3.weight" in err


def test_predictor_rejects_bad_image():
  cfg = load_config(CONFIG)
  with pytest.raises(ValueError, match="RGB uint8"):
    preprocess(np.zeros((10, 10), np.uint8), cfg)


def test_predictor_compiles_once_per_canvas_bucket(compiles, monkeypatch):
  """5 landscape images of different sizes (and detection counts): everything compiles
  during the first call (model on the group canvas, box scaling, tiled paste), nothing
  after, and the heap that compile freed goes back to the OS after it, once; masks come
  back at each original size."""
  import jax
  from centermask_jax import host_memory
  from centermask_jax.config import base_config, lite, vovnet
  c = base_config()
  lite(c)
  vovnet(c, "V-19-slim-dw-eSE")
  c.model.num_classes = 3
  c.model.fpn_channels = 32
  c.model.mask_head.conv_dim = 32
  c.model.maskiou_head.conv_dim = 32
  c.model.fcos.inference_th = 0.0  # random weights: keep detections so that masks paste
  c.model.fcos.pre_nms_topk = 64
  c.model.fcos.post_nms_topk_test = 8
  c.input.min_size_test = 64
  c.input.max_size_test = 128
  model = CenterMask(c)
  pred = Predictor(c, trainer.random_variables(model, jax.random.PRNGKey(0)), model)
  trims = []
  monkeypatch.setattr(host_memory, "release_host_memory", lambda: trims.append(1) or True)
  r = np.random.RandomState(0)
  sizes = [(60, 90), (100, 130), (45, 80), (200, 301), (33, 64)]
  start = len(compiles.names)  # earlier tests in this process compiled their own predicts
  mark = None
  counts = set()
  for i, (h, w) in enumerate(sizes):
    img = r.randint(0, 256, (h, w, 3)).astype(np.uint8)
    out = pred(img)
    assert out["masks"].shape == (len(out["scores"]), h, w)
    counts.add(len(out["scores"]))
    if i == 0:
      first = compiles.since(start)
      mark = len(compiles.names)
      assert len(trims) == 1
  assert sum("predict" in n for n in first) == 1, first
  assert compiles.since(mark) == [], compiles.since(mark)
  assert len(trims) == 1
  assert max(counts) > 0
