"""Training checkpoints of a train.py workdir (orbax CheckpointManager).

Layout: WORKDIR/checkpoints/<step>/{state, data, config, meta}
  state   StandardSave: {"step", "params", "frozen_bn", "opt_state"} (host numpy, unreplicated)
  data    JsonSave: the train iterator position ({"step": n})
  config  JsonSave: the run's config (informative)
  meta    JsonSave: {"classes": checkpoints.classes.ClassInfo json} (absent in old runs)
Saves are asynchronous; the manager keeps the last `keep` checkpoints.
"""
import json
import os
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
ITEMS = ("state", "data", "config", "meta")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINTS)


def make_manager(workdir: str, keep: int = 3, save_every: Optional[int] = None,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager for WORKDIR/checkpoints (saves are gated by the caller)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(keep) if keep else None, create=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=ITEMS)


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict, config,
         force: bool = True, meta: Optional[dict] = None) -> bool:
  """Queues an async save of unreplicated `state` at `step` (+ `meta`, e.g. the classes)."""
  cfg = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
      else dict(config or {})
  return manager.save(int(step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(_host(state)),
      data=ocp.args.JsonSave(dict(data_state)),
      config=ocp.args.JsonSave(cfg), meta=ocp.args.JsonSave(dict(meta or {}))), force=force)


def restore_latest(manager: ocp.CheckpointManager, template) -> Optional[Tuple[int, Any, dict]]:
  """(step, state like `template`, data_state) of the latest checkpoint, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), _host(template))
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  state = jax.tree_util.tree_map(np.asarray, out["state"])
  return step, state, dict(out["data"] or {})


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
  from centermask_jax.checkpoints import io as ckpt_io
  return ckpt_io._strict_like(
      jax.tree_util.tree_map(lambda t: np.zeros(np.shape(t), t.dtype), dict(template)),
      variables, source=f"{directory}/{step}")


def read_latest_meta(workdir: str) -> Optional[dict]:
  """The `meta` item of the latest checkpoint of a train.py workdir (None if absent)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return None
  mgr = ocp.CheckpointManager(directory, item_names=ITEMS)
  try:
    step = mgr.latest_step()
    if step is None or not os.path.isdir(os.path.join(directory, str(step), "meta")):
      return None
    return dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                or {})
  finally:
    mgr.close()
