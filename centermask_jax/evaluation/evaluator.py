"""COCO evaluation of a model on a prepared dataset split (used by eval.py and train.py).

Per batch [D, B, ...] from `make_eval_iterator`:
  pmap(model.predict)                  -> detections in resized pixels (one compile per canvas)
  pmap(per-image postprocess_detections) -> original-pixel boxes, MaskIoU mask scores and
                                          masks pasted on a static per-group canvas
  host: real examples only (is_real), masks cropped to (H0, W0), encoded to RLE right away,
  so host memory holds only the encoded results. Device work of batch i+1 is dispatched
before batch i is encoded (async dispatch overlaps the two).
Multi-host: each process evaluates its shard; encoded results are all-gathered, process 0
writes the files and runs COCOeval (other processes return {}).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from centermask_jax import host_memory, parallel
from centermask_jax.evaluation import coco as coco_eval
from centermask_jax.ops import padding, postprocess

log = logging.getLogger(__name__)

MODEL_KEYS = ("image", "image_hw", "padded_hw")
OUT_KEYS = ("boxes", "scores", "classes", "valid", "mask_probs", "maskiou")
PASTE_MULTIPLE = 32


def group_paste_canvases(gt_json_path: str, multiple: int = PASTE_MULTIPLE):
  """Static paste canvases from the GT image sizes: (landscape (H, W), portrait (H, W)).

  Landscape = w > h (the data pipeline's batching groups); every image of a group fits its
  canvas. The same on every process, so pmapped shapes agree across hosts.
  """
  with open(gt_json_path) as f:
    images = json.load(f)["images"]
  out = []
  for landscape in (True, False):
    hs = [im["height"] for im in images if (im["width"] > im["height"]) == landscape] or [1]
    ws = [im["width"] for im in images if (im["width"] > im["height"]) == landscape] or [1]
    out.append((padding.round_up(max(hs), multiple), padding.round_up(max(ws), multiple)))
  return tuple(out)


class Evaluator:
  """Holds the pmapped inference / paste functions so repeated evaluations do not recompile.

  predict_fn(variables, inputs) -> dict with OUT_KEYS (per-device, leading dim B); inputs
  holds MODEL_KEYS + `extra_keys` of the batch. Default: CenterMask(config).predict.
  """

  def __init__(self, config, devices: Optional[Sequence] = None,
               predict_fn: Optional[Callable] = None, extra_keys: Sequence[str] = ()):
    self.config = config
    self.devices = list(devices) if devices is not None else jax.local_devices()
    if predict_fn is None:
      from centermask_jax.models.centermask import CenterMask
      model = CenterMask(config)

      def predict_fn(variables, inputs):
        return model.predict(variables, inputs["image"], inputs["image_hw"],
                             inputs["padded_hw"])
    self.keys = tuple(MODEL_KEYS) + tuple(extra_keys)

    def infer(variables, inputs):
      out = predict_fn(variables, inputs)
      return {k: out[k] for k in OUT_KEYS}
    self._infer = parallel.make_pmap(infer, self.devices)
    self._paste = {}
    self._compiled = set()  # (batch image shape, paste canvas) programs compiled so far
    self.threshold = float(config.model.mask_head.mask_threshold)

  def _paste_fn(self, canvas_hw):
    if canvas_hw not in self._paste:
      post = functools.partial(postprocess.postprocess_detections, canvas_hw=canvas_hw,
                               mask_threshold=self.threshold)

      def paste(out, image_hw, orig_hw):
        def one(args):  # one image at a time bounds the float paste buffer
          o, ihw, ohw = args
          r = post(o["boxes"][None], o["scores"][None], o["classes"][None], o["valid"][None],
                   o["mask_probs"][None], o["maskiou"][None], ihw[None], ohw[None])
          return jax.tree_util.tree_map(lambda x: x[0], r)
        return jax.lax.map(one, (out, image_hw, orig_hw))
      self._paste[canvas_hw] = parallel.make_pmap(paste, self.devices)
    return self._paste[canvas_hw]

  def replicate(self, variables):
    """Host tree -> per-device copies [D, ...] laid out as the pmapped functions expect."""
    return parallel.replicate(variables, self.devices, across_processes=False)

  def __call__(self, variables, data_dir: str, name: str, workdir: Optional[str] = None, *,
               split: str = "val", per_device_batch: int = 1, replicated: bool = False,
               verbose: bool = True, progress: bool = True, label_to_category_id=None,
               title: Optional[str] = None):
    """-> {"bbox": {...}, "segm": {...}} COCO metrics in percent (see `run_evaluation`)."""
    from centermask_jax.data import pipeline

    info = pipeline.dataset_info(data_dir, name)
    if split not in info.gt_json:
      raise ValueError(f"dataset {name!r} has no GT JSON for split {split!r} "
                       f"(has {sorted(info.gt_json)})")
    gt_json = info.gt_json[split]
    canvases = group_paste_canvases(gt_json)
    writer = coco_eval.ResultsWriter(info.label_to_category_id if label_to_category_id is None
                                     else label_to_category_id)
    rvars = variables if replicated else self.replicate(variables)
    d = len(self.devices)
    it = pipeline.make_eval_iterator(self.config, data_dir, name, d, per_device_batch,
                                     split=split)
    total = info.num_images.get(split)
    if jax.process_count() > 1 and total is not None:
      total = None  # this process sees only its shard
    bar = None
    if progress and jax.process_index() == 0:
      from tqdm import tqdm
      bar = tqdm(total=total, unit="img", desc=f"eval {name}/{split}", dynamic_ncols=True)
    seen: set[int] = set()
    stats = {"images": 0, "detections": 0}
    t0 = time.perf_counter()

    def consume(pending):
      batch, dev = pending
      host = jax.device_get(dev)
      real = batch["is_real"]
      for di, bi in zip(*np.nonzero(real)):
        image_id = int(batch["image_id"][di, bi])
        if image_id in seen:
          raise RuntimeError(f"image {image_id} was evaluated twice")
        seen.add(image_id)
        h0, w0 = (int(v) for v in batch["orig_hw"][di, bi])
        valid = host["valid"][di, bi]
        writer.add(image_id, host["boxes"][di, bi], host["scores"][di, bi],
                   host["classes"][di, bi], host["masks"][di, bi, :, :h0, :w0],
                   host["mask_scores"][di, bi], valid)
        stats["detections"] += int(valid.sum())
      n = int(real.sum())
      stats["images"] += n
      if bar is not None:
        bar.update(n)

    pending = None
    for batch in it:
      landscape = batch["image"].shape[3] > batch["image"].shape[2]
      if batch["image"].shape[3] == batch["image"].shape[2]:
        canvas = tuple(max(a, b) for a, b in zip(*canvases))
      else:
        canvas = canvases[0] if landscape else canvases[1]
      orig = batch["orig_hw"][batch["is_real"]]
      if orig.size and (orig[:, 0].max() > canvas[0] or orig[:, 1].max() > canvas[1]):
        canvas = (max(canvas[0], int(padding.round_up(orig[:, 0].max(), PASTE_MULTIPLE))),
                  max(canvas[1], int(padding.round_up(orig[:, 1].max(), PASTE_MULTIPLE))))
      out = self._infer(rvars, {k: batch[k] for k in self.keys})
      dev = self._paste_fn(canvas)(out, batch["image_hw"], batch["orig_hw"])
      host_memory.release_after_compile(self._compiled, (batch["image"].shape, canvas))
      small = {k: batch[k] for k in ("is_real", "image_id", "orig_hw")}
      if pending is not None:
        consume(pending)
      pending = (small, dev)
    if pending is not None:
      consume(pending)
    dt = time.perf_counter() - t0
    if bar is not None:
      bar.close()
    rate = stats["images"] / max(dt, 1e-9)
    counts = it.counts
    del it

    bbox, segm = _gather(writer.bbox_results), _gather(writer.segm_results)
    if jax.process_index() != 0:
      return {}
    writer.bbox_results, writer.segm_results = bbox, segm
    if verbose:
      print(f"Evaluated {stats['images']} images ({stats['detections']} detections on this "
            f"process) in {dt:.1f} s: {rate:.2f} images/s", flush=True)
      if any(counts.values()):
        print(f"GT over the static caps (does not affect COCOeval): {counts}")
    with open(gt_json) as f:
      gt_ids = {int(im["id"]) for im in json.load(f)["images"]}
    if jax.process_count() == 1 and seen != gt_ids:
      log.warning("evaluated %d images but the GT JSON has %d", len(seen), len(gt_ids))
    if workdir is not None:
      writer.write(workdir)
    metrics = coco_eval.evaluate(gt_json, writer, verbose=verbose)
    if verbose:
      if title:
        print(title, flush=True)
      print(coco_eval.format_table(metrics), flush=True)
    if workdir is not None:
      coco_eval.write_metrics(workdir, metrics)
    self.last_stats = dict(stats, seconds=dt, images_per_s=rate)
    return metrics


def _gather(results: list) -> list:
  """All processes' result lists concatenated in process order (identity on one process)."""
  if jax.process_count() == 1:
    return results
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(results).encode("utf-8"), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
  sizes = np.asarray(sizes).reshape(-1)
  buf = np.zeros((int(sizes.max()),), np.uint8)
  buf[:data.size] = data
  allbuf = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  out = []
  for p, n in enumerate(sizes):
    out.extend(json.loads(allbuf[p, :int(n)].tobytes().decode("utf-8")))
  return out


def run_evaluation(config, variables, data_dir: Optional[str] = None,
                   name: Optional[str] = None, workdir: Optional[str] = None, *,
                   split: str = "val", per_device_batch: int = 1, devices=None,
                   replicated: bool = False, verbose: bool = True, progress: bool = True,
                   evaluator: Optional[Evaluator] = None, label_to_category_id=None,
                   title: Optional[str] = None):
  """Evaluates `variables` on every image of `split` exactly once -> COCO metrics.

  data_dir / name default to config.data. Writes bbox_results.json, segm_results.json and
  metrics.json into `workdir` (when given), prints COCOeval summaries and detectron2-style
  tables. Returns {"bbox": {AP, AP50, AP75, APs, APm, APl, AP-<class>...}, "segm": {...}}
  ({} on processes other than 0). `replicated=True`: variables already carry a leading
  device axis (e.g. a pmapped train state); pass an `evaluator` to reuse compilations.
  label_to_category_id: {model label: dataset category id} when the model's classes are
  mapped onto the dataset's (`checkpoints.classes.check_against_dataset`); default the
  dataset's own. title: a line printed above the tables (e.g. the training step).
  """
  data_dir = os.path.expanduser(data_dir or config.data.data_dir)
  name = name or config.data.name
  ev = evaluator or Evaluator(config, devices=devices)
  return ev(variables, data_dir, name, workdir, split=split,
            per_device_batch=per_device_batch, replicated=replicated, verbose=verbose,
            progress=progress, label_to_category_id=label_to_category_id, title=title)
