"""The train.py workdir layout and reading its latest model variables.

Layout: WORKDIR/checkpoints/<step>/{state, data, config, meta} (CheckpointManager items)
  state   {"step", "params", "frozen_bn", "opt_state"} (host numpy, unreplicated)
  data    the train iterator position ({"step": n})
  config  the run's config (informative)
  meta    {"classes": checkpoints.classes.ClassInfo json} (absent in old runs)
Writing is `training.checkpointing`'s; this module only reads (eval.py, demo.py, Predictor).
"""
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from centermask_jax.checkpoints import official

CHECKPOINTS = "checkpoints"
ITEMS = ("state", "data", "config", "meta")


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR -> absolute WORKDIR/checkpoints."""
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINTS)


def load_latest_variables(workdir: str, template):
  """{"params", "frozen_bn"} of the latest checkpoint of a train.py workdir.

  `template`: model variables (arrays or ShapeDtypeStructs) giving the expected tree.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir} is neither a model checkpoint directory nor a "
                            f"train.py workdir (no {CHECKPOINTS}/)")
  mgr = ocp.CheckpointManager(directory, item_names=ITEMS)
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  raw = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mgr.close()
  variables = {"params": raw["params"], "frozen_bn": raw.get("frozen_bn", {})}
  return official.strict_like(
      jax.tree_util.tree_map(lambda t: np.zeros(np.shape(t), t.dtype), dict(template)),
      variables, source=f"{directory}/{step}")


def _read_latest_json_item(workdir: str, item: str) -> Optional[dict]:
  """JSON item `item` of the latest checkpoint of a train.py workdir (None if absent)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return None
  mgr = ocp.CheckpointManager(directory, item_names=ITEMS)
  try:
    step = mgr.latest_step()
    if step is None or not os.path.isdir(os.path.join(directory, str(step), item)):
      return None
    restored = mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return dict(restored[item] or {})
  finally:
    mgr.close()


def read_latest_meta(workdir: str) -> Optional[dict]:
  """The `meta` item of the latest checkpoint of a train.py workdir (None if absent)."""
  return _read_latest_json_item(workdir, "meta")


def latest_step(workdir: str) -> Optional[int]:
  """Step of the latest finished checkpoint of a train.py workdir (None: none), cheaply
  (reads the directory only)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return None
  mgr = ocp.CheckpointManager(directory, item_names=ITEMS)
  try:
    return mgr.latest_step()
  finally:
    mgr.close()


def read_latest_config(workdir: str) -> Optional[dict]:
  """The `config` item (the run's config as JSON) of the latest checkpoint of a train.py
  workdir (None: no checkpoint or no config item)."""
  return _read_latest_json_item(workdir, "config")
