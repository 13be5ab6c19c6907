"""Finiteness guard of the training loop (host side of `step.finiteness`).

Every step computes on the device which quantity first became non-finite (loss, gradient
norm, updated params, updated optimiser state). `check` is called on each step's host
metrics, in step order, before any checkpoint of that step is written: with
`train.skip_nonfinite_steps` the step (already skipped on the device) is counted, otherwise
`NonFiniteError` stops the run naming the step, the quantity and the newest checkpoint
whose state is finite and whose next step was finite.
"""
import math
from typing import Callable, Dict, List, Optional

from centermask_jax import errors
from centermask_jax.training import step as step_lib


class NonFiniteLossError(FloatingPointError, errors.RunError):
  """A step's loss, gradient norm or updated state became NaN/inf; the message names the
  step, the first non-finite quantity and the checkpoint to resume from."""


def first_nonfinite(m: Dict[str, float]) -> Optional[str]:
  """Description of the first non-finite quantity of one step's host metrics (None: all
  finite)."""
  code = int(m.get("nonfinite", 0))
  if not code and math.isfinite(m.get("total_loss", 0.0)):
    return None
  if code <= 1:
    bad = [f"{k}={m[k]:.4g}" for k in ("total_loss",) + step_lib.LOSS_KEYS
           if k in m and not math.isfinite(m[k])]
    return "loss (" + ", ".join(bad) + ")"
  if code == 2:
    return f"grad_norm={m['grad_norm']:.4g} (loss finite: {m['total_loss']:.4g})"
  if code == 3:
    return (f"updated params ({int(m['nonfinite_params'])} non-finite values; loss and "
            "grad_norm finite)")
  return (f"updated optimizer state ({int(m['nonfinite_opt_state'])} non-finite values; "
          "loss, grad_norm and params finite)")


def resume_point(bad_step: int, checkpoint_steps: List[int]) -> Optional[int]:
  """Newest checkpoint c whose state is finite and whose next step c+1 was finite: every
  saved state passed the guard, and every step before `bad_step` was finite, so c + 1 <
  bad_step."""
  ok = [c for c in checkpoint_steps if c + 1 < bad_step]
  return max(ok) if ok else None


class Guard:
  """check(step, host metrics) per step; `skipped` counts skipped non-finite steps."""

  def __init__(self, skip: bool, checkpoint_steps: Callable[[], List[int]],
               checkpoint_dir: str):
    self.skip, self.checkpoint_steps, self.checkpoint_dir = skip, checkpoint_steps, checkpoint_dir
    self.skipped = 0

  def check(self, step: int, m: Dict[str, float]) -> bool:
    """True if the step is finite; False if it was skipped; raises otherwise."""
    what = first_nonfinite(m)
    if what is None:
      return True
    if self.skip and "skipped" in m:
      self.skipped += 1
      return False
    good = resume_point(step, list(self.checkpoint_steps()))
    raise NonFiniteLossError(
        f"non-finite {what} at step {step} : training stopped, nothing after step "
        f"{step - 1} saved. Last good checkpoint: "
        + (f"{self.checkpoint_dir}/{good} (finite state, finite next step)" if good is not None
           else "none (no checkpoint with a finite state whose next step was finite)")
        + ". Lower optim.base_lr, check the data, or set train.skip_nonfinite_steps=True.")
