"""Finiteness guard (issue 12.1): loss, gradient norm and updated state checked every step;
non-finite state never saved; the error names the step, the quantity and the resume point."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from centermask_jax.checkpoints import workdir as checkpointing
from centermask_jax.training import guard as G, step as S, trainer
from test_train import FakeIterator, tiny_config


def _issue_config():
  """The issue's case at test size: AdamW, a huge LR, a checkpoint every step."""
  c = tiny_config()
  c.optim.optimizer = "adamw"
  c.optim.base_lr = 1e3
  c.optim.warmup_iters = 0
  c.train.checkpoint_every = 1
  return c


def _saved_states(workdir):
  mgr = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir), item_names=checkpointing.ITEMS)
  out = {s: mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
         for s in mgr.all_steps()}
  mgr.close()
  return out


def test_huge_lr_adamw_never_saves_nonfinite_state(tmp_path):
  wd = str(tmp_path / "w")
  with pytest.raises(trainer.NonFiniteLossError) as e:
    trainer.train_and_evaluate(_issue_config(), wd, FakeIterator(4, 1), num_steps=6,
                               async_checkpoints=False, quiet=True)
  msg = str(e.value)
  bad = int(msg.split(" at step ")[1].split()[0])
  states = _saved_states(wd)
  # every step before the bad one was saved, nothing at or after it, all of it finite
  assert sorted(states) == list(range(1, bad)), (sorted(states), msg)
  for s, st in states.items():
    for leaf in jax.tree_util.tree_leaves(st):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), s
  good = bad - 2  # newest checkpoint whose next step was finite
  assert (f"Last good checkpoint: {checkpointing.checkpoint_dir(wd)}/{good} " in msg
          if good >= 1 else "Last good checkpoint: none" in msg), msg


def test_first_nonfinite_quantity_is_named():
  m = dict(total_loss=1.0, grad_norm=1.0, nonfinite=0.0, nonfinite_params=0.0,
           nonfinite_opt_state=0.0, **{k: 0.2 for k in S.LOSS_KEYS})
  assert G.first_nonfinite(m) is None
  assert G.first_nonfinite(dict(m, grad_norm=float("inf"), nonfinite=2.0)).startswith(
      "grad_norm=inf (loss finite")
  assert "123 non-finite" in G.first_nonfinite(dict(m, nonfinite=4.0, nonfinite_opt_state=123.))
  assert "loss_mask=nan" in G.first_nonfinite(dict(m, loss_mask=float("nan"), nonfinite=1.))
  # the resume point is the newest checkpoint whose next step was finite
  assert G.resume_point(5, [1, 2, 3, 4]) == 3
  assert G.resume_point(2, [1]) is None


def test_finiteness_counts_the_updated_state():
  """The in-step flags: code of the first non-finite quantity, counts in params/opt state."""
  m = dict(total_loss=np.float32(1.0), grad_norm=np.float32(2.0),
           **{k: np.float32(0.2) for k in S.LOSS_KEYS})
  params = {"a": np.ones((3,), np.float32), "b": np.ones((2, 2), np.float32)}
  opt = ({"mu": np.ones((3,), np.float32), "nu": np.array([1, np.inf, np.nan], np.float32)},
         np.int32(4))
  f = jax.jit(S.finiteness)(m, params, opt)
  assert (float(f["nonfinite"]), float(f["nonfinite_params"]),
          float(f["nonfinite_opt_state"])) == (4.0, 0.0, 2.0)
  params["b"][0, 1] = np.inf
  f = jax.jit(S.finiteness)(dict(m, grad_norm=np.float32(np.inf)), params, opt)
  assert float(f["nonfinite"]) == 2.0 and float(f["nonfinite_params"]) == 1.0


@pytest.mark.skipif(not os.environ.get("CENTERMASK_JAX_SLOW_TESTS"),
                    reason="compiles a second train step (set CENTERMASK_JAX_SLOW_TESTS=1)")
def test_skip_nonfinite_steps_counts_and_keeps_state(tmp_path):
  c = tiny_config()
  c.train.skip_nonfinite_steps = True
  out = trainer.train_and_evaluate(c, str(tmp_path / "s"), FakeIterator(4, 1, nan_at=2),
                                   num_steps=3, async_checkpoints=False, quiet=True)
  assert out["step"] == 3 and out["metrics"]["skipped_total"] == 1.0
  for leaf in jax.tree_util.tree_leaves(out["state"]):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
