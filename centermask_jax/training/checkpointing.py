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

from centermask_jax import errors
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



class CheckpointSaveError(RuntimeError, errors.RunError):
  """An asynchronous checkpoint save failed and its retry failed too."""


class Saver:
  """`save` through an orbax manager; `poll(step)` after every train step notices a failed
  asynchronous save at once (not at the next save, up to checkpoint_every steps later),
  retries it once synchronously from the kept host copy, and raises CheckpointSaveError
  naming the step if the retry fails too."""

  def __init__(self, manager, say=print):
    self.mgr, self.say = manager, say
    self._pending = None  # (step, args) of the save in flight

  def save(self, step: int, state, data_state: dict, config, meta: Optional[dict] = None):
    self.poll(step)
    cfg = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
        else dict(config or {})
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_host(state)), data=ocp.args.JsonSave(dict(data_state)),
        config=ocp.args.JsonSave(cfg), meta=ocp.args.JsonSave(dict(meta or {})))
    self._pending = (int(step), args)
    self.mgr.save(int(step), args=args, force=True)

  def poll(self, now: int):
    if self._pending is None:
      return
    try:
      self.mgr.check_for_errors()
    except Exception as e:  # noqa: BLE001 - any failure of the background save
      saved, args = self._pending
      self._pending = None
      self.say(f"checkpoint {saved} failed to save ({type(e).__name__}: {e}); noticed at "
               f"step {now}, retrying once")
      try:
        self.mgr.save(saved, args=args, force=True)
        self.mgr.wait_until_finished()
        self.mgr.check_for_errors()
      except Exception as e2:  # noqa: BLE001
        raise CheckpointSaveError(
            f"checkpoint {saved} could not be saved ({type(e).__name__}: {e}); the retry at "
            f"step {now} failed too ({type(e2).__name__}: {e2}). Check the disk of the "
            "workdir; the previous checkpoint is kept") from None
      self.say(f"checkpoint {saved} saved on retry")
      return
    if not self.mgr.is_saving_in_progress():
      self._pending = None
