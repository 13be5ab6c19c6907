"""tf.data train / eval pipelines producing the numpy batch contract (see data/README.md).

Global batching (same on every process, so every process has the same canvas at every step):
  train: step k -> the P*D*B record numbers of global batch k (`train_order`: a permutation
     of the usable records per epoch seeded by (seed, epoch), aspect-ratio grouped as
     detectron2; computed from the record index, so starting at step 10^6 costs what
     step 0 costs) -> this process's slice [p*D*B, (p+1)*D*B) -> each record read at its
     byte offset;
  eval: records in file order -> per group (0 = landscape, w > h; 1 = portrait) batches of
     P*D*B, the last one filled with copies marked is_real=False -> this process's slice;
  -> decode (PIL), resize (PIL bilinear), flip, GT padding, uint8 pixels on the canvas
     (normalised on the device by the model)
  -> [D, B, ...] numpy batches, prefetched.
Randomness (train size choice and flip) is a stateless function of (seed, global example
index), so batches are a pure function of (seed, step) and resume is exact.
"""
import dataclasses
import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from centermask_jax.data import prepare
from centermask_jax.data import train_order
from centermask_jax.data import transforms
from centermask_jax.ops import padding

_COUNT_NAMES = ("instances_over_max", "polygon_parts_over_max", "polygons_resampled",
                "instances_without_polygon")


@dataclasses.dataclass
class DatasetInfo:
  name: str
  path: str                       # tfds dataset directory
  num_classes: int
  class_names: List[str]
  label_to_category_id: List[int]  # contiguous label -> original COCO category id
  num_images: Dict[str, int]       # stored images per split (eval covers all of them)
  num_train_images: int           # train images with >= 1 usable non-crowd instance
  gt_json: Dict[str, str]         # split -> COCO GT JSON of exactly the stored images
  build_stats: Dict[str, dict]


def dataset_info(data_dir: str, name: str) -> DatasetInfo:
  """Metadata of a prepared dataset (no record is read)."""
  path = prepare.dataset_dir(data_dir, name)
  meta_path = os.path.join(path, prepare.META_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f"no prepared dataset {name!r} in {data_dir} (missing {meta_path}); build it with "
        f"`python -m centermask_jax.data.prepare --name {name} ... --data-dir {data_dir}`")
  with open(meta_path) as f:
    meta = json.load(f)
  cats = meta["categories"]
  splits = meta["splits"]
  return DatasetInfo(
      name=name, path=path, num_classes=len(cats), class_names=[n for _, n in cats],
      label_to_category_id=[int(c) for c, _ in cats],
      num_images={s: v["images"] for s, v in splits.items()},
      num_train_images=splits.get("train", {}).get("train_usable_images", 0),
      gt_json={s: os.path.join(path, f) for s, f in meta["gt_json"].items()},
      build_stats=splits)


def _features(path):
  import tensorflow_datasets as tfds
  return tfds.builder_from_directory(path).info.features


def _record_files(path, split):
  return [os.path.join(path, f) for f in train_order.record_files(path, split)]


def _get(cfg, key, default):
  try:
    v = cfg.get(key, default)
  except AttributeError:
    v = getattr(cfg, key, default)
  return default if v is None else v


def _input_params(config, train: bool) -> dict:
  inp, data = config.input, config.data
  sizes = _get(inp, "min_size_train", (800,)) if train else _get(inp, "min_size_test", 800)
  sizes = tuple(int(s) for s in (sizes if isinstance(sizes, (tuple, list)) else (sizes,)))
  max_size = int(_get(inp, "max_size_train" if train else "max_size_test", 1333))
  canvas = _get(inp, "canvas_train" if train else "canvas_test", None)  # ((Hl, Wl), (Hp, Wp))
  if canvas and (len(canvas) != 2 or any(len(c) != 2 for c in canvas)):
    raise ValueError(f"input.canvas_{'train' if train else 'test'}={tuple(canvas)}: expected "
                     "((H, W) landscape, (H, W) portrait)")
  land = transforms.canvas_hw(max(sizes), max_size, True, override=canvas and canvas[0])
  port = transforms.canvas_hw(max(sizes), max_size, False, override=canvas and canvas[1])
  div = int(_get(inp, "size_divisibility", 32))
  fmt = str(_get(inp, "format", "BGR"))
  for c in (land, port):
    if c[0] % div or c[1] % div:
      raise ValueError(f"canvas {c} is not a multiple of {div}")
  short, long_ = min(max(sizes), max_size), max_size
  if canvas and (land[0] < short or land[1] < long_ or port[0] < long_ or port[1] < short):
    raise ValueError(f"input.canvas_{'train' if train else 'test'}={tuple(canvas)} cannot hold "
                     f"every resized image (short side <= {short}, long side <= {long_}): "
                     f"need landscape >= ({short}, {long_}) and portrait >= ({long_}, {short})")
  bucket = int(_get(inp, "canvas_bucket", 0) or 0)
  if bucket < 0 or bucket % div:
    raise ValueError(f"input.canvas_bucket={bucket}: expected 0 (fixed group canvas) or a "
                     f"multiple of {div}")
  return dict(
      bucket=bucket, sizes=sizes, max_size=max_size, canvases=(land, port), divisibility=div, format=fmt,

      flip=bool(_get(inp, "random_flip", True)) and train,
      m=int(_get(data, "max_instances", 100)), p=int(_get(data, "max_polygon_parts", 16)),
      v=int(_get(data, "max_polygon_vertices", 256)),
      k=int(_get(data, "max_instance_vertices", 0)) or
      int(_get(data, "max_polygon_parts", 16)) * int(_get(data, "max_polygon_vertices", 256)))


def _host_example(data, h0, w0, bbox, label, is_crowd, num_parts, poly_len, poly_xy, short,
                  flip, canvas, prm):
  """numpy_function body: one stored example -> resized image (on `canvas`, the batch's
  (Hc, Wc)) + contract GT arrays."""
  img, orig_hw, hw = transforms.resized_image_and_hw(
      bytes(data), int(short), prm["max_size"], prm["format"])
  canvas = (int(canvas[0]), int(canvas[1]))
  if hw[0] > canvas[0] or hw[1] > canvas[1]:
    raise ValueError(f"resized image {hw} does not fit canvas {canvas}")
  if flip:
    img = img[:, ::-1]
  # Raw uint8 pixels on the zeroed canvas; the model normalises them on the device
  # (`CenterMask.normalize`), a quarter of the bytes of a float32 batch to copy.
  x = np.zeros((canvas[0], canvas[1], 3), np.uint8)
  x[:hw[0], :hw[1]] = img
  gt, counts = transforms.instance_targets(
      in_hw=(int(h0), int(w0)), out_hw=hw, flip=bool(flip), bbox=bbox, label=label,
      is_crowd=is_crowd, num_parts=num_parts, poly_len=poly_len, poly_xy=poly_xy,
      max_instances=prm["m"], max_parts=prm["p"], max_vertices=prm["v"],
      max_instance_vertices=prm["k"])
  return (x, np.asarray(hw, np.int32), np.asarray(orig_hw, np.int32), gt["gt_boxes"],
          gt["gt_classes"], gt["gt_valid"], gt["gt_polys"], gt["gt_poly_len"],
          gt["gt_poly_xy64"], gt["gt_poly_part"], gt["gt_poly_area64"], counts)


def _short_and_flip(prm, train, seed, index):
  """Train: short side and flip drawn from (seed, global example index); eval: fixed."""
  sizes = tf.constant(prm["sizes"], tf.int32)
  if not train:
    return sizes[0], tf.constant(False)
  u = tf.random.stateless_uniform([2], seed=tf.stack([tf.cast(seed, tf.int64), index]))
  short = tf.gather(sizes, tf.minimum(tf.cast(u[0] * len(prm["sizes"]), tf.int32),
                                      len(prm["sizes"]) - 1))
  return short, tf.logical_and(u[1] < 0.5, prm["flip"])


def _batch_canvas(prm, train, seed, idx, h0, w0, group):
  """The canvas of one global batch: its aspect-ratio group's static canvas, or with
  input.canvas_bucket = b > 0 the batch's largest official padded size rounded up to a
  multiple of b (detectron2 pads each batch to its largest image), capped by the group
  canvas. Resized sizes come from the stored (H0, W0) and each example's short side with
  `transforms.get_output_shape`'s float64 arithmetic, so every process agrees."""
  land, port = (tf.constant(c, tf.int32) for c in prm["canvases"])
  full = tf.where(tf.equal(group, 0), land, port)
  b = prm["bucket"]
  if not b:
    return full
  short = tf.map_fn(lambda i: _short_and_flip(prm, train, seed, i)[0], idx,
                    fn_output_signature=tf.int32)
  h, w = tf.cast(h0, tf.float64), tf.cast(w0, tf.float64)
  scale = tf.cast(short, tf.float64) / tf.minimum(h, w)
  nh, nw = h * scale, w * scale
  big = tf.maximum(nh, nw)
  s = tf.where(big > prm["max_size"], prm["max_size"] * 1.0 / big, tf.ones_like(big))
  nh, nw = tf.where(big > prm["max_size"], nh * s, nh), tf.where(big > prm["max_size"], nw * s, nw)
  hw = tf.stack([tf.floor(nh + 0.5), tf.floor(nw + 0.5)], 1)
  div = float(prm["divisibility"])
  padded = tf.reduce_max(tf.math.ceil(hw / div) * div, axis=0)
  canvas = tf.cast(tf.math.ceil(padded / b) * b, tf.int32)
  return tf.minimum(canvas, full)


def _example_fn(features, prm, train, seed):
  """(serialized, is_real, global index, batch canvas [2]) -> contract example dict
  (+ '_counts')."""
  m, p, v, k = prm["m"], prm["p"], prm["v"], prm["k"]

  def fn(serialized, is_real, index, canvas):
    ex = features.deserialize_example(serialized)
    short, flip = _short_and_flip(prm, train, seed, index)
    obj = ex["objects"]
    outs = tf.numpy_function(
        lambda *a: _host_example(*a, prm=prm),
        [ex["image"], ex["height"], ex["width"], tf.io.decode_raw(ex["bbox_f64"], tf.float64),
         obj["label"], obj["is_crowd"], obj["num_parts"], ex["poly_len"],
         tf.io.decode_raw(ex["poly_xy"], tf.float64), short, flip, canvas],
        [tf.uint8, tf.int32, tf.int32, tf.float32, tf.int32, tf.bool, tf.float32, tf.int32,
         tf.uint32, tf.int32, tf.uint32, tf.int32], stateful=False)
    img, hw, orig_hw, boxes, classes, valid, polys, plen, xy64, ppart, area64, counts = outs
    img.set_shape([None, None, 3])
    hw.set_shape([2])
    orig_hw.set_shape([2])
    div = prm["divisibility"]
    valid = tf.logical_and(tf.reshape(valid, [m]), is_real)
    return dict(
        image=img, image_hw=hw, padded_hw=padding.official_padded_hw(hw, div), orig_hw=orig_hw,
        image_id=tf.where(is_real, tf.cast(ex["image_id"], tf.int32), -1), is_real=is_real,
        gt_boxes=tf.reshape(boxes, [m, 4]), gt_classes=tf.reshape(classes, [m]),
        gt_valid=valid, gt_polys=tf.reshape(polys, [m, p, v, 2]),
        gt_poly_len=tf.reshape(plen, [m, p]), gt_poly_xy64=tf.reshape(xy64, [m, k, 2, 2]),
        gt_poly_part=tf.reshape(ppart, [m, k]), gt_poly_area64=tf.reshape(area64, [m, 2]),
        _counts=tf.where(is_real, tf.reshape(counts, [4]), 0))
  return fn


def _options():
  opt = tf.data.Options()
  opt.deterministic = True
  opt.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
  return opt


def _finish(ds, features, prm, train, seed, d, b, process_index, process_count, step0=0,
            read=None):
  """Global batches of (record, is_real, H0, W0 [PDB], group) -> local contract batches.
  record: the serialized example, or with `read` (records [n] -> serialized [n]) its number."""
  db = d * b
  ds = ds.enumerate()

  def local(step, batch):
    ser, real, h0, w0, group = batch
    first = (step + step0) * (db * process_count)
    canvas = _batch_canvas(prm, train, seed, first + tf.range(db * process_count, dtype=tf.int64),
                           h0, w0, group)
    lo = process_index * db
    idx = first + lo + tf.range(db, dtype=tf.int64)
    mine = ser[lo:lo + db]  # this process's records only are read
    return (read(mine) if read else mine, real[lo:lo + db], idx,
            tf.tile(canvas[None], [db, 1]))
  ds = ds.map(local, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
  ds = ds.map(_example_fn(features, prm, train, seed), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(db, drop_remainder=True)
  ds = ds.map(lambda x: {k: tf.reshape(t, tf.concat([[d, b], tf.shape(t)[1:]], 0))
                         for k, t in x.items()})
  return ds.prefetch(2).with_options(_options())


def build_train_dataset(config, data_dir, name, seed, num_local_devices, per_device_batch,
                        process_index=0, process_count=1, start_step=0):
  """tf.data.Dataset of train batches (dicts of [D, B, ...] tensors, plus '_counts')."""
  path = prepare.dataset_dir(data_dir, name)
  features = _features(path)
  prm = _input_params(config, train=True)
  pdb = num_local_devices * per_device_batch * process_count
  index = train_order.train_index(path, train_order.record_files(path, "train"), features)
  usable = np.nonzero(index.usable)[0]
  order = train_order.TrainOrder(index.group[usable], seed, pdb)

  def global_batch(step):
    recs, group = order.batch_records(int(step))
    rec = usable[recs]
    return rec, index.h0[rec], index.w0[rec], np.int64(group)

  def global_batch_tf(step):
    rec, h0, w0, group = tf.numpy_function(global_batch, [step],
                                           [tf.int64, tf.int32, tf.int32, tf.int64],
                                           stateful=False)
    rec.set_shape([pdb])
    h0.set_shape([pdb])
    w0.set_shape([pdb])
    group.set_shape([])
    return rec, tf.ones([pdb], tf.bool), h0, w0, group

  def read(recs):
    s = tf.numpy_function(lambda r: np.asarray([index.read(int(i)) for i in r], object),
                          [recs], tf.string, stateful=False)
    s.set_shape(recs.shape)
    return s

  ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max).map(global_batch_tf)
  ds = _finish(ds, features, prm, True, seed, num_local_devices, per_device_batch,
               process_index, process_count, step0=start_step, read=read)
  return ds, start_step


def build_eval_dataset(config, data_dir, name, num_local_devices, per_device_batch,
                       process_index=0, process_count=1, split="val"):
  """tf.data.Dataset of eval batches covering every stored image of `split` exactly once."""
  path = prepare.dataset_dir(data_dir, name)
  features = _features(path)
  prm = _input_params(config, train=False)
  pdb = num_local_devices * per_device_batch * process_count
  files = _record_files(path, split)
  parts = []
  for group in (0, 1):
    g = tf.data.TFRecordDataset(files).map(train_order.group_and_usable(features))
    g = g.filter(lambda s, k, u, h, w, group=group: tf.equal(k, group))
    g = g.map(lambda s, k, u, h, w: (s, h, w)).batch(pdb)

    def fill(s, h, w, group=group):
      n = tf.shape(s)[0]
      real = tf.range(pdb) < n
      pad = lambda a: tf.concat([a, tf.repeat(a[:1], pdb - n)], 0)
      return pad(s), real, pad(h), pad(w), tf.constant(group, tf.int64)
    parts.append(g.map(fill))
  ds = parts[0].concatenate(parts[1])
  return _finish(ds, features, prm, False, 0, num_local_devices, per_device_batch,
                 process_index, process_count)


class BatchIterator:
  """Iterator of numpy batch dicts; counts GT overflows; get_state()/set_state() for resume."""

  def __init__(self, make_ds, start_step=0, train=True):
    self._make_ds = make_ds
    self._train = train
    self.step = start_step
    self.counts = dict.fromkeys(_COUNT_NAMES, 0)
    self._warned = False
    self._reset()

  def _reset(self):
    self._it = iter(self._make_ds(self.step).as_numpy_iterator())

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    c = batch.pop("_counts").reshape(-1, 4).sum(0)
    for k, n in zip(_COUNT_NAMES, c):
      self.counts[k] += int(n)
    if c[:3].any() and not self._warned:
      self._warned = True
      logging.warning("GT exceeded the static caps (counts so far: %s); raise "
                      "config.data.max_instances / max_polygon_parts / max_polygon_vertices",
                      self.counts)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict):
    self.step = int(state["step"])
    self._reset()


def make_train_iterator(config, data_dir, name, seed, num_local_devices, per_device_batch,
                        process_index=None, process_count=None, start_step=0) -> BatchIterator:
  """Infinite train iterator of [D, B, ...] numpy batches, deterministic for (seed, step)."""
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return BatchIterator(
      lambda step: build_train_dataset(config, data_dir, name, seed, num_local_devices,
                                       per_device_batch, pi, pc, step)[0], start_step)


def make_eval_iterator(config, data_dir, name, num_local_devices, per_device_batch,
                       process_index=None, process_count=None, split="val") -> BatchIterator:
  """Finite eval iterator: every stored image once (is_real marks dummies)."""
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return BatchIterator(
      lambda step: build_eval_dataset(config, data_dir, name, num_local_devices,
                                      per_device_batch, pi, pc, split).skip(step),
      train=False)
