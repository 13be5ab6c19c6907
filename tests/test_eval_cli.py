"""Evaluator / eval.py / demo.py end to end on a tiny_coco val subset with a tiny random model."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from centermask_jax.checkpoints import classes
from centermask_jax.config import load_config
from centermask_jax.evaluation import evaluator as evaluator_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # eval.py / demo.py live at the repo root
  sys.path.insert(0, str(REPO))
CONFIG = str(REPO / "configs" / "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py")
# 4 landscape images + 1 portrait (two canvas groups); 5 images on 4 devices -> dummies.
SUBSET = (397133, 37777, 252219, 403385, 6818)
NAME = "tiny_sub"
SMALL = {"input.min_size_test": 128, "input.max_size_test": 160,
         "model.fcos.pre_nms_topk": 200, "model.fcos.post_nms_topk_test": 20}


def _config(**over):
  return load_config(CONFIG, {**SMALL, **over})


@pytest.fixture(scope="module")
def data(tiny_coco, tmp_path_factory):
  from centermask_jax.data import prepare
  root = tmp_path_factory.mktemp("evaldata")
  src = json.loads((tiny_coco / "annotations" / "instances_val2017.json").read_text())
  keep = set(SUBSET)
  src["images"] = [im for im in src["images"] if im["id"] in keep]
  src["annotations"] = [a for a in src["annotations"] if a["image_id"] in keep]
  js = root / "val.json"
  js.write_text(json.dumps(src))
  prepare.build_dataset(NAME, [("val", str(js), str(tiny_coco / "val2017"))],
                        str(root / "tfds"), quiet=True)
  return root / "tfds"


@pytest.fixture(scope="module")
def variables():
  from centermask_jax.models.centermask import CenterMask
  from centermask_jax.training import trainer
  # the trainer's init: one compiled program (the eager one compiles each layer's ops one
  # by one, ~2x the CPU)
  return trainer.random_variables(CenterMask(_config()), jax.random.PRNGKey(0))


def _results(d):
  return (json.loads((d / "bbox_results.json").read_text()),
          json.loads((d / "segm_results.json").read_text()))


@pytest.fixture(scope="module")
def four_dev(data, variables, tmp_path_factory):
  """Random model (class threshold lowered so it detects) on 4 devices, per-device batch 1."""
  out = tmp_path_factory.mktemp("eval4")
  cfg = _config(**{"model.fcos.inference_th": 0.005})
  metrics = evaluator_lib.run_evaluation(cfg, variables, str(data), NAME, str(out),
                                         progress=False, verbose=False)
  return out, metrics


def test_eval_writes_loadable_results_each_image_once(four_dev, data):
  out, metrics = four_dev
  bbox, segm = _results(out)
  assert len(bbox) == len(segm) > 0
  per_image = {}
  for r in bbox:
    per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
  assert set(per_image) <= set(SUBSET)
  assert max(per_image.values()) <= 20  # post_nms_topk_test
  from centermask_jax.data import pipeline
  info = pipeline.dataset_info(str(data), NAME)
  gt = COCO(info.gt_json["val"])
  assert sorted(gt.getImgIds()) == sorted(SUBSET)
  coco_ids = set(gt.getCatIds())
  assert {r["category_id"] for r in bbox} <= coco_ids
  # masks at original size, string counts, loadable; segm score = mask score.
  dt = gt.loadRes(segm)
  assert len(dt.getAnnIds()) == len(segm)
  for r in segm[:20]:
    im = gt.imgs[r["image_id"]]
    assert r["segmentation"]["size"] == [im["height"], im["width"]]
    assert isinstance(r["segmentation"]["counts"], str)
  gt.loadRes(bbox)
  saved = json.loads((out / "metrics.json").read_text())
  assert set(saved) == {"bbox", "segm"}
  for t in ("bbox", "segm"):
    assert 0.0 <= metrics[t]["AP"] < 5.0  # random weights
    assert saved[t]["AP"] == pytest.approx(metrics[t]["AP"])


def test_two_devices_equal_four(four_dev, data, variables, tmp_path):
  """The same images on 2 devices (landscape group: 2 full batches; portrait: 1 image and 1
  dummy) as on 4 (1 batch; 1 image and 3 dummies): every result is identical, scores,
  boxes and mask RLEs bit for bit (the per-device programs are the same). Not 1 device:
  XLA compiles a 1-device program without its SPMD partitioner passes, which rewrite some
  arithmetic (divides) differently, and this random model's MaskIoU head turns those 1-ulp
  differences into up to 1.1e-4 relative in a mask score (seen on an AMD EPYC host)."""
  cfg = _config(**{"model.fcos.inference_th": 0.005})
  metrics = evaluator_lib.run_evaluation(cfg, variables, str(data), NAME, str(tmp_path),
                                         devices=jax.local_devices()[:2], progress=False,
                                         verbose=False)
  key = lambda r: (r["image_id"], -r["score"], r["category_id"], r.get("bbox"))
  for a, b in zip(_results(four_dev[0]), _results(tmp_path)):
    assert len(a) == len(b) > 0
    assert sorted(a, key=key) == sorted(b, key=key)
  np.testing.assert_equal(metrics, four_dev[1])  # NaN where COCOeval has no GT of an area


@pytest.fixture(scope="module")
def checkpoint(variables, tmp_path_factory):
  from centermask_jax.checkpoints import io
  path = tmp_path_factory.mktemp("ckpt") / "model"
  io.save_variables(str(path), variables, _config(), classes=classes.coco())
  return path


def _with_classes(checkpoint, tmp_path, info):
  """A copy of `checkpoint` whose stored classes are `info`."""
  import shutil
  path = tmp_path / "relabelled"
  shutil.copytree(checkpoint, path)
  classes.write(str(path), info)
  return path


def _small_flags(**over):
  return [f"--config.{k}={v!r}" for k, v in {**SMALL, **over}.items()]


def test_eval_cli_zero_detections_give_ap_zero(data, variables, tmp_path, capsys):
  """eval.py on a model that detects nothing (its class logits' bias at -1e4: every class
  probability 0, under the 0.005 threshold): empty results, AP 0. The flags of `four_dev`:
  its programs, from the run's compilation cache."""
  import eval as eval_cli
  from centermask_jax.checkpoints import io

  def silence(path, x):
    key = jax.tree_util.keystr(path)
    return np.full_like(x, -1e4) if "cls_logits" in key and key.endswith("['bias']") else x
  silent = jax.tree_util.tree_map_with_path(silence, variables)
  ckpt = tmp_path / "silent"
  io.save_variables(str(ckpt), silent, _config(), classes=classes.coco())
  out = tmp_path / "ev"
  rc = eval_cli.main(["--config", CONFIG, "--checkpoint", str(ckpt), "--workdir",
                      str(out), "--data_dir", str(data), "--dataset", NAME, "--no_progress"]
                     + _small_flags(**{"model.fcos.inference_th": 0.005}))
  assert rc == 0
  assert _results(out) == ([], [])
  saved = json.loads((out / "metrics.json").read_text())
  for t in ("bbox", "segm"):
    assert saved[t]["AP"] == 0.0 and saved[t]["AP50"] == 0.0 and saved[t]["APl"] == 0.0
  printed = capsys.readouterr().out
  assert "Evaluated 5 images" in printed
  assert "Evaluation results for segm" in printed and "Per-category segm AP" in printed


def test_eval_and_demo_refuse_a_model_dataset_class_mismatch(data, tiny_coco, checkpoint,
                                                             tmp_path, capsys):
  """A 5-class model on the 80-class dataset: one `error:` line naming both, exit 2, before
  any model is built; demo.py the same when given the dataset."""
  import demo
  import eval as eval_cli
  five = classes.ClassInfo(5, ["circle", "square", "triangle", "star", "ring"],
                           [1, 2, 3, 4, 5], "dataset synthetic")
  path = _with_classes(checkpoint, tmp_path, five)
  rc = eval_cli.main(["--config", CONFIG, "--checkpoint", str(path), "--workdir",
                      str(tmp_path / "ev"), "--data_dir", str(data), "--dataset", NAME,
                      "--config.model.num_classes=5"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert err.startswith("error: checkpoint") and "predicts 5 classes (circle, square" in err
  assert f"dataset {NAME} has 80 classes (person, bicycle" in err
  assert not (tmp_path / "ev").exists()
  rc = eval_cli.main(["--config", CONFIG, "--checkpoint", str(path), "--workdir",
                      str(tmp_path / "ev"), "--data_dir", str(data), "--dataset", NAME])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "model.num_classes = 80" in err and "num_classes=5" in err
  rc = demo.main(["--config", CONFIG, "--checkpoint", str(path), "--input",
                  str(tiny_coco / "val2017" / "000000037777.jpg"), "--output",
                  str(tmp_path / "demo"), "--data_dir", str(data), "--dataset", NAME,
                  "--config.model.num_classes=5"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and "predicts 5 classes" in err


def test_eval_class_map_by_name(four_dev, data, checkpoint, tmp_path, capsys):
  """Same weights, class names stored in reverse COCO order: refused as is; with
  --class_map=by_name every detection of label l is reported as the COCO category named
  reversed[l] (compared with the unmapped evaluation of the same weights)."""
  import eval as eval_cli
  coco = classes.coco()
  rev = classes.ClassInfo(80, coco.names[::-1], coco.category_ids[::-1], "reversed")
  path = _with_classes(checkpoint, tmp_path, rev)
  args = ["--config", CONFIG, "--checkpoint", str(path), "--workdir", str(tmp_path / "ev"),
          "--data_dir", str(data), "--dataset", NAME, "--no_progress"] + _small_flags(
              **{"model.fcos.inference_th": 0.005})
  assert eval_cli.main(args) == 2
  assert "class names differ" in capsys.readouterr().err
  assert eval_cli.main(args + ["--class_map=by_name"]) == 0
  assert "class map by name: 80 of the model's 80 classes" in capsys.readouterr().out
  label_of = {c: i for i, c in enumerate(coco.category_ids)}
  key = lambda r: (r["image_id"], -r["score"], r["bbox"][0])
  ref = sorted(_results(four_dev[0])[0], key=key)
  got = sorted(_results(tmp_path / "ev")[0], key=key)
  assert len(ref) == len(got) > 0
  for a, b in zip(ref, got):
    assert b["category_id"] == coco.category_ids[79 - label_of[a["category_id"]]]
    assert b["score"] == pytest.approx(a["score"], rel=1e-4, abs=1e-6)


def test_demo_writes_png_of_image_size_and_json(tiny_coco, checkpoint, tmp_path):
  import demo
  img = tiny_coco / "val2017" / "000000037777.jpg"  # 352 x 230
  out = tmp_path / "demo"
  rc = demo.main(["--config", CONFIG, "--checkpoint", str(checkpoint), "--input", str(img),
                  "--output", str(out), "--score-thresh", "0.0"]
                 + _small_flags(**{"model.fcos.inference_th": 0.005}))
  assert rc == 0
  png = Image.open(out / "000000037777.png")
  assert png.size == (352, 230) and png.mode == "RGB"
  pred = json.loads((out / "000000037777.json").read_text())
  assert (pred["height"], pred["width"]) == (230, 352)
  assert 0 < len(pred["instances"]) <= 20
  from centermask_jax.ops.masks import decode_masks
  m = decode_masks([pred["instances"][0]["segmentation"]])
  assert m.shape == (1, 230, 352)
  names = dict(demo.COCO_CATEGORIES)
  for inst in pred["instances"]:
    assert names[inst["category_id"]] == inst["category_name"]
    x0, y0, x1, y1 = inst["bbox_xyxy"]
    assert 0 <= x0 <= x1 <= 352 and 0 <= y0 <= y1 <= 230
  # overlay differs from the image where something was drawn
  orig = np.asarray(Image.open(img).convert("RGB"))
  assert np.any(np.asarray(png) != orig)


def test_oracle_predictions_score_bbox_ap_100(data, tmp_path, monkeypatch):
  """A fake model returning the batch's GT boxes/classes through the whole evaluator path
  (pmap, postprocess to original pixels, paste, RLE, category-id mapping) scores box AP 100;
  its box-shaped masks score a lower, non-zero mask AP."""
  k, c = 20, 80

  def oracle(variables, inputs):
    boxes = inputs["gt_boxes"][:, :k]
    b = boxes.shape[0]
    return {"boxes": boxes,
            "scores": jnp.broadcast_to(1.0 - 0.01 * jnp.arange(k, dtype=jnp.float32), (b, k)),
            "classes": inputs["gt_classes"][:, :k], "valid": inputs["gt_valid"][:, :k],
            "mask_probs": jnp.ones((b, k, 28, 28), jnp.float32),
            "maskiou": jnp.ones((b, k, c), jnp.float32)}

  ev = evaluator_lib.Evaluator(_config(), predict_fn=oracle,
                               extra_keys=("gt_boxes", "gt_classes", "gt_valid"))
  from centermask_jax import host_memory
  trims = []
  monkeypatch.setattr(host_memory, "release_host_memory", lambda: trims.append(1) or True)
  metrics = evaluator_lib.run_evaluation(_config(), {}, str(data), NAME, str(tmp_path),
                                         evaluator=ev, progress=False, verbose=False)
  # the heap freed by compiling goes back to the OS once per compiled (batch, canvas)
  assert 1 <= len(trims) == len(ev._compiled), (trims, ev._compiled)
  assert metrics["bbox"]["AP"] == pytest.approx(100.0)
  assert metrics["bbox"]["AP75"] == pytest.approx(100.0)
  assert 5.0 < metrics["segm"]["AP"] < 90.0
  bbox, segm = _results(tmp_path)
  from centermask_jax.data import pipeline
  gt = COCO(pipeline.dataset_info(str(data), NAME).gt_json["val"])
  non_crowd = [a for a in gt.dataset["annotations"] if not a["iscrowd"]]
  assert len(bbox) == len(segm) == len(non_crowd)  # every non-crowd GT once, nothing else
  assert sorted((r["image_id"], r["category_id"]) for r in bbox) == sorted(
      (a["image_id"], a["category_id"]) for a in non_crowd)


def test_eval_checks_workdir_before_inference(tmp_path, capsys, monkeypatch):
  """Issue 12.2: an unwritable --workdir is refused with one line before any model,
  checkpoint or data is touched (it was found only after the whole inference pass)."""
  import eval as eval_cli
  from centermask_jax.models import centermask as cm
  monkeypatch.setattr(cm.CenterMask, "__init__", lambda *a, **k: pytest.fail("model built"))
  blocker = tmp_path / "file"
  blocker.write_text("x")
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  import os
  cases = [str(blocker / "out")] + ([] if os.access(str(ro), os.W_OK) else [str(ro)])
  for wd in cases:
    rc = eval_cli.main(["--config", CONFIG, "--checkpoint", str(tmp_path / "none.pth"),
                        "--workdir", wd])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and f"--workdir {wd}:" in err, err
