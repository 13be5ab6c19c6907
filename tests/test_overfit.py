"""Real-data training end to end: a tiny CenterMask overfits 4 tiny_coco images through the
real train pipeline, and the trainer's evaluation hook scores them with COCOeval."""
import contextlib
import io
import json
import math
import os

import numpy as np
from pycocotools.coco import COCO

from centermask_jax.config import base_config, lite, vovnet
from centermask_jax.data import prepare
from centermask_jax.training import trainer

STEPS = 50


def four_image_subset(tiny_coco, dst):
  """The first 4 train images with 1-8 polygon non-crowd instances -> COCO JSON."""
  with open(os.path.join(tiny_coco, "annotations", "instances_train2017.json")) as f:
    d = json.load(f)
  by_image = {}
  for a in d["annotations"]:
    by_image.setdefault(a["image_id"], []).append(a)
  keep = []
  for im in d["images"]:
    anns = by_image.get(im["id"], [])
    if 1 <= len(anns) <= 8 and all(not a["iscrowd"] and isinstance(a["segmentation"], list)
                                   for a in anns):
      keep.append(im)
    if len(keep) == 4:
      break
  ids = {im["id"] for im in keep}
  sub = {"images": keep, "annotations": [a for a in d["annotations"] if a["image_id"] in ids],
         "categories": d["categories"]}
  with open(dst, "w") as f:
    json.dump(sub, f)
  return sub


def prepare_four(tiny_coco, tmp_path):
  """Builds the 4-image subset as tfds dataset "four" (train and val = the same images)
  -> (data_dir, subset JSON dict, prepare's stdout)."""
  sub = four_image_subset(str(tiny_coco), tmp_path / "four.json")
  data_dir = str(tmp_path / "tfds")
  with contextlib.redirect_stdout(io.StringIO()) as out:
    rc = prepare.main(["--name", "four", "--data-dir", data_dir,
                       "--train-json", str(tmp_path / "four.json"),
                       "--train-images", str(tiny_coco / "train2017"),
                       "--val-json", str(tmp_path / "four.json"),
                       "--val-images", str(tiny_coco / "train2017")])
  assert rc == 0, out.getvalue()
  return data_dir, sub, out.getvalue()


def overfit_config(data_dir, num_classes):
  c = base_config()
  lite(c)
  vovnet(c, "V-19-slim-dw-eSE")
  c.model.backbone.norm = "GN"
  c.model.num_classes = num_classes
  c.model.fpn_channels = 32
  c.model.mask_head.conv_dim = 32
  c.model.maskiou_head.conv_dim = 32
  c.model.fcos.pre_nms_topk = 200
  c.model.fcos.post_nms_topk_train = 16
  c.model.roi.max_fg_per_image = 24
  c.input.pixel_std = (57.375, 57.120, 58.395)
  c.input.min_size_train = (128,)
  c.input.max_size_train = 192
  c.input.min_size_test = 128
  c.input.max_size_test = 192
  c.input.canvas_train = ((128, 192), (192, 128))
  c.input.canvas_test = ((128, 192), (192, 128))
  c.input.random_flip = False
  c.data.name = "four"
  c.data.data_dir = data_dir
  c.data.max_instances = 8
  c.data.max_polygon_parts = 4
  c.data.max_polygon_vertices = 64
  c.optim.optimizer = "adamw"
  c.optim.base_lr = 0.008  # x 4/16 -> 2e-3
  c.optim.warmup_iters = 5
  c.optim.steps = ()
  c.optim.max_iter = STEPS
  c.train.global_batch = 4
  c.train.checkpoint_every = STEPS
  c.train.log_every = 10
  c.train.eval_every = 0  # evaluate once, at max_iter
  # one update program per canvas (the 16-slot bucket would double the compiles; the
  # host-picked buckets are test_fg_slots')
  c.train.fg_slot_buckets = "off"
  return c


def test_tiny_model_overfits_four_real_images_and_evaluates(tiny_coco, tmp_path, monkeypatch):
  data_dir, sub, out = prepare_four(tiny_coco, tmp_path)
  assert len(sub["images"]) == 4
  assert "split=train images=4 " in out
  c = overfit_config(data_dir, len(sub["categories"]))
  workdir = str(tmp_path / "run")
  # the process's first update step: the programs before it (init, the first batch's
  # count) are dropped; the update programs are dropped before the final evaluation
  # compiles its own
  monkeypatch.setattr(trainer, "_STEP_COMPILED_IN_PROCESS", False)
  events = []
  from centermask_jax import parallel
  from centermask_jax.evaluation import evaluator as ev_lib
  drop, evaluator = parallel.drop_compiled_programs, ev_lib.Evaluator
  monkeypatch.setattr(parallel, "drop_compiled_programs",
                      lambda: (events.append("drop"), drop())[1])
  monkeypatch.setattr(ev_lib, "Evaluator", lambda *a, **k: (events.append("evaluator"),
                                                             evaluator(*a, **k))[1])
  res = trainer.train_and_evaluate(c, workdir, async_checkpoints=False, quiet=True)
  assert events == ["drop", "drop", "evaluator"], events

  hist = res["loss_history"]
  assert res["step"] == STEPS and len(hist) == STEPS
  assert all(math.isfinite(v) for v in hist)
  assert np.mean(hist[-5:]) < 0.5 * hist[0], (hist[0], hist[-5:])

  # The evaluation hook ran at max_iter on the 4 images and wrote COCO-format results.
  assert list(res["eval"]) == [STEPS]
  metrics = res["eval"][STEPS]
  out_dir = os.path.join(workdir, "eval", f"step_{STEPS}")
  with open(os.path.join(out_dir, "metrics.json")) as f:
    saved = json.load(f)
  for task in ("bbox", "segm"):
    assert math.isfinite(metrics[task]["AP"]) and 0.0 <= metrics[task]["AP"] <= 100.0
    assert saved[task]["AP"] == metrics[task]["AP"]
  gt = COCO(str(tmp_path / "four.json"))
  dets = gt.loadRes(os.path.join(out_dir, "segm_results.json"))
  assert set(dets.getImgIds()) <= {im["id"] for im in sub["images"]}
  assert len(dets.anns) > 0
  # The checkpoint carries the dataset's classes.
  from centermask_jax.checkpoints import classes
  stored = classes.read(workdir)
  assert stored.names == [cat["name"] for cat in sorted(sub["categories"], key=lambda x: x["id"])]
  assert stored.category_ids == sorted(cat["id"] for cat in sub["categories"])
  # TensorBoard got the evaluation scalars next to the training ones.
  events = os.listdir(os.path.join(workdir, "tb"))
  assert events
