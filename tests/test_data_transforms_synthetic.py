"""Resize/decode transforms vs detectron2 fixtures and PIL; synthetic dataset determinism."""
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from centermask_jax.data import synthetic, transforms


def test_resize_matches_detectron2_fixture(lite_fixture):
  d = np.load(os.path.join(lite_fixture, "inputs.npz"))
  for i in range(2):
    orig = d[f"img{i}_orig_rgb_uint8"]
    ref = d[f"img{i}_resized_bgr_uint8"]
    hw = transforms.get_output_shape(*orig.shape[:2], 600, 1000)
    assert hw == ref.shape[:2] == tuple(d["image_sizes"][i])
    # through the decode path: PNG bytes -> BGR -> PIL bilinear, bit-exact
    buf = io.BytesIO()
    Image.fromarray(orig).save(buf, format="PNG")
    img, orig_hw, hw2 = transforms.resized_image_and_hw(buf.getvalue(), 600, 1000, "BGR")
    assert orig_hw == orig.shape[:2] and hw2 == hw
    np.testing.assert_array_equal(img, ref)


@pytest.mark.parametrize("hw,short,max_size,expect", [
    ((512, 512), 800, 1333, (800, 800)),      # V-39 fixture sizes (fixtures README)
    ((400, 600), 800, 1333, (800, 1200)),
    ((300, 1000), 600, 1000, (300, 1000)),    # capped by max size: 600x2000 -> 300x1000
    ((480, 640), 580, 1000, (580, 773)),      # 773.33 rounds down
    ((427, 640), 600, 1000, (600, 899)),      # 899.297 -> 899
])
def test_output_shape_rule(hw, short, max_size, expect):
  assert transforms.get_output_shape(*hw, short, max_size) == expect


def test_exif_orientation_applied():
  rgb = np.zeros((20, 30, 3), np.uint8)
  rgb[:5, :10] = 255  # top-left marker
  img = Image.fromarray(rgb)
  exif = img.getexif()
  exif[0x0112] = 6  # stored rotated: viewer must rotate 90 degrees clockwise
  buf = io.BytesIO()
  img.save(buf, format="JPEG", exif=exif, quality=100)
  out = transforms.decode_image(buf.getvalue(), "RGB")
  assert out.shape == (30, 20, 3)
  assert out[:10, -5:].mean() > 200 and out[-10:, :5].mean() < 50  # marker now top-right


def _digest(root):
  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(dirpath, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def test_synthetic_deterministic_and_consistent(tmp_path):
  a = synthetic.generate(str(tmp_path / "a"), seed=7, num_train=12, num_val=4)
  synthetic.generate(str(tmp_path / "b"), seed=7, num_train=12, num_val=4)
  synthetic.generate(str(tmp_path / "c"), seed=8, num_train=12, num_val=4)
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
  assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
  coco = COCO(a[0][1])
  assert len(coco.getImgIds()) == 12
  assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(synthetic.CLASSES)
  n_multi = 0
  for iid in coco.getImgIds():
    im = coco.imgs[iid]
    img = np.asarray(Image.open(os.path.join(a[0][2], im["file_name"])).convert("RGB"))
    assert img.shape[:2] == (im["height"], im["width"])
    anns = coco.loadAnns(coco.getAnnIds(imgIds=iid))
    assert 1 <= len(anns) <= 5
    masks = [coco.annToMask(x).astype(bool) for x in anns]
    for x, m in zip(anns, masks):
      assert m.sum() > 300 and x["area"] == m.sum()   # large, learnable objects
      n_multi += len(x["segmentation"]) > 1
    # visible regions: instances do not overlap (only shared boundary pixels)
    overlap = (np.sum(masks, axis=0) > 1).sum()
    assert overlap <= 0.05 * sum(m.sum() for m in masks)
  assert n_multi >= 1  # occlusion splits some objects into several polygon parts


def test_synthetic_builds_and_feeds_pipeline(tmp_path):
  import contextlib
  from centermask_jax import config as cfg_lib
  from centermask_jax.data import pipeline, prepare
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = prepare.main(["--synthetic", "--seed", "3", "--num-train", "8", "--num-val", "5",
                       "--data-dir", str(tmp_path)])
  assert rc == 0
  src = tmp_path / "synthetic_src" / "seed3" / "annotations"
  for split in ("train", "val"):
    d = json.loads((src / f"instances_{split}.json").read_text())
    assert (f"split={split} images={len(d['images'])} instances={len(d['annotations'])} "
            f"crowd=0 skipped_images=0 dropped_instances=0") in out.getvalue()
  info = pipeline.dataset_info(str(tmp_path), "synthetic")
  assert info.class_names == list(synthetic.CLASSES)
  assert info.label_to_category_id == [1, 2, 3, 4, 5]
  c = cfg_lib.base_config()
  c.input.min_size_train, c.input.max_size_train = (224, 256), 320
  c.input.min_size_test, c.input.max_size_test = 256, 320
  it = pipeline.make_train_iterator(c, str(tmp_path), "synthetic", 0, 2, 2, 0, 1)
  b = next(it)
  assert b["image"].shape in {(2, 2, 256, 384, 3), (2, 2, 384, 256, 3)}
  import time
  t = time.perf_counter()  # issue 12.4: resuming at step 10^6 reads no earlier record
  it.set_state({"step": 10 ** 6})
  assert next(it)["image"].shape[:2] == (2, 2) and time.perf_counter() - t < 10
  del it
  assert b["gt_valid"].any(-1).all() and (b["gt_classes"][b["gt_valid"]] < 5).all()
  ids = [i for e in pipeline.make_eval_iterator(c, str(tmp_path), "synthetic", 2, 2, 0, 1)
         for i in e["image_id"][e["is_real"]]]
  assert sorted(ids) == sorted(im["id"] for im in
                               json.loads((src / "instances_val.json").read_text())["images"])


def test_canvas_override_is_validated():
  """input.canvas_train must be two (H, W) pairs, multiples of 32, holding every resized image."""
  from centermask_jax import config as cfg_lib
  from centermask_jax.data import pipeline
  c = cfg_lib.base_config()
  c.input.min_size_train, c.input.max_size_train = (128,), 183
  c.input.canvas_train = ((128, 192), (192, 128))
  prm = pipeline._input_params(c, True)
  assert prm["canvases"] == ((128, 192), (192, 128))
  for bad, needle in ((((128, 192),), "expected"), (((128, 160), (160, 128)), "cannot hold"),
                      (((128, 200), (200, 128)), "multiple of 32")):
    c.input.canvas_train = bad
    with pytest.raises(ValueError, match=needle):
      pipeline._input_params(c, True)
