"""Import an official centermask2 .pth / detectron2 .pkl checkpoint into a model checkpoint dir.

  python -m centermask_jax.tools.import_weights --config configs/NAME.py --weights FILE --out DIR

Strict: every missing / unexpected key and shape mismatch is reported by name.
The output directory is what eval.py --checkpoint, demo.py and Predictor load; it stores
the classes (COCO for centermask2's 80-class checkpoints, otherwise the count only).
"""
import argparse
import sys

import jax
import numpy as np

from centermask_jax.checkpoints import classes, io, official
from centermask_jax.config import add_config_argument, parse_command_line
from centermask_jax.models.centermask import CenterMask, count_values


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(ap)
  ap.add_argument("--weights", required=True, help=".pth (centermask2) or .pkl (detectron2)")
  ap.add_argument("--out", required=True, help="new output directory")
  args, cfg = parse_command_line(ap, argv)
  model = CenterMask(cfg)
  template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0))))
  try:
    variables = official.import_checkpoint(template, args.weights)
  except (official.CheckpointMismatchError, official.CheckpointFormatError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  info = classes.for_official(int(cfg.model.num_classes))
  io.save_variables(args.out, variables, cfg, classes=info)
  print(f"imported {len(official.expected_keys(variables))} tensors "
        f"({count_values(variables):,} values) from {args.weights} -> {args.out}; classes: "
        f"{classes.describe(info)} [{info.source}]")
  return 0


if __name__ == "__main__":
  from centermask_jax import cli, runlog
  runlog.quiet_startup()
  sys.exit(cli.run(main))
