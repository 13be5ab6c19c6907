"""Evaluate a checkpoint on a prepared COCO-format dataset split with pycocotools.

  python eval.py --config configs/NAME.py --checkpoint PATH --workdir DIR \
      [--data_dir DIR] [--dataset NAME] [--split val] [--per_device_batch 1] \
      [--config.key=value ...]

PATH: a model checkpoint directory (tools/import_weights), a train.py workdir (latest
checkpoint) or an official centermask2 .pth/.pkl (imported on the fly). Inference runs on
all local devices (CENTERMASK_JAX_HOST_DEVICES=auto: one per CPU core, `host_devices`); writes
DIR/bbox_results.json, DIR/segm_results.json, DIR/metrics.json and prints the COCO tables.
--data_dir / --dataset default to config.data.data_dir / .name. The checkpoint's classes
(stored with it) must be the dataset's: a mismatch is refused with one line unless
--class_map=by_name (evaluate the classes whose names match).
"""
import argparse
import os
import sys

from centermask_jax.config import add_config_argument, parse_command_line


def writable_dir_problem(path: str):
  """None if `path` is a writable directory or can be created as one, else why not.
  Creates nothing: a refused run leaves no output directory behind."""
  import tempfile
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    try:
      with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
        pass
    except OSError as e:
      return f"not a writable directory ({e.strerror or e})"
    return None
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"not a writable directory ({parent} is not a directory)"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"not a writable directory ({parent} is not writable)"
  return None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(p)
  p.add_argument("--checkpoint", required=True, help="checkpoint dir, train workdir or .pth/.pkl")
  p.add_argument("--workdir", required=True, help="output directory")
  p.add_argument("--data_dir", "--data-dir", default=None)
  p.add_argument("--dataset", default=None, help="prepared dataset name")
  p.add_argument("--split", default="val")
  p.add_argument("--per_device_batch", "--per-device-batch", type=int, default=1)
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--class_map", choices=("none", "by_name"), default="none",
                 help="by_name: evaluate a model whose classes differ from the dataset's on "
                      "the classes whose names match (default: refuse a mismatch)")
  args, cfg = parse_command_line(p, argv)
  from centermask_jax import runlog
  runlog.quiet_startup()  # before TensorFlow / JAX are imported
  from centermask_jax import host_devices
  host_devices.configure(auto=host_devices.ENTRY_POINT_AUTO)  # before JAX is imported
  import jax

  from centermask_jax import compilation_cache
  compilation_cache.enable(cfg.get("compilation_cache_dir") or None)

  from centermask_jax.checkpoints import classes
  from centermask_jax.checkpoints.io import load_model_variables
  from centermask_jax.data import pipeline
  from centermask_jax.evaluation.evaluator import run_evaluation
  from centermask_jax.models.centermask import CenterMask

  data_dir = os.path.expanduser(args.data_dir or cfg.data.data_dir)
  name = args.dataset or cfg.data.name
  problem = writable_dir_problem(args.workdir)  # before inference, not after it
  if problem:
    print(f"error: --workdir {args.workdir}: {problem}", file=sys.stderr)
    return 2
  if not os.path.exists(args.checkpoint):
    print(f"error: checkpoint {args.checkpoint} not found", file=sys.stderr)
    return 2
  try:
    _, mapping = classes.check_checkpoint(
        args.checkpoint, int(cfg.model.num_classes),
        classes.from_dataset(pipeline.dataset_info(data_dir, name)),
        map_by_name=args.class_map == "by_name")
  except (classes.ClassMismatchError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  model = CenterMask(cfg)
  variables = load_model_variables(args.checkpoint, model)
  if jax.process_index() == 0:
    print(f"config {cfg.name}; checkpoint {args.checkpoint}; dataset {name} ({data_dir}) "
          f"split {args.split}; {jax.local_device_count()} local device(s) "
          f"x {args.per_device_batch} image(s)", flush=True)
  run_evaluation(cfg, variables, data_dir, name, args.workdir, split=args.split,
                 per_device_batch=args.per_device_batch, progress=not args.no_progress,
                 label_to_category_id=mapping)
  if jax.process_index() == 0:
    print(f"results in {os.path.abspath(args.workdir)}", flush=True)
  return 0


if __name__ == "__main__":
  from centermask_jax import cli, host_memory
  host_memory.reexec_with_hugepage_malloc()  # before any work: huge pages for XLA's buffers
  sys.exit(cli.run(main))
