"""Writing and resuming training checkpoints (orbax CheckpointManager).

The workdir layout (WORKDIR/checkpoints/<step>/{state, data, config, meta}) and reading the
latest variables / meta live in `checkpoints.workdir`. state: StandardSave, the others:
JsonSave. Saves are asynchronous; the manager keeps the last `keep` checkpoints.
"""
import json
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from centermask_jax.checkpoints.workdir import ITEMS, checkpoint_dir


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
  """(step, state like `template`, data_state) of the latest checkpoint, or None.

  template: arrays or ShapeDtypeStructs (e.g. from jax.eval_shape)."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) if hasattr(x, "dtype")
      else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template)
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  state = jax.tree_util.tree_map(np.asarray, out["state"])
  return step, state, dict(out["data"] or {})

