"""The classes a checkpoint predicts, stored with it, and the model/dataset check.

Every checkpoint carries `ClassInfo` (count, names, category ids, where they came from):
  model checkpoint dir   DIR/classes.json (tools/import_weights, io.save_variables)
  train.py workdir       the `meta` item of every step (written by the trainer)
  official .pth/.pkl     none in the file: an 80-class one is taken as COCO (centermask2's
                         published checkpoints are COCO-trained), otherwise names unknown.
`check_against_dataset` refuses a model/dataset mismatch with one line, unless asked to map
classes by name (`map_by_name`).
"""
import dataclasses
import json
import os
from typing import Dict, List, Optional

from centermask_jax import errors
from centermask_jax.data.categories import COCO_CATEGORIES

CLASSES_FILE = "classes.json"

class ClassMismatchError(ValueError, errors.UserError):
  """Model and dataset classes differ; the message is one line saying how."""


@dataclasses.dataclass
class ClassInfo:
  """num_classes; names / category_ids indexed by contiguous label (None = unknown)."""
  num_classes: int
  names: Optional[List[str]] = None
  category_ids: Optional[List[int]] = None
  source: str = ""

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "ClassInfo":
    return cls(int(d["num_classes"]), d.get("names"), d.get("category_ids"),
               d.get("source", ""))

  def label_names(self) -> List[str]:
    """Display names (class indices where unknown)."""
    return list(self.names) if self.names else [str(i) for i in range(self.num_classes)]


def coco() -> ClassInfo:
  return ClassInfo(len(COCO_CATEGORIES), [n for _, n in COCO_CATEGORIES],
                   [c for c, _ in COCO_CATEGORIES], "COCO")


def from_dataset(info) -> ClassInfo:
  """From a `data.pipeline.DatasetInfo`."""
  return ClassInfo(int(info.num_classes), list(info.class_names),
                   [int(c) for c in info.label_to_category_id], f"dataset {info.name}")


def for_official(num_classes: int) -> ClassInfo:
  """Classes of an official centermask2 checkpoint (no class list in the file)."""
  if num_classes == len(COCO_CATEGORIES):
    info = coco()
    info.source = "COCO (official 80-class checkpoint)"
    return info
  return ClassInfo(int(num_classes), source="official checkpoint (names unknown)")


def write(directory: str, info: ClassInfo):
  with open(os.path.join(directory, CLASSES_FILE), "w") as f:
    json.dump(info.to_json(), f, indent=1)


def read(path: str) -> Optional[ClassInfo]:
  """ClassInfo stored with the checkpoint at `path` (a model checkpoint dir, a train.py
  workdir or an official .pth/.pkl file), or None when it carries none."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return None
  direct = os.path.join(path, CLASSES_FILE)
  if os.path.isfile(direct):
    with open(direct) as f:
      return ClassInfo.from_json(json.load(f))
  from centermask_jax.checkpoints import workdir  # a train.py workdir
  meta = workdir.read_latest_meta(path)
  if meta and meta.get("classes"):
    return ClassInfo.from_json(meta["classes"])
  return None


def of_checkpoint(path: str, num_classes: int) -> ClassInfo:
  """The classes stored with the checkpoint at `path`; for an official file (or a
  checkpoint written before classes were stored) `for_official(num_classes)`."""
  info = read(path)
  if info is not None:
    return info
  info = for_official(num_classes)
  if not os.path.isfile(os.path.expanduser(path)):
    info.source = "checkpoint without stored classes"
    if info.names:
      info.names = info.category_ids = None
  return info


def describe(info: ClassInfo, limit: int = 4) -> str:
  """'5 classes (circle, square, ...)'."""
  s = f"{info.num_classes} classes"
  if info.names:
    s += " (" + ", ".join(info.names[:limit]) + (", ..." if info.num_classes > limit else "") + ")"
  return s


def check_against_dataset(model: ClassInfo, dataset: ClassInfo, *, map_by_name: bool = False,
                          what: str = "the model") -> Dict[int, int]:
  """Model label -> dataset category id for evaluation, or ClassMismatchError (one line).

  Equal counts and equal (or unknown) names: the identity. Otherwise refused, unless
  map_by_name: model classes are matched to dataset classes by name (the model's
  classes absent from the dataset are dropped; at least one must match).
  """
  same_names = model.names is None or list(model.names) == list(dataset.names or [])
  if model.num_classes == dataset.num_classes and same_names and not map_by_name:
    return {i: int(c) for i, c in enumerate(dataset.category_ids)}
  if not map_by_name:
    why = ("class names differ" if model.num_classes == dataset.num_classes
           else "class counts differ")
    raise ClassMismatchError(
        f"{what} predicts {describe(model)} but {dataset.source} has {describe(dataset)} "
        f"({why}); use a checkpoint trained on this dataset, or pass --class_map=by_name to "
        "evaluate the classes whose names match")
  if not model.names:
    raise ClassMismatchError(f"--class_map=by_name: {what} carries no class names "
                             f"({model.source or 'unknown source'})")
  by_name = dict(zip(dataset.names, dataset.category_ids))
  mapping = {i: int(by_name[n]) for i, n in enumerate(model.names) if n in by_name}
  if not mapping:
    raise ClassMismatchError(f"--class_map=by_name: none of the {describe(model)} of {what} "
                             f"is among the {describe(dataset)} of {dataset.source}")
  return mapping



def check_checkpoint(checkpoint: str, num_classes: int, dataset: Optional[ClassInfo] = None,
                     *, map_by_name: bool = False, say=print):
  """-> (the checkpoint's ClassInfo, {model label: dataset category id} or None).

  Raises ClassMismatchError (one line) when the checkpoint's classes do not fit the
  config's `num_classes` or, given `dataset`, the dataset's classes (see
  `check_against_dataset`).
  """
  ck = of_checkpoint(checkpoint, num_classes)
  if ck.num_classes != int(num_classes):
    raise ClassMismatchError(
        f"checkpoint {checkpoint} predicts {describe(ck)} but the config says "
        f"model.num_classes = {num_classes}; pass --config.model.num_classes={ck.num_classes}")
  if dataset is None:
    return ck, None
  mapping = check_against_dataset(ck, dataset, map_by_name=map_by_name,
                                  what=f"checkpoint {checkpoint}")
  if map_by_name:
    say(f"class map by name: {len(mapping)} of the model's {ck.num_classes} classes are "
        f"evaluated on {dataset.source} ({dataset.num_classes} classes)")
  elif not ck.names:
    say(f"note: {ck.source}: class names unknown, assuming the dataset's order")
  return ck, mapping


def display_table(checkpoint: str, num_classes: int, data_dir: Optional[str] = None,
                  dataset: Optional[str] = None):
  """-> (names, category ids) indexed by contiguous label, for labelling outputs: the
  checkpoint's stored classes (COCO for an official 80-class file); with `dataset`, checked
  against that prepared dataset (ClassMismatchError on a mismatch), whose names fill in
  names the checkpoint lacks; otherwise class indices."""
  ds = None
  if dataset:
    from centermask_jax.data import pipeline
    ds = from_dataset(pipeline.dataset_info(os.path.expanduser(data_dir), dataset))
  ck, _ = check_checkpoint(checkpoint, num_classes, ds)
  if not ck.names and ds is not None:
    ck = ds
  return ck.label_names(), list(ck.category_ids or range(ck.num_classes))
