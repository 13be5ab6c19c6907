"""tfds builder for COCO-format instance segmentation (boxes, classes, polygons / RLE).

The stock `coco/2017` tfds builder has no masks, hence this one. One builder config per
prepared dataset: `coco2017` reads the standard layout from `manual_dir`; any other config is
made from annotation JSON + image folder paths per split (`CocoInstancesConfig.splits`).

Stored per image (one TFRecord example, key = image id):
  image        raw encoded file bytes (decoded later with PIL, as detectron2 does)
  image_id     original COCO id;  file_name;  height, width (JSON values, checked at build)
  objects      per kept annotation: id, bbox (COCO xywh, original pixels, float32 view),
               category_id (original), label (contiguous: sorted category ids -> 0..C-1),
               is_crowd, area, num_parts (polygon parts, 0 for RLE), rle (compressed COCO
               RLE counts for RLE segmentations, else empty)
  poly_len     [sum of parts] vertex count of each polygon part, object-major
  poly_xy      float64 little-endian bytes of [sum of vertices, 2] polygon vertices (x, y),
               original pixels (tf.train.Example floats are float32: bytes keep JSON values exact)
  bbox_f64     float64 little-endian bytes of the [num objects, 4] boxes (exact JSON values)

Bad input: unreadable / corrupt images and images whose decoded size differs from the JSON
are skipped; annotations with a non-positive box, no polygon part of >= 3 points, an empty RLE
mask or an unknown category are dropped. Both are counted per reason (`BuildStats`).
"""
import collections
import dataclasses
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from centermask_jax import errors
from centermask_jax.data import transforms

BUILDER_NAME = "coco_instances"
VERSION = "1.0.0"

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
For the `coco2017` config place the official COCO 2017 files in `manual_dir`
(default `<data_dir>/downloads/manual/`, or pass `--coco-dir` to
`python -m centermask_jax.data.prepare`):
  annotations/instances_train2017.json
  annotations/instances_val2017.json
  train2017/*.jpg
  val2017/*.jpg
(from https://cocodataset.org/#download: 2017 Train images, 2017 Val images,
2017 Train/Val annotations).
"""

BUILDER_CONFIGS_COCO = "coco2017"
COCO2017_SPLITS = (
    ("train", "annotations/instances_train2017.json", "train2017"),
    ("val", "annotations/instances_val2017.json", "val2017"),
)


class CocoFormatError(ValueError, errors.UserError):
  """The annotation file is not a COCO instances JSON."""


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
  """splits: ((split, annotation_json, image_dir), ...); relative paths resolve in manual_dir."""
  splits: Tuple[Tuple[str, str, str], ...] = ()
  use_manual_dir: bool = False


# ---------------------------------------------------------------------------------------------
# JSON loading and validation
# ---------------------------------------------------------------------------------------------

_JSON_CACHE: Dict[str, dict] = {}


def load_coco_json(path: str) -> dict:
  """Path -> validated COCO dict (cached). Raises CocoFormatError naming the problem."""
  path = os.fspath(path)
  if path in _JSON_CACHE:
    return _JSON_CACHE[path]
  try:
    with open(path, "rb") as f:
      d = json.load(f)
  except FileNotFoundError:
    raise CocoFormatError(f"{path}: annotation file not found") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CocoFormatError(f"{path}: not valid JSON ({e})") from None
  _validate(d, path)
  _JSON_CACHE[path] = d
  return d


def _validate(d, path):
  def fail(msg):
    raise CocoFormatError(f"{path}: not a COCO instances annotation file: {msg}")
  if not isinstance(d, dict):
    fail(f"top level is a {type(d).__name__}, expected an object")
  for key in ("images", "annotations", "categories"):
    if key not in d:
      fail(f"missing top-level key {key!r}")
    if not isinstance(d[key], list):
      fail(f"{key!r} is a {type(d[key]).__name__}, expected a list")
  for i, im in enumerate(d["images"]):
    if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "height", "width")):
      fail(f"images[{i}] lacks one of 'id', 'file_name', 'height', 'width'")
  for i, c in enumerate(d["categories"]):
    if not isinstance(c, dict) or "id" not in c or "name" not in c:
      fail(f"categories[{i}] lacks 'id' or 'name'")
  for i, a in enumerate(d["annotations"]):
    if not isinstance(a, dict) or not all(k in a for k in ("image_id", "category_id", "bbox")):
      fail(f"annotations[{i}] lacks one of 'image_id', 'category_id', 'bbox'")
  if not d["categories"]:
    fail("'categories' is empty")


def categories_of(jsons: List[dict]) -> List[Tuple[int, str]]:
  """Union of the categories of several COCO dicts -> [(id, name)] sorted by id."""
  cats = {}
  for d in jsons:
    for c in d["categories"]:
      cid, name = int(c["id"]), str(c["name"])
      if cats.get(cid, name) != name:
        raise CocoFormatError(f"category id {cid} is named both {cats[cid]!r} and {name!r}")
      cats[cid] = name
  return sorted(cats.items())


# ---------------------------------------------------------------------------------------------
# Annotation cleaning
# ---------------------------------------------------------------------------------------------

def clean_annotation(a: dict, cat_to_label: Dict[int, int], h: int, w: int):
  """One COCO annotation -> (object dict, parts list) or (None, drop reason)."""
  from pycocotools import mask as mask_util
  cid = a.get("category_id")
  if cid not in cat_to_label:
    return None, "unknown_category"
  bbox = a.get("bbox")
  try:
    bbox = [float(x) for x in bbox]
  except (TypeError, ValueError):
    return None, "bad_box"
  if len(bbox) != 4 or not np.all(np.isfinite(bbox)):
    return None, "bad_box"
  if bbox[2] <= 0 or bbox[3] <= 0:
    return None, "zero_area_box"
  crowd = bool(a.get("iscrowd", 0))
  segm = a.get("segmentation")
  parts, rle = [], b""
  if isinstance(segm, list):
    for poly in segm:
      if not isinstance(poly, (list, tuple)) or len(poly) % 2 or len(poly) < 6:
        continue
      try:
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
      except (TypeError, ValueError):
        continue
      if np.all(np.isfinite(xy)):
        parts.append(xy)
    if not parts:
      return None, "polygon_under_3_points"
  elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
    try:
      rh, rw = int(segm["size"][0]), int(segm["size"][1])
      r = (mask_util.frPyObjects(segm, rh, rw) if isinstance(segm["counts"], list)
           else {"size": [rh, rw], "counts": segm["counts"]})
      if isinstance(r["counts"], str):
        r = dict(r, counts=r["counts"].encode("ascii"))
      if float(mask_util.area(r)) <= 0:
        return None, "empty_mask"
      rle = r["counts"]
    except Exception:  # malformed RLE
      return None, "bad_rle"
  else:
    return None, "missing_segmentation"
  obj = dict(
      id=int(a.get("id", -1)), bbox=np.asarray(bbox, np.float64), category_id=int(cid),
      label=cat_to_label[cid], is_crowd=crowd, area=float(a.get("area", bbox[2] * bbox[3])),
      num_parts=len(parts), rle=rle)
  return obj, parts


def _gt_annotation(a: dict, parts) -> dict:
  """The COCO record of a kept annotation as COCOeval should see it: a polygon keeps only
  the parts the builder kept (the same float64 coordinates)."""
  if not isinstance(a.get("segmentation"), list):
    return a
  return dict(a, segmentation=[np.asarray(p, np.float64).reshape(-1).tolist() for p in parts])


@dataclasses.dataclass
class BuildStats:
  images: int = 0
  instances: int = 0
  crowd: int = 0
  skipped_images: int = 0
  dropped_instances: int = 0
  train_usable_images: int = 0  # images with >= 1 kept non-crowd instance
  skip_reasons: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  drop_reasons: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  # The evaluation GT of exactly what was kept (not in to_json): the stored images' COCO
  # records and their kept annotations, polygons restricted to the kept parts.
  gt_images: List[dict] = dataclasses.field(default_factory=list, repr=False)
  gt_annotations: List[dict] = dataclasses.field(default_factory=list, repr=False)
  # What was skipped, by reason (prepare_report.json; not in to_json): image file names,
  # annotation ids.
  gt_skipped_files: Dict[str, List[str]] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(list), repr=False)
  gt_dropped_ids: Dict[str, List] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(list), repr=False)

  def line(self, split: str) -> str:
    return (f"split={split} images={self.images} instances={self.instances} crowd={self.crowd} "
            f"skipped_images={self.skipped_images} dropped_instances={self.dropped_instances}")

  def reasons(self) -> List[str]:
    return ([f"  skipped image: {k}={v}" for k, v in sorted(self.skip_reasons.items())] +
            [f"  dropped instance: {k}={v}" for k, v in sorted(self.drop_reasons.items())])

  def report(self) -> dict:
    """to_json() + every skipped image file and dropped annotation id, by reason."""
    return dict(self.to_json(), skipped_files=dict(self.gt_skipped_files),
                dropped_annotation_ids=dict(self.gt_dropped_ids))

  def named(self, n: int = 5) -> List[str]:
    """Up to n skipped files per reason, one line each."""
    return [f"  skipped files ({k}): " + ", ".join(v[:n]) + (f" ... (+{len(v) - n})"
                                                           if len(v) > n else "")
            for k, v in sorted(self.gt_skipped_files.items())]

  def to_json(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if not f.name.startswith("gt_")}
    d["skip_reasons"], d["drop_reasons"] = dict(self.skip_reasons), dict(self.drop_reasons)
    return d


def iter_examples(json_path: str, image_dir: str, cat_to_label: Dict[int, int],
                  stats: BuildStats, categories_known: bool = True):
  """Yields (image_id, example dict) for every readable image of a COCO JSON; fills stats."""
  d = load_coco_json(json_path)
  by_image = collections.defaultdict(list)
  image_ids = {im["id"] for im in d["images"]}
  for a in d["annotations"]:
    if a.get("image_id") not in image_ids:  # orphan: its image is not in "images"
      stats.dropped_instances += 1
      stats.drop_reasons["orphan_image_id"] += 1
      stats.gt_dropped_ids["orphan_image_id"].append(a.get("id"))
      continue
    by_image[a["image_id"]].append(a)
  seen = set()
  for im in d["images"]:
    iid = int(im["id"])
    anns = by_image.get(im["id"], [])
    if iid in seen:
      stats.skipped_images += 1
      stats.skip_reasons["duplicate_image_id"] += 1
      stats.gt_skipped_files["duplicate_image_id"].append(str(im.get("file_name")))
      continue
    seen.add(iid)
    path = os.path.join(image_dir, str(im["file_name"]))
    reason = None
    try:
      with open(path, "rb") as f:
        data = f.read()
      img = transforms.open_image(data)
      if (img.height, img.width) != (int(im["height"]), int(im["width"])):
        reason = "size_mismatch"
    except FileNotFoundError:
      reason = "missing_file"
    except Exception:  # PIL raises many types on corrupt / truncated files
      reason = "corrupt_image"
    if reason:
      stats.skipped_images += 1
      stats.skip_reasons[reason] += 1
      stats.gt_skipped_files[reason].append(str(im["file_name"]))
      stats.dropped_instances += len(anns)
      stats.drop_reasons["in_skipped_image"] += len(anns)
      continue
    h, w = int(im["height"]), int(im["width"])
    objs, poly_len, poly_xy = [], [], []
    for a in anns:
      obj, parts = clean_annotation(a, cat_to_label, h, w)
      if obj is None:
        stats.dropped_instances += 1
        stats.drop_reasons[parts] += 1
        stats.gt_dropped_ids[parts].append(a.get("id"))
        continue
      objs.append(obj)
      stats.gt_annotations.append(_gt_annotation(a, parts))
      poly_len.extend(len(p) for p in parts)
      poly_xy.extend(parts)
    stats.images += 1
    stats.gt_images.append(im)
    stats.instances += len(objs)
    n_crowd = sum(o["is_crowd"] for o in objs)
    stats.crowd += n_crowd
    if any((not o["is_crowd"]) and o["num_parts"] > 0 for o in objs):
      stats.train_usable_images += 1
    yield iid, dict(
        image=data, image_id=iid, file_name=str(im["file_name"]), height=h, width=w,
        objects=dict(
            id=np.asarray([o["id"] for o in objs], np.int64),
            bbox=np.asarray([o["bbox"] for o in objs], np.float32).reshape(-1, 4),
            category_id=np.asarray([o["category_id"] for o in objs], np.int64),
            label=np.asarray([o["label"] for o in objs], np.int64),
            is_crowd=np.asarray([o["is_crowd"] for o in objs], bool),
            area=np.asarray([o["area"] for o in objs], np.float32),
            num_parts=np.asarray([o["num_parts"] for o in objs], np.int32),
            rle=[o["rle"] for o in objs]),
        poly_len=np.asarray(poly_len, np.int32),
        bbox_f64=np.asarray([o["bbox"] for o in objs], "<f8").reshape(-1, 4).tobytes(),
        poly_xy=(np.concatenate(poly_xy, 0) if poly_xy else np.zeros((0, 2))).astype("<f8").tobytes())


# ---------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------

class CocoInstances(tfds.core.GeneratorBasedBuilder):
  """COCO-format instance segmentation with polygons / RLE and original ids."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      CocoInstancesConfig(name="coco2017", description="COCO 2017 instances (manual_dir)",
                          splits=COCO2017_SPLITS, use_manual_dir=True),
  ]

  def __init__(self, *args, **kwargs):
    self.build_stats: Dict[str, BuildStats] = {}
    md = kwargs.pop("manual_dir_override", None)
    if md is None and kwargs.get("data_dir"):
      md = os.path.join(os.fspath(kwargs["data_dir"]), "downloads", "manual")
    self._manual_dir_override = md
    super().__init__(*args, **kwargs)

  def _split_paths(self, manual_dir=None):
    base = self._manual_dir_override or manual_dir
    out = []
    for split, js, imgs in self.builder_config.splits:
      if self.builder_config.use_manual_dir or not os.path.isabs(js):
        if base is None:
          raise ValueError(f"config {self.builder_config.name} needs a manual_dir")
        js, imgs = os.path.join(base, js), os.path.join(base, imgs)
      out.append((split, os.fspath(js), os.fspath(imgs)))
    return out

  def categories(self) -> List[Tuple[int, str]]:
    return categories_of([load_coco_json(js) for _, js, _ in self._split_paths()])

  def _info(self) -> tfds.core.DatasetInfo:
    names = [n for _, n in self.categories()]
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.bytes_),
            "image_id": np.int64,
            "file_name": tfds.features.Text(),
            "height": np.int32,
            "width": np.int32,
            "objects": tfds.features.Sequence({
                "id": np.int64,
                "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "category_id": np.int64,
                "label": tfds.features.ClassLabel(names=names),
                "is_crowd": np.bool_,
                "area": np.float32,
                "num_parts": np.int32,
                "rle": tfds.features.Tensor(shape=(), dtype=np.bytes_),
            }),
            "poly_len": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "poly_xy": tfds.features.Tensor(shape=(), dtype=np.bytes_),
            "bbox_f64": tfds.features.Tensor(shape=(), dtype=np.bytes_),
        }),
        homepage="https://cocodataset.org",
    )

  def _split_generators(self, dl_manager):
    md = None
    if self.builder_config.use_manual_dir and self._manual_dir_override is None:
      md = dl_manager.manual_dir
    cat_to_label = {cid: i for i, (cid, _) in enumerate(self.categories())}
    return {split: self._generate_examples(split, js, imgs, cat_to_label)
            for split, js, imgs in self._split_paths(md)}

  # tfds prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
  # prepared to ..." for every build; nothing is downloaded here and `prepare` prints its own
  # start line, per-split counts and report path.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _generate_examples(self, split, json_path, image_dir, cat_to_label):
    stats = self.build_stats[split] = BuildStats()
    yield from iter_examples(json_path, image_dir, cat_to_label, stats)
