"""`train_and_evaluate(config, workdir)`: the CenterMask training loop.

Sections (logged as banners): devices, input, model + optimiser, update step,
checkpoint, loop. A rerun with the same workdir resumes from its latest checkpoint
(parameters, optimiser state, step and data position). Metrics go to TensorBoard
(WORKDIR/tb) and a tqdm bar shows progress and ETA. A non-finite loss stops the run
with the step number; the last good checkpoint is kept (nothing is saved after it).
"""
import logging
import math
import os
import time
from typing import Any, Dict, Iterator, Optional

import jax
import numpy as np

from centermask_jax import parallel
from centermask_jax.checkpoints import workdir as ckpt_workdir
from centermask_jax.models.centermask import CenterMask, count_values
from centermask_jax.training import checkpointing, optimizer as opt_lib, step as step_lib

log = logging.getLogger("centermask_jax.train")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def banner(title: str):
  line = f"==== {title} " + "=" * max(0, 66 - len(title))
  log.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)


def _say(msg: str):
  log.info(msg)
  if jax.process_index() == 0:
    print("  " + msg, flush=True)


def init_variables(model: CenterMask, config, rng):
  """Random (spec init) variables, then config.weights if set (ImageNet -> backbone only)."""
  variables = model.init(rng, (128, 128))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  path = str(config.get("weights", "") or "")
  if not path:
    _say("init: from scratch (spec initialisation)")
    return variables
  from centermask_jax.checkpoints import io as ckpt_io, official
  if os.path.isdir(path):
    _say(f"init: all variables from {path}")
    return ckpt_io.load_model_variables(path, model)
  fmt, state_dict = official.read_checkpoint(path)
  if any(k.startswith("proposal_generator.") for k in state_dict):
    _say(f"init: every part from the detector checkpoint {path} ({fmt})")
    return official.load_into(variables, state_dict, source=path)
  return load_backbone(variables, state_dict, f"{path} ({fmt})")


def load_backbone(variables, state_dict, source: str):
  """ImageNet initialisation (`official.load_backbone`): the bottom-up network's keys
  from `state_dict` matched by key suffix as detectron2 does, strictly; FrozenBN
  statistics the file lacks set as detectron2 sets them; keys the backbone does not
  have (e.g. a classifier) ignored and reported."""
  from centermask_jax.checkpoints import official
  variables, filled, extra = official.load_backbone(variables, state_dict, source)
  if extra:
    _say(f"init: ignoring {len(extra)} checkpoint key(s) the backbone does not have: "
         + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
  if filled:
    _say(f"init: {len(filled)} FrozenBN running_mean/var absent from the file: set to 0/1 "
         "(as detectron2)")
  _say(f"init: backbone.bottom_up from the ImageNet checkpoint {source}; the rest from scratch")
  return variables


def _make_iterator(config, d, b):
  from centermask_jax.data import pipeline
  data_dir = os.path.expanduser(config.data.data_dir)
  info = pipeline.dataset_info(data_dir, config.data.name)
  if info.num_classes != config.model.num_classes:
    raise ValueError(f"dataset {config.data.name!r} has {info.num_classes} classes but "
                     f"config.model.num_classes = {config.model.num_classes}")
  _say(f"dataset {info.name} at {info.path}: {info.num_train_images} usable train images, "
       f"{info.num_classes} classes")
  from centermask_jax.checkpoints import classes
  return (pipeline.make_train_iterator(config, data_dir, config.data.name,
                                       int(config.train.seed), d, b),
          classes.from_dataset(info))


def train_and_evaluate(config, workdir: str, train_iter: Optional[Iterator] = None,
                       num_steps: Optional[int] = None, async_checkpoints: bool = True,
                       quiet: bool = False, devices=None, classes=None) -> Dict[str, Any]:
  """Trains until config.optim.max_iter (or `num_steps` more steps, for tests/tools).

  train_iter: optional iterator of [D, B, ...] batches with get_state()/set_state()
  (default: the config's dataset through `data.pipeline`). devices: the local devices to
  use (default: all). classes: the `checkpoints.classes.ClassInfo` stored with every
  checkpoint (default: the dataset's; with a given train_iter, the count only).
  Returns {"step", "state" (host, unreplicated), "metrics" (last step, floats),
  "loss_history" (total loss per step of this run), "eval" ({step: COCO metrics})}.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  t = config.train
  max_iter = int(config.optim.max_iter)

  banner("devices")
  devices = list(devices or jax.local_devices())
  d = len(devices)
  pc = jax.process_count()
  global_batch = int(t.global_batch)
  if global_batch % (d * pc):
    raise ValueError(f"train.global_batch={global_batch} is not divisible by "
                     f"{d * pc} devices ({pc} processes x {d} local)")
  b = global_batch // (d * pc)
  _say(f"process {jax.process_index()}/{pc}, {d} local devices ({devices[0].platform}), "
       f"{jax.device_count()} total; per-device batch {b}, global batch {global_batch}")

  banner("input")
  if train_iter is None:
    train_iter, data_classes = _make_iterator(config, d, b)
    classes = classes or data_classes
  else:
    _say("using the given train iterator")
  if classes is None:
    from centermask_jax.checkpoints import classes as classes_lib
    classes = classes_lib.ClassInfo(int(config.model.num_classes), source="train iterator")
  meta = {"classes": classes.to_json()}

  banner("model + optimiser")
  model = CenterMask(config)
  rng = jax.random.PRNGKey(int(t.seed))
  init_rng, step_rng = jax.random.split(rng)
  variables = init_variables(model, config, init_rng)
  tx = opt_lib.make_optimizer(config, variables["params"])
  lr_fn = opt_lib.lr_schedule(config)
  _say(f"{config.get('name', '')}: backbone {config.model.backbone.variant}, "
       f"{count_values(variables) / 1e6:.2f} M values, {config.model.num_classes} classes")
  opt_name = {"sgd": "SGD momentum", "adamw": "AdamW b1"}[str(config.optim.optimizer).lower()]
  _say(f"{opt_name} {config.optim.momentum}, wd {config.optim.weight_decay}, "
       f"lr {opt_lib.scaled_base_lr(config):g} (= {config.optim.base_lr:g} x {global_batch}/"
       f"{config.optim.ims_per_batch}), warmup {config.optim.warmup_iters}, steps "
       f"{tuple(config.optim.steps)}, max_iter {max_iter}, bf16 {bool(t.bf16)}")
  frozen = opt_lib.frozen_prefixes(config)
  if frozen:
    _say(f"frozen parameters: {frozen}")
  state = step_lib.init_state(variables["params"], variables["frozen_bn"], tx)

  banner("checkpoint")
  mgr = checkpointing.make_manager(workdir, keep=int(t.keep_checkpoints),
                                   async_save=async_checkpoints)
  restored = checkpointing.restore_latest(mgr, state)
  if restored is not None:
    start, state, data_state = restored
    train_iter.set_state(data_state)
    _say(f"resumed from {ckpt_workdir.checkpoint_dir(workdir)}/{start} "
         f"(data position {data_state})")
  else:
    start = 0
    _say(f"no checkpoint in {ckpt_workdir.checkpoint_dir(workdir)}: starting at step 0")
  end = max_iter if num_steps is None else min(max_iter, start + int(num_steps))

  banner("update step")
  p_step = step_lib.make_train_step(model, config, tx, lr_fn, devices=devices)
  rstate = parallel.replicate(state, devices)
  del state
  _say(f"pmapped over {d} devices, axis 'batch', state donated")

  banner("loop")
  writer = None
  if jax.process_index() == 0:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tb"))
  bar = None
  if jax.process_index() == 0 and not quiet:
    from tqdm import tqdm
    bar = tqdm(total=end, initial=start, desc="train", dynamic_ncols=True, smoothing=0.1)
  last = {}
  history = []  # total loss of every step of this run
  every = int(t.checkpoint_every)
  log_every = max(1, int(t.log_every))
  eval_every = int(t.get("eval_every", 0) or 0)
  t_last, n_last = time.time(), 0
  evaluation = _EvalHook(config, workdir, devices, writer)
  step = start
  try:
    while step < end:
      batch = next(train_iter)
      rstate, metrics = p_step(rstate, batch, step_rng)
      metrics = parallel.first_device_metrics(metrics)
      step += 1
      if not math.isfinite(metrics["total_loss"]):
        mgr.wait_until_finished()
        good = mgr.latest_step()
        raise NonFiniteLossError(
            f"non-finite total loss {metrics['total_loss']} at step {step} (losses: "
            + ", ".join(f"{k}={metrics[k]:.4g}" for k in step_lib.LOSS_KEYS)
            + "); training stopped. Last good checkpoint: "
            + (f"{ckpt_workdir.checkpoint_dir(workdir)}/{good}" if good is not None
               else "none") + ". Lower optim.base_lr or check the data.")
      last = metrics
      history.append(metrics["total_loss"])
      n_last += 1
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['total_loss']:.3f}", lr=f"{metrics['lr']:.2e}")
      if step % log_every == 0 or step == end:
        dt = (time.time() - t_last) / max(n_last, 1)
        if writer is not None:
          for k, v in metrics.items():
            writer.add_scalar(f"train/{k}", v, step)
          writer.add_scalar("train/step_time_s", dt, step)
          writer.add_scalar("train/images_per_s", global_batch / max(dt, 1e-9), step)
          writer.flush()
        log.info("step %d: %s", step, {k: round(v, 5) for k, v in metrics.items()})
        t_last, n_last = time.time(), 0
      if (every and step % every == 0) or step == end:
        checkpointing.save(mgr, step, parallel.unreplicate(rstate), train_iter.get_state(),
                           config, meta=meta)
      if eval_every >= 0 and ((eval_every and step % eval_every == 0) or step == max_iter):
        evaluation.run(step, rstate)
  finally:
    mgr.wait_until_finished()
    mgr.close()
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
  host_state = jax.tree_util.tree_map(np.asarray, jax.device_get(parallel.unreplicate(rstate)))
  if jax.process_index() == 0 and last:
    print(f"  done at step {step}: total loss {last['total_loss']:.4f}; checkpoints in "
          f"{ckpt_workdir.checkpoint_dir(workdir)}", flush=True)
  return {"step": step, "state": host_state, "metrics": last, "loss_history": history,
          "eval": evaluation.results}


class _EvalHook:
  """COCO evaluation of the live (replicated) train state on config.data's val split.

  Writes WORKDIR/eval/step_<N>/{bbox,segm}_results.json + metrics.json and TensorBoard
  scalars eval/{bbox,segm}_<metric>. A failing evaluation (e.g. no val split) is reported
  and counted, never fatal to a single-process run (a multi-process run stops, since the
  processes would otherwise hang in mismatched collectives).
  """

  def __init__(self, config, workdir: str, devices, writer):
    self.config, self.workdir, self.devices, self.writer = config, workdir, devices, writer
    self.evaluator = None
    self.results: Dict[int, Any] = {}
    self.failures = 0

  def run(self, step: int, rstate):
    from centermask_jax.evaluation import evaluator as ev_lib
    banner(f"evaluation at step {step}")
    try:
      if self.evaluator is None:
        self.evaluator = ev_lib.Evaluator(self.config, devices=self.devices)
      variables = {"params": rstate["params"], "frozen_bn": rstate["frozen_bn"]}
      replicated = jax.process_count() == 1
      if not replicated:  # the train state spans all processes; evaluate a local copy
        variables = parallel.local_copy(variables)
      out_dir = os.path.join(self.workdir, "eval", f"step_{step}")
      metrics = ev_lib.run_evaluation(self.config, variables, workdir=out_dir,
                                      replicated=replicated, evaluator=self.evaluator)
    except Exception as e:  # noqa: BLE001 - evaluation must not kill a long training run
      if jax.process_count() > 1:
        # The other processes may be waiting in the evaluation's cross-process gather:
        # carrying on would desynchronise the collectives and hang the run.
        raise RuntimeError(f"evaluation at step {step} failed on process "
                           f"{jax.process_index()} ({type(e).__name__}: {e}); a multi-process "
                           "run stops here (the checkpoint of this step is saved)") from e
      self.failures += 1
      log.warning("evaluation at step %d failed: %s: %s", step, type(e).__name__, e)
      _say(f"evaluation at step {step} FAILED ({type(e).__name__}: {e}); training goes on "
           f"({self.failures} failed evaluation(s))")
      return
    self.results[step] = metrics
    if self.writer is not None and metrics:
      for task, vals in metrics.items():
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
          if k in vals:
            self.writer.add_scalar(f"eval/{task}_{k}", vals[k], step)
      self.writer.flush()
