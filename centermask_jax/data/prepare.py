"""Build a COCO-format dataset into tfds TFRecords.

  python -m centermask_jax.data.prepare --name NAME --train-json J --train-images D \\
      --val-json J --val-images D --data-dir DIR
  python -m centermask_jax.data.prepare --name coco2017 --coco-dir /path/to/coco --data-dir DIR
  python -m centermask_jax.data.prepare --synthetic [--name synthetic] [--seed 0] --data-dir DIR

Prints per split `split=S images=N instances=N crowd=N skipped_images=N dropped_instances=N`
followed by the reasons of every skip/drop. Training/eval then use
`--config.data.name=NAME --config.data.data_dir=DIR`.

Next to the tfds files (`DIR/coco_instances/NAME/1.0.0/`) it writes `centermask_meta.json`
(categories, build stats, source paths), `gt_<split>.json` for every split except train:
the source annotation JSON restricted to the images actually stored (for COCOeval), and
`train_index.npz` (each train record's byte offset, aspect group and size: the training
order and a resume at any step without reading the records before it; `data.train_order`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, Optional, Sequence, Tuple

from centermask_jax import errors


class _LazyModule:
  """Imports the module on first attribute access (TensorFlow stays unloaded for --help)."""

  def __init__(self, name):
    self._name, self._module = name, None

  def __getattr__(self, attr):
    if self._module is None:
      import importlib
      self._module = importlib.import_module(self._name)
    return getattr(self._module, attr)


coco_builder = _LazyModule("centermask_jax.data.coco_builder")

META_FILE = "centermask_meta.json"
SYNTHETIC_NAME = "synthetic"


class PrepareError(ValueError, errors.UserError):
  """A bad dataset name, or a build that produced no dataset (e.g. no image readable; the
  per-reason counts are printed before it)."""


def dataset_dir(data_dir: str, name: str) -> str:
  """Directory of the prepared dataset NAME (tfds layout)."""
  return os.path.join(os.path.expanduser(data_dir), coco_builder.BUILDER_NAME, name,
                      coco_builder.VERSION)


def build_dataset(name: str, splits: Sequence[Tuple[str, str, str]], data_dir: str,
                  coco_dir: Optional[str] = None, overwrite: bool = True,
                  quiet: bool = False) -> Dict[str, coco_builder.BuildStats]:
  """Builds NAME from ((split, json, image_dir), ...) into data_dir -> stats per split.

  Raises coco_builder.CocoFormatError for a non-COCO annotation file.
  """
  if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name):
    raise PrepareError(f"dataset name {name!r}: use letters, digits, '_', '-', '.'")
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  out_dir = dataset_dir(data_dir, name)
  if coco_dir is not None and name == coco_builder.BUILDER_CONFIGS_COCO:
    config = name  # the builder's own manual_dir config
    splits = [(s, os.path.join(coco_dir, j), os.path.join(coco_dir, i))
              for s, j, i in coco_builder.COCO2017_SPLITS]
  elif coco_dir is not None:
    config = coco_builder.CocoInstancesConfig(
        name=name, version=coco_builder.VERSION, splits=coco_builder.COCO2017_SPLITS,
        use_manual_dir=True, description="COCO 2017 instances")
    splits = [(s, os.path.join(coco_dir, j), os.path.join(coco_dir, i))
              for s, j, i in coco_builder.COCO2017_SPLITS]
  else:
    splits = tuple((s, os.path.abspath(j), os.path.abspath(i)) for s, j, i in splits)
    config = coco_builder.CocoInstancesConfig(
        name=name, version=coco_builder.VERSION, splits=splits,
        description=f"COCO-format instances from {', '.join(j for _, j, _ in splits)}")
  for _, js, _ in splits:  # validate every JSON first: one clear error, nothing written
    coco_builder.load_coco_json(js)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(out_dir)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # its updates would fill a redirected log; counts follow
  if not quiet:
    print(f"building dataset {name!r} ({', '.join(s for s, _, _ in splits)}) into {out_dir}")
  # Built into a temporary directory beside the dataset and swapped in only on success: a
  # failed or interrupted rebuild leaves the existing dataset as it was.
  os.makedirs(data_dir, exist_ok=True)
  tmp_root = tempfile.mkdtemp(dir=data_dir, prefix=f".prepare_{name}_")
  report_path = os.path.join(os.path.dirname(out_dir), REPORT_FILE)
  builder = None
  try:
    builder = coco_builder.CocoInstances(
        config=config, data_dir=tmp_root,
        manual_dir_override=os.path.abspath(coco_dir) if coco_dir else None)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.abspath(coco_dir) if coco_dir else None))
    stats = builder.build_stats
    tmp_out = dataset_dir(tmp_root, name)
    cats = builder.categories()
    meta = dict(name=name, categories=[[c, n] for c, n in cats], splits={}, gt_json={})
    for split, js, imgs in splits:
      meta["splits"][split] = dict(stats[split].to_json(), source_json=js, image_dir=imgs)
      if split != "train":
        fname = f"gt_{split}.json"
        write_gt_subset(js, stats_image_ids(builder, split), os.path.join(tmp_out, fname),
                        stats[split])
        meta["gt_json"][split] = fname
    with open(os.path.join(tmp_out, META_FILE), "w") as f:
      json.dump(meta, f, indent=1)
    if "train" in stats:  # byte offsets, groups, sizes: training order and resume at any step
      from centermask_jax.data import train_order
      train_order.train_index(tmp_out, train_order.record_files(tmp_out, "train"),
                              builder.info.features, quiet=True)
    _swap_in(tmp_out, out_dir)
  except BaseException as e:
    stats = dict(getattr(builder, "build_stats", None) or {})
    _report(stats, splits, report_path, quiet, failed=f"{type(e).__name__}: {e}")
    if isinstance(e, (OSError, ValueError, AssertionError)) and not isinstance(
        e, (errors.UserError, FileNotFoundError, NotADirectoryError, PermissionError)):
      # e.g. tfds' "No examples were yielded" when no image was readable, a full disk
      first = (f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.strerror
               else (str(e).splitlines() or [type(e).__name__])[0])
      raise PrepareError(f"building dataset {name!r} failed: {first}") from e
    raise
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  _report(stats, splits, report_path, quiet)
  return stats


REPORT_FILE = "prepare_report.json"


def _swap_in(new_dir: str, out_dir: str):
  """Replaces out_dir by new_dir (renames on one filesystem; the old copy removed last)."""
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  old = None
  if os.path.exists(out_dir):
    old = out_dir + f".old-{os.getpid()}"
    os.rename(out_dir, old)
  os.rename(new_dir, out_dir)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _report(stats, splits, path: str, quiet: bool, failed: Optional[str] = None,
            n: int = 5):
  """Per-split counts and reasons (+ up to n skipped files per reason) on stdout, and all
  of it (every skipped file, dropped annotation id) in `path`."""
  out = {"status": "failed: " + failed if failed else "ok", "splits": {}}
  for split, js, imgs in splits:
    if split in stats:
      out["splits"][split] = dict(stats[split].report(), source_json=js, image_dir=imgs)
      if not quiet or failed:
        print(stats[split].line(split))
        for r in stats[split].reasons() + stats[split].named(n):
          print(r)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(out, f, indent=1)
  except OSError:
    return
  if not quiet or failed:
    print(f"report: {path}" + (" (build failed; the existing dataset, if any, is unchanged)"
                               if failed else ""))


def prepare_synthetic(data_dir: str, name: str = SYNTHETIC_NAME, seed: int = 0,
                      num_train: int = 400, num_val: int = 100, quiet: bool = False):
  """Generates the built-in synthetic images under data_dir/synthetic_src/ and builds
  dataset NAME -> stats."""
  from centermask_jax.data import synthetic
  src = os.path.join(os.path.expanduser(data_dir), "synthetic_src", f"seed{seed}")
  splits = synthetic.generate(src, seed, num_train, num_val)
  return build_dataset(name, splits, data_dir, quiet=quiet)


def stats_image_ids(builder, split):
  """Ids of the images stored in a split (reads only the small fields)."""
  import tensorflow_datasets as tfds
  ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return {int(x) for x in ds.map(lambda e: e["image_id"]).as_numpy_iterator()}


def write_gt_subset(src_json: str, image_ids, dst: str, stats=None):
  """Evaluation GT: the COCO JSON with only the stored images (`image_ids`, each once) and,
  given the build `stats`, exactly the annotations the builder kept (polygons with their
  kept parts), so COCOeval never meets a record the pipeline refused."""
  d = coco_builder.load_coco_json(src_json)
  out = {k: v for k, v in d.items() if k not in ("images", "annotations")}
  images = d["images"] if stats is None else stats.gt_images
  anns = d["annotations"] if stats is None else stats.gt_annotations
  seen = set()
  out["images"] = []
  for im in images:
    if int(im["id"]) in image_ids and int(im["id"]) not in seen:
      seen.add(int(im["id"]))
      out["images"].append(im)
  out["annotations"] = [a for a in anns if int(a["image_id"]) in image_ids]
  with open(dst, "w") as f:
    json.dump(out, f)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; user errors raise (`cli.run` prints them as one line, exit 2)."""
  p = argparse.ArgumentParser(prog="python -m centermask_jax.data.prepare",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--name", default=None, help="dataset name (config.data.name)")
  p.add_argument("--data-dir", required=True, help="output root (config.data.data_dir)")
  p.add_argument("--train-json")
  p.add_argument("--train-images")
  p.add_argument("--val-json")
  p.add_argument("--val-images")
  p.add_argument("--coco-dir", help="COCO 2017 root (annotations/, train2017/, val2017/)")
  p.add_argument("--synthetic", action="store_true", help="generate + build the built-in data")
  p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
  p.add_argument("--num-train", type=int, default=None, help="synthetic train images")
  p.add_argument("--num-val", type=int, default=None, help="synthetic val images")
  a = p.parse_args(argv)
  from centermask_jax import runlog
  runlog.quiet_startup()  # before TensorFlow is imported
  if a.synthetic or a.name == SYNTHETIC_NAME and not (a.train_json or a.coco_dir):
    kw = {k: v for k, v in (("num_train", a.num_train), ("num_val", a.num_val)) if v}
    prepare_synthetic(a.data_dir, name=a.name or SYNTHETIC_NAME, seed=a.seed, **kw)
    return 0
  if not a.name:
    p.error("--name is required")
  if a.coco_dir:
    build_dataset(a.name, (), a.data_dir, coco_dir=a.coco_dir)
    return 0
  splits = []
  if a.train_json or a.train_images:
    if not (a.train_json and a.train_images):
      p.error("--train-json and --train-images go together")
    splits.append(("train", a.train_json, a.train_images))
  if a.val_json or a.val_images:
    if not (a.val_json and a.val_images):
      p.error("--val-json and --val-images go together")
    splits.append(("val", a.val_json, a.val_images))
  if not splits:
    p.error("give --train-json/--train-images and/or --val-json/--val-images, or --coco-dir")
  build_dataset(a.name, splits, a.data_dir)
  return 0


if __name__ == "__main__":
  from centermask_jax import cli
  sys.exit(cli.run(main))
