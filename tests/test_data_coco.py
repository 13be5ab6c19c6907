"""Data path on real COCO data (../shared/data/tiny_coco): builder, CLI, pipelines."""
import contextlib
import copy
import io
import json
import os
import re
import threading

import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools import mask as mask_util

from centermask_jax import cli
from centermask_jax import config as cfg_lib
from centermask_jax.data import coco_builder, pipeline, prepare, train_order, transforms

LINE = re.compile(r"split=(\w+) images=(\d+) instances=(\d+) crowd=(\d+) "
                  r"skipped_images=(\d+) dropped_instances=(\d+)")


def _json(tiny, split):
  return os.path.join(tiny, "annotations", f"instances_{split}2017.json")


def _run_cli(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = cli.run(prepare.main, argv)
  return rc, out.getvalue()


@pytest.fixture(scope="session")
def built(tiny_coco, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  t = str(tiny_coco)
  rc, out = _run_cli([
      "--name", "tiny", "--train-json", _json(t, "train"), "--train-images", f"{t}/train2017",
      "--val-json", _json(t, "val"), "--val-images", f"{t}/val2017", "--data-dir", data_dir])
  assert rc == 0
  return data_dir, out


def _config(sizes=(600,), max_size=1000, flip=False):
  c = cfg_lib.lite(cfg_lib.base_config())
  c.input.min_size_train = sizes
  c.input.max_size_train = max_size
  c.input.random_flip = flip
  return c


def _independent_counts(path):
  """Counts straight from the JSON (all tiny_coco images exist and are valid)."""
  with open(path) as f:
    d = json.load(f)
  degenerate = 0
  for a in d["annotations"]:
    x, y, w, h = a["bbox"]
    s = a["segmentation"]
    if w <= 0 or h <= 0:
      degenerate += 1
    elif isinstance(s, list) and not any(len(p) >= 6 and len(p) % 2 == 0 for p in s):
      degenerate += 1
  kept = len(d["annotations"]) - degenerate
  crowd = sum(1 for a in d["annotations"] if a.get("iscrowd", 0))
  return dict(images=len(d["images"]), instances=kept, crowd=crowd, skipped=0,
              dropped=degenerate)


def test_cli_counts_equal_json(built, tiny_coco):
  _, out = built
  lines = {m.group(1): m for m in LINE.finditer(out)}
  assert set(lines) == {"train", "val"}
  for split in ("train", "val"):
    ref = _independent_counts(_json(str(tiny_coco), split))
    m = lines[split]
    got = dict(images=int(m.group(2)), instances=int(m.group(3)), crowd=int(m.group(4)),
               skipped=int(m.group(5)), dropped=int(m.group(6)))
    assert got == ref


def test_records_match_json(built, tiny_coco):
  data_dir, _ = built
  import tensorflow_datasets as tfds
  info = pipeline.dataset_info(data_dir, "tiny")
  with open(_json(str(tiny_coco), "val")) as f:
    d = json.load(f)
  cat_ids = sorted(c["id"] for c in d["categories"])
  assert info.label_to_category_id == cat_ids and info.num_classes == len(cat_ids)
  names = {c["id"]: c["name"] for c in d["categories"]}
  assert info.class_names == [names[c] for c in cat_ids]
  per_image = {}
  for a in d["annotations"]:
    per_image.setdefault(a["image_id"], []).append(a)
  b = tfds.builder_from_directory(info.path)
  seen = set()
  for ex in b.as_dataset(split="val").as_numpy_iterator():
    iid = int(ex["image_id"])
    seen.add(iid)
    anns = sorted(per_image.get(iid, []), key=lambda a: a["id"])
    o = ex["objects"]
    order = np.argsort(o["id"])
    assert o["id"][order].tolist() == [a["id"] for a in anns]
    assert o["category_id"][order].tolist() == [a["category_id"] for a in anns]
    assert o["label"][order].tolist() == [cat_ids.index(a["category_id"]) for a in anns]
    assert o["is_crowd"][order].tolist() == [bool(a["iscrowd"]) for a in anns]
    boxes = np.frombuffer(ex["bbox_f64"], "<f8").reshape(-1, 4)
    np.testing.assert_array_equal(boxes[order], np.asarray([a["bbox"] for a in anns]).reshape(-1, 4))
    np.testing.assert_array_equal(o["bbox"][order], boxes[order].astype(np.float32))
    polys = [p for a in anns if isinstance(a["segmentation"], list) for p in a["segmentation"]]
    xy = np.frombuffer(ex["poly_xy"], "<f8")
    assert sorted(xy.tolist()) == sorted(v for p in polys for v in p)
    assert sorted(ex["poly_len"].tolist()) == sorted(len(p) // 2 for p in polys)
  assert seen == {im["id"] for im in d["images"]}
  assert info.num_images == {"train": 50, "val": 50}
  gt = COCO(info.gt_json["val"])
  assert len(gt.getImgIds()) == 50 and len(gt.getAnnIds()) == len(d["annotations"])


def test_eval_images_masks_and_coverage(built, tiny_coco):
  """Resize/metadata/pixels vs PIL; every instance's polygons reproduce annToMask (IoU >= 0.95)."""
  data_dir, _ = built
  c = _config()
  coco = COCO(_json(str(tiny_coco), "val"))
  cat_ids = sorted(coco.getCatIds())
  it = pipeline.make_eval_iterator(c, data_dir, "tiny", 4, 2, process_index=0, process_count=1)
  ids, n_inst, ious, ious_resized = [], 0, [], []
  shapes = set()
  checked_pixels = 0
  for batch in it:
    shapes.add(batch["image"].shape)
    real = batch["is_real"].reshape(-1)
    assert (batch["image_id"].reshape(-1)[~real] == -1).all()
    assert not batch["gt_valid"].reshape(8, -1)[~real].any()
    for k in np.nonzero(real)[0]:
      d, b = divmod(int(k), 2)
      iid = int(batch["image_id"][d, b])
      ids.append(iid)
      im = coco.imgs[iid]
      h, w = batch["image_hw"][d, b]
      assert (h, w) == transforms.get_output_shape(im["height"], im["width"], 600, 1000)
      assert tuple(batch["orig_hw"][d, b]) == (im["height"], im["width"])
      assert tuple(batch["padded_hw"][d, b]) == (-(-h // 32) * 32, -(-w // 32) * 32)
      if checked_pixels < 3:  # image = PIL bilinear of the BGR array (uint8)
        with open(os.path.join(str(tiny_coco), "val2017", im["file_name"]), "rb") as f:
          ref = np.asarray(Image.open(f).convert("RGB"))[:, :, ::-1]
        ref = np.asarray(Image.fromarray(np.ascontiguousarray(ref)).resize((w, h), Image.BILINEAR))
        assert batch["image"].dtype == np.uint8
        np.testing.assert_array_equal(batch["image"][d, b, :h, :w], ref)
        assert not batch["image"][d, b, h:].any() and not batch["image"][d, b, :, w:].any()
        checked_pixels += 1
      anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=iid)) if not a["iscrowd"]]
      valid = batch["gt_valid"][d, b]
      assert valid.sum() == len(anns)
      sx, sy = w / im["width"], h / im["height"]
      for j, a in enumerate(anns):  # pipeline keeps JSON order of non-crowd instances
        assert batch["gt_classes"][d, b, j] == cat_ids.index(a["category_id"])
        x, y, bw, bh = a["bbox"]
        np.testing.assert_allclose(batch["gt_boxes"][d, b, j],
                                   [x * sx, y * sy, (x + bw) * sx, (y + bh) * sy], rtol=1e-6, atol=1e-4)
        polys, plen = batch["gt_polys"][d, b, j], batch["gt_poly_len"][d, b, j]
        # (a) representation fidelity, every instance: polygons mapped back to the original
        # frame rasterise like annToMask.
        back = polys.astype(np.float64) / [sx, sy]
        ann_mask = coco.annToMask(a).astype(bool)
        got0 = transforms.polygons_to_mask(back, plen, (im["height"], im["width"]))
        ious.append((got0 & ann_mask).sum() / max((got0 | ann_mask).sum(), 1))
        # (b) in the resized frame vs annToMask resized like the image (PIL bilinear): large
        # objects only, small ones differ by rasterisation at two scales (1 px is 10% of 10 px).
        if a["area"] >= 96 ** 2:
          ref = np.asarray(Image.fromarray(ann_mask.astype(np.uint8) * 255)
                           .resize((w, h), Image.BILINEAR)) >= 128
          got = transforms.polygons_to_mask(polys, plen, (h, w))
          ious_resized.append((got & ref).sum() / max((got | ref).sum(), 1))
        n_inst += 1
  assert sorted(ids) == sorted(coco.getImgIds())  # every image exactly once
  assert n_inst == sum(1 for a in coco.dataset["annotations"] if not a["iscrowd"])
  assert min(ious) >= 0.95, sorted(ious)[:5]
  assert len(ious_resized) > 50 and min(ious_resized) >= 0.95, sorted(ious_resized)[:5]
  assert shapes <= {(4, 2, 640, 1024, 3), (4, 2, 1024, 640, 3)}


def test_eval_shards_disjoint_same_length(built):
  data_dir, _ = built
  c = _config()
  per = []
  for pi in range(3):
    it = pipeline.make_eval_iterator(c, data_dir, "tiny", 2, 3, process_index=pi, process_count=3)
    per.append([(b["image_id"][b["is_real"]].tolist(), b["image"].shape) for b in it])
  assert len({len(p) for p in per}) == 1
  for step in range(len(per[0])):  # same canvas at every step on every process
    assert len({p[step][1] for p in per}) == 1
  ids = [i for p in per for ids, _ in p for i in ids]
  assert len(ids) == len(set(ids)) == 50


def test_train_static_shapes_flip_and_determinism(built):
  data_dir, _ = built
  c = _config(sizes=(580, 600), flip=True)
  it = pipeline.make_train_iterator(c, data_dir, "tiny", seed=3, num_local_devices=2,
                                    per_device_batch=2, process_index=0, process_count=1)
  batches = [next(it) for _ in range(6)]
  canv = {(2, 2, 640, 1024, 3), (2, 2, 1024, 640, 3)}
  ref_shapes = {k: v.shape for k, v in batches[0].items() if k != "image"}
  n_checked = 0
  for b in batches:
    assert b["image"].shape in canv
    assert {k: v.shape for k, v in b.items() if k != "image"} == ref_shapes
    assert ref_shapes["gt_polys"] == (2, 2, 100, 16, 256, 2)
    assert b["is_real"].all() and b["gt_valid"].any(axis=-1).all()  # empty images filtered
    # boxes and polygons move together (a one-sided flip would put masks outside boxes)
    for d in range(2):
      for k in range(2):
        h, w = b["image_hw"][d, k]
        assert min(h, w) in (580, 600) or max(h, w) == 1000
        for j in np.nonzero(b["gt_valid"][d, k])[0]:
          m = transforms.polygons_to_mask(b["gt_polys"][d, k, j], b["gt_poly_len"][d, k, j], (h, w))
          if m.sum() < 20:
            continue
          ys, xs = np.nonzero(m)
          x0, y0, x1, y1 = b["gt_boxes"][d, k, j]
          assert xs.min() >= x0 - 1.5 and xs.max() + 1 <= x1 + 1.5
          assert ys.min() >= y0 - 1.5 and ys.max() + 1 <= y1 + 1.5
          n_checked += 1
  assert n_checked > 50
  # same seed -> same batches; resume at step 4 -> batch 4
  it2 = pipeline.make_train_iterator(c, data_dir, "tiny", seed=3, num_local_devices=2,
                                     per_device_batch=2, process_index=0, process_count=1)
  for b in batches[:2]:
    b2 = next(it2)
    for k in b:
      np.testing.assert_array_equal(b[k], b2[k])
  it2.set_state({"step": 4})
  b4 = next(it2)
  for k in b4:
    np.testing.assert_array_equal(b4[k], batches[4][k])
  assert it2.get_state() == {"step": 5}
  it3 = pipeline.make_train_iterator(c, data_dir, "tiny", seed=4, num_local_devices=2,
                                     per_device_batch=2, process_index=0, process_count=1)
  assert any((next(it3)["image_id"] != b["image_id"]).any() for b in batches[:2])


def test_resume_across_an_epoch_and_at_step_1e6(built, monkeypatch):
  """Issue 12.4: resuming at step k gives the batches of an uninterrupted run, also for
  batches formed across the end of epoch 0; resuming at step 10^6 looks up only that
  batch and the ones prefetched after it (no skip over the 10^6 before it)."""
  data_dir, _ = built
  c = _config(sizes=(580, 600), flip=True)
  mk = lambda: pipeline.make_train_iterator(c, data_dir, "tiny", seed=3, num_local_devices=2,
                                            per_device_batch=1, process_index=0,
                                            process_count=1)
  info = pipeline.dataset_info(data_dir, "tiny")
  index = train_order.load_index(info.path, train_order.record_files(info.path, "train"))
  assert index is not None and int(index.usable.sum()) == info.num_train_images  # by prepare
  usable = np.nonzero(index.usable)[0]
  order = train_order.TrainOrder(index.group[usable], 3, 2)
  first_of_epoch1 = order.batches_before_epoch(1)
  it = mk()
  run = [next(it) for _ in range(first_of_epoch1 + 3)]
  # a group with an odd count per epoch carries a record of epoch 0 into epoch 1's batch
  assert any((order.n_group % 2) == 1)
  for k in (first_of_epoch1 - 1, first_of_epoch1, first_of_epoch1 + 1):
    it2 = mk()
    it2.set_state({"step": k})
    for j in range(k, len(run)):
      b = next(it2)
      for key in b:
        np.testing.assert_array_equal(b[key], run[j][key], err_msg=f"step {j} {key}")
  # two processes (1 device each) read disjoint halves of the same global batches
  shards = [pipeline.make_train_iterator(c, data_dir, "tiny", seed=3, num_local_devices=1,
                                         per_device_batch=1, process_index=p, process_count=2)
            for p in (0, 1)]
  for j in range(3):
    halves = [next(s) for s in shards]
    for key in run[j]:
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), run[j][key])
  del shards
  # epoch 0 holds every usable image once before any repeats
  seen = [i for b in run[:first_of_epoch1] for i in b["image_id"].ravel().tolist()]
  assert len(seen) == len(set(seen)) >= info.num_train_images - 2
  # the work done for step 10^6, counted (not timed: the host is shared): the steps whose
  # records were looked up, the epochs whose permutation was drawn, the records read
  asked, drawn, reads = [], [], []
  calls = threading.Lock()

  def counted(fn, log, arg):
    def wrapper(self, *a):
      with calls:
        log.append(arg(*a))
      return fn(self, *a)
    return wrapper
  monkeypatch.setattr(train_order.TrainOrder, "batch_records",
                      counted(train_order.TrainOrder.batch_records, asked, int))
  monkeypatch.setattr(train_order.TrainOrder, "permutation",
                      counted(train_order.TrainOrder.permutation, drawn, int))
  monkeypatch.setattr(train_order.RecordIndex, "read",
                      counted(train_order.RecordIndex.read, reads, int))
  it.set_state({"step": 10 ** 6})
  b = next(it)
  e = order.epoch_of_step(10 ** 6)
  assert e > 1000, e
  assert asked and min(asked) == 10 ** 6 and len(asked) <= 64, (len(asked), min(asked))
  assert drawn and min(drawn) >= e - 1 and len(set(drawn)) <= len(asked) + 1, sorted(set(drawn))
  assert 2 <= len(reads) <= 2 * len(asked), (len(reads), len(asked))
  monkeypatch.undo()
  import tensorflow_datasets as tfds
  feats = tfds.builder_from_directory(info.path).info.features
  want = [int(feats.deserialize_example(index.read(int(usable[r])))["image_id"])
          for r in order.batch_records(10 ** 6)[0]]
  assert b["image_id"].ravel().tolist() == want
  assert it.get_state() == {"step": 10 ** 6 + 1}


def test_canvas_buckets_pad_each_batch_like_detectron2(built):
  """input.canvas_bucket=32: each global batch sits on its largest official padded size
  (a multiple of 32, as detectron2 pads batches), the same on every process; everything
  else equals the fixed-canvas batches, and the pixels agree inside the smaller canvas."""
  data_dir, _ = built
  c = _config(sizes=(480, 520, 600), flip=True)
  cb = _config(sizes=(480, 520, 600), flip=True)
  cb.input.canvas_bucket = 32
  mk = lambda cfg, p: pipeline.make_train_iterator(cfg, data_dir, "tiny", seed=5,
                                                    num_local_devices=2, per_device_batch=1,
                                                    process_index=p, process_count=2)
  fixed, b0, b1 = mk(c, 0), mk(cb, 0), mk(cb, 1)
  shapes = set()
  for _ in range(5):
    f, x, y = next(fixed), next(b0), next(b1)
    hc, wc = x["image"].shape[2:4]
    assert y["image"].shape == x["image"].shape  # one canvas per global batch
    padded = np.concatenate([x["padded_hw"].reshape(-1, 2), y["padded_hw"].reshape(-1, 2)])
    assert (hc, wc) == tuple(padded.max(0))
    shapes.add((hc, wc))
    for k in f:
      if k != "image":
        np.testing.assert_array_equal(x[k], f[k])
    np.testing.assert_array_equal(x["image"], f["image"][:, :, :hc, :wc])
    assert not f["image"][:, :, hc:].any() and not f["image"][:, :, :, wc:].any()
  assert len(shapes) > 1
  ev = pipeline.make_eval_iterator(cb, data_dir, "tiny", 2, 1, process_index=0,
                                   process_count=1)
  for b in ev:
    real = b["is_real"].reshape(-1)
    pad = b["padded_hw"].reshape(-1, 2)[real]
    assert b["image"].shape[2:4] == tuple(pad.max(0))


def test_flip_mirrors_image_boxes_masks(built, tiny_coco):
  data_dir, _ = built
  import tensorflow_datasets as tfds
  info = pipeline.dataset_info(data_dir, "tiny")
  prm = pipeline._input_params(_config(flip=True), train=True)
  ex = next(iter(tfds.builder_from_directory(info.path).as_dataset(split="train")
                 .filter(lambda e: tf_size(e) > 2).as_numpy_iterator()))
  o = ex["objects"]
  args = [ex["image"], ex["height"], ex["width"], np.frombuffer(ex["bbox_f64"], "<f8"),
          o["label"], o["is_crowd"], o["num_parts"], ex["poly_len"],
          np.frombuffer(ex["poly_xy"], "<f8"), np.int32(600)]
  canvas = np.int32(prm["canvases"][0 if ex["width"] > ex["height"] else 1])  # its group's
  a = pipeline._host_example(*args, np.bool_(False), canvas, prm=prm)
  f = pipeline._host_example(*args, np.bool_(True), canvas, prm=prm)
  h, w = a[1]
  np.testing.assert_array_equal(f[0][:h, :w], a[0][:h, :w][:, ::-1])
  assert not f[0][h:].any() and not f[0][:, w:].any()
  bx = a[3][a[5]]
  np.testing.assert_allclose(f[3][f[5]], np.stack([w - bx[:, 2], bx[:, 1], w - bx[:, 0], bx[:, 3]], 1),
                             atol=1e-4)
  for j in np.nonzero(a[5])[0]:
    ma = transforms.polygons_to_mask(a[6][j], a[7][j], (h, w))
    mf = transforms.polygons_to_mask(f[6][j], f[7][j], (h, w))
    inter = (mf & ma[:, ::-1]).sum()
    assert inter / max((mf | ma[:, ::-1]).sum(), 1) >= 0.99


def tf_size(e):
  import tensorflow as tf
  return tf.size(e["objects"]["id"])


def test_bad_images_and_annotations_are_counted(tiny_coco, tmp_path):
  t = str(tiny_coco)
  with open(_json(t, "val")) as f:
    d = json.load(f)
  img_dir = tmp_path / "images"
  img_dir.mkdir()
  for im in d["images"]:
    os.symlink(os.path.join(t, "val2017", im["file_name"]), img_dir / im["file_name"])
  bad, missing = d["images"][0], d["images"][1]
  os.remove(img_dir / bad["file_name"])
  data = open(os.path.join(t, "val2017", bad["file_name"]), "rb").read()
  (img_dir / bad["file_name"]).write_bytes(data[: len(data) // 3])  # truncated JPEG
  os.remove(img_dir / missing["file_name"])
  d2 = copy.deepcopy(d)
  skipped_ids = {bad["id"], missing["id"]}
  in_skipped = sum(1 for a in d["annotations"] if a["image_id"] in skipped_ids)
  other = [a for a in d2["annotations"] if a["image_id"] not in skipped_ids and not a["iscrowd"]]
  other[0]["bbox"][2] = 0.0                       # zero-area box
  other[1]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # polygon with 2 points
  h, w = 10, 10
  empty = mask_util.encode(np.zeros((h, w), np.uint8, order="F"))
  other[2]["segmentation"] = {"size": [h, w], "counts": empty["counts"].decode()}  # empty mask
  js = tmp_path / "val.json"
  js.write_text(json.dumps(d2))
  rc, out = _run_cli(["--name", "broken", "--val-json", str(js), "--val-images", str(img_dir),
                      "--data-dir", str(tmp_path / "tfds")])
  assert rc == 0
  m = LINE.search(out)
  assert m.group(1) == "val"
  assert int(m.group(2)) == len(d["images"]) - 2
  assert int(m.group(5)) == 2
  assert int(m.group(6)) == in_skipped + 3
  assert int(m.group(3)) == len(d["annotations"]) - in_skipped - 3
  for reason in ("corrupt_image=1", "missing_file=1", "zero_area_box=1",
                 "polygon_under_3_points=1", "empty_mask=1", f"in_skipped_image={in_skipped}"):
    assert reason in out
  ids = []
  for b in pipeline.make_eval_iterator(_config(), str(tmp_path / "tfds"), "broken", 1, 4, 0, 1):
    ids += b["image_id"][b["is_real"]].tolist()
  assert sorted(ids) == sorted(im["id"] for im in d["images"] if im["id"] not in skipped_ids)


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"images": [], "categories": [{"id": 1, "name": "a"}]}), "'annotations'"),
    (json.dumps([1, 2]), "top level is a list"),
])
def test_non_coco_json_gives_one_clear_error(tmp_path, capsys, content, needle):
  js = tmp_path / "x.json"
  js.write_text(content)
  with pytest.raises(coco_builder.CocoFormatError, match=re.escape(needle)):
    coco_builder.load_coco_json(str(js))
  rc = cli.run(prepare.main, ["--name", "x", "--val-json", str(js), "--val-images",
                              str(tmp_path), "--data-dir", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert rc == 2 and err.count("error:") == 1 and needle in err
  assert not (tmp_path / "out").exists()


def test_coco_dir_layout_builds_same_counts(built, tiny_coco, tmp_path):
  """tiny_coco has the COCO 2017 layout: --coco-dir gives the same per-split lines."""
  _, out = built
  rc, out2 = _run_cli(["--name", "coco2017", "--coco-dir", str(tiny_coco),
                       "--data-dir", str(tmp_path)])
  assert rc == 0
  assert [m.group(0) for m in LINE.finditer(out2)] == [m.group(0) for m in LINE.finditer(out)]
  info = pipeline.dataset_info(str(tmp_path), "coco2017")
  with open(_json(str(tiny_coco), "train")) as f:
    d = json.load(f)
  usable = {a["image_id"] for a in d["annotations"] if not a["iscrowd"]}
  assert info.num_images == {"train": len(d["images"]), "val": 50}
  assert info.num_train_images == len(usable) < len(d["images"])


def test_eval_gt_is_exactly_what_the_builder_kept(tiny_coco, tmp_path):
  """Issue 12.2: a 2-point polygon, an empty segmentation list, a 2-point part beside a good
  one, an orphan annotation and a duplicate image id: the evaluation GT holds exactly the
  stored images (ids unique) and kept annotations, so COCOeval segm of the GT itself as
  detections runs and scores AP 100 (it raised, and a duplicate id scored 0, before)."""
  t = str(tiny_coco)
  with open(_json(t, "val")) as f:
    d = json.load(f)
  good = [a for a in d["annotations"] if not a["iscrowd"] and isinstance(a["segmentation"], list)
          and a["bbox"][2] > 0 and a["bbox"][3] > 0]
  good[0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]          # 2-point polygon: dropped
  good[1]["segmentation"] = []                              # empty list: dropped
  good[2]["segmentation"] = good[2]["segmentation"] + [[5.0, 6.0, 7.0, 8.0]]  # kept, part cut
  dup = dict(d["images"][1], file_name=d["images"][0]["file_name"])  # duplicate id: skipped
  d["images"].append(dup)
  d["annotations"].append(dict(good[3], id=10 ** 9, image_id=-5))  # orphan
  js = tmp_path / "val.json"
  js.write_text(json.dumps(d))
  rc, out = _run_cli(["--name", "gtk", "--val-json", str(js), "--val-images", f"{t}/val2017",
                      "--data-dir", str(tmp_path / "tfds")])
  assert rc == 0, out
  assert "duplicate_image_id=1" in out and "orphan_image_id=1" in out
  info = pipeline.dataset_info(str(tmp_path / "tfds"), "gtk")
  with open(info.gt_json["val"]) as f:
    gt = json.load(f)
  ids = [im["id"] for im in gt["images"]]
  assert len(ids) == len(set(ids)) == len(d["images"]) - 1
  gt_ann_ids = {a["id"] for a in gt["annotations"]}
  assert good[0]["id"] not in gt_ann_ids and good[1]["id"] not in gt_ann_ids
  assert 10 ** 9 not in gt_ann_ids
  g2 = next(a for a in gt["annotations"] if a["id"] == good[2]["id"])
  assert g2["segmentation"] == good[2]["segmentation"][:-1]
  m = LINE.search(out)
  assert len(gt["annotations"]) == int(m.group(3))
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  coco = COCO(info.gt_json["val"])
  dets = [dict(image_id=a["image_id"], category_id=a["category_id"], score=1.0,
               segmentation=coco.annToRLE(a)) for a in gt["annotations"] if not a["iscrowd"]]
  ev = COCOeval(coco, coco.loadRes(dets), "segm")
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  assert ev.stats[0] == pytest.approx(1.0)


def test_failed_rebuild_keeps_the_dataset_and_names_the_skips(tiny_coco, tmp_path, capsys):
  """Issue 12.3: rebuilding over an existing dataset with a wrong image folder fails with
  the per-reason counts and the missing files named (all in prepare_report.json), and the
  existing dataset is still there, unchanged (it was deleted first before)."""
  t = str(tiny_coco)
  data_dir = str(tmp_path / "tfds")
  args = ["--name", "keep", "--val-json", _json(t, "val"), "--data-dir", data_dir]
  rc, _ = _run_cli(args + ["--val-images", f"{t}/val2017"])
  assert rc == 0
  info = pipeline.dataset_info(data_dir, "keep")
  gt_before = open(info.gt_json["val"]).read()
  with open(_json(t, "val")) as f:
    in_order = [im["file_name"] for im in json.load(f)["images"]]
  names = sorted(in_order)
  rc, out = _run_cli(args + ["--val-images", str(tmp_path / "wrong")])
  err = capsys.readouterr().err
  assert rc == 2 and err.count("error:") == 1, err
  assert f"missing_file={len(names)}" in out and in_order[0] in out, out
  report = json.load(open(os.path.join(os.path.dirname(info.path), "prepare_report.json")))
  assert report["status"].startswith("failed")
  assert sorted(report["splits"]["val"]["skipped_files"]["missing_file"]) == names
  info2 = pipeline.dataset_info(data_dir, "keep")
  assert open(info2.gt_json["val"]).read() == gt_before
  assert info2.num_train_images == info.num_train_images
  assert not [p for p in os.listdir(data_dir) if p.startswith(".prepare_")]
