"""`train_and_evaluate(config, workdir)`: the CenterMask training loop.

Sections (banners): devices, input, model + optimiser (says whether it resumes), checkpoint,
update step, loop. Everything the run prints also goes to WORKDIR/log.txt; one JSON line per
log step (losses, lr, img/s, ETA) and per evaluation goes to WORKDIR/metrics.jsonl and the
same scalars to TensorBoard (WORKDIR/tb); the resolved config is WORKDIR/config.json.
The first step of each canvas compiles the update step: it is announced, timed and left out
of img/s and ETA. On a terminal a bar shows progress, loss, img/s and ETA; otherwise a line
is printed every `train.log_every` steps. A rerun with the same workdir resumes from its
latest checkpoint (parameters, optimiser state, step and data position); a finished one
says so and stops within seconds. Ctrl-C (SIGINT) stops after the current step, writes a
checkpoint of it (unless train.checkpoint_on_interrupt is False) and prints one line.
Batches are copied to the devices two steps ahead (`parallel.DevicePrefetch`) and each step's
metrics stay on the devices until a log, checkpoint, evaluation or interrupt step pulls the
pending ones in one transfer (at most two steps in flight otherwise), so the host never waits
on a step in between. The finiteness guard checks every pulled step in order before anything
of it is saved: a non-finite step stops the run naming that (first bad) step; the last good
checkpoint is kept.
"""
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterator, Optional

import jax
import numpy as np

from centermask_jax import host_memory, parallel
from centermask_jax.checkpoints import workdir as ckpt_workdir
from centermask_jax import runlog
from centermask_jax.models.centermask import CenterMask, count_values
from centermask_jax.training import checkpointing, optimizer as opt_lib, step as step_lib
from centermask_jax.training.guard import Guard, NonFiniteLossError

log = logging.getLogger("centermask_jax.train")
_RUN_LOG: Optional[runlog.RunLog] = None  # the current run's console + log.txt
# Whether this process has compiled an update step (jax's compiled programs are per process).
_STEP_COMPILED_IN_PROCESS = False


def banner(title: str):
  if _RUN_LOG is not None:
    _RUN_LOG.banner(title)
  elif jax.process_index() == 0:
    print(f"==== {title} " + "=" * max(0, 66 - len(title)), flush=True)


def _say(msg: str):
  if _RUN_LOG is not None:
    _RUN_LOG.say(msg)
  elif jax.process_index() == 0:
    print("  " + msg, flush=True)


class _StopOnSigint:
  """While active (main thread only), the first SIGINT asks the loop to stop after the
  current step; a second one raises KeyboardInterrupt as usual."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGINT, self._old)
    return False


class _Speed:
  """Step time from the steps that did not compile -> img/s and ETA."""

  def __init__(self, global_batch: int, window: int = 50):
    self.global_batch, self.window = global_batch, window
    self.times = []

  def add(self, seconds: float):
    self.times = (self.times + [seconds])[-self.window:]

  @property
  def step_time(self) -> Optional[float]:
    return sum(self.times) / len(self.times) if self.times else None

  def images_per_s(self) -> Optional[float]:
    st = self.step_time
    return self.global_batch / st if st else None

  def eta(self, steps_left: int) -> Optional[float]:
    st = self.step_time
    return steps_left * st if st else None


def _train_canvases(config):
  """Distinct (H, W) canvases of the train pipeline (None if they cannot be derived, e.g.
  with canvas buckets, where each batch gets its own)."""
  if int(config.input.get("canvas_bucket", 0) or 0):
    return None
  try:
    from centermask_jax.data import pipeline
    return sorted(set(tuple(int(v) for v in c)
                      for c in pipeline._input_params(config, True)["canvases"]))
  except Exception:  # noqa: BLE001 - only used for the "(k of N)" in a message
    return None


def random_variables(model: CenterMask, rng, canvas_hw=(128, 128)):
  """Spec-initialised variables of `model` as NumPy, traced and compiled as one program.
  Eager `model.init` compiles every layer's ops one by one and keeps those programs:
  tiny Lite model 24 s and ~1 GB of host memory held for the run, against 8 s and none
  (`parallel.compile_run_once`)."""
  init = parallel.compile_run_once(model.init, rng, tuple(canvas_hw), static_argnums=1)
  variables = jax.tree_util.tree_map(np.asarray, init(rng))
  host_memory.release_host_memory()  # the heap the compile freed
  return variables


def init_variables(model: CenterMask, config, rng):
  """Random (spec init) variables, then config.weights if set (ImageNet -> backbone only)."""
  variables = random_variables(model, rng)
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
  use (default: `parallel.train_devices`: all, or in one process the most that divide the
  global batch). classes: the `checkpoints.classes.ClassInfo` stored with every checkpoint
  (default: the dataset's; with a given train_iter, the count only).
  Returns {"step", "state" (host, unreplicated; None when the workdir was already at the
  last step), "metrics" (last step, floats), "loss_history" (total loss per step of this
  run), "eval" ({step: COCO metrics}), "interrupted" (stopped by SIGINT)}.
  """
  global _RUN_LOG
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  max_iter = int(config.optim.max_iter)
  lead = jax.process_index() == 0
  rl = runlog.RunLog(workdir, enabled=lead)
  previous, _RUN_LOG = _RUN_LOG, rl
  try:
    # A finished run stops here, before any data, model or compilation.
    latest = ckpt_workdir.latest_step(workdir)
    if latest is not None and latest >= (max_iter if num_steps is None
                                         else min(max_iter, latest + int(num_steps))):
      _say(f"already at step {latest} (optim.max_iter = {max_iter}), nothing to do; "
           f"checkpoints in {ckpt_workdir.checkpoint_dir(workdir)}")
      return {"step": latest, "state": None, "metrics": {}, "loss_history": [], "eval": {},
              "interrupted": False}
    if latest is not None:  # before config.json is rewritten
      from centermask_jax.training import config_change
      saved_config = ckpt_workdir.read_latest_config(workdir)
      if saved_config:
        for g, k, a, b in config_change.check(saved_config, config,
                                              f"{ckpt_workdir.checkpoint_dir(workdir)}/{latest}"):
          _say(f"config change allowed ({g}): {k} {a!r} -> {b!r}")
    _write_config(config, workdir, rl, lead)
    return _train(config, workdir, train_iter, num_steps, async_checkpoints, quiet, devices,
                  classes, latest, rl)
  finally:
    _RUN_LOG = previous
    rl.close()


def _write_config(config, workdir, rl, lead):
  """WORKDIR/config.json (the resolved config, every key) and the same in log.txt."""
  if not lead:
    return
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(text + "\n")
  from centermask_jax.config import format_config
  rl.to_file("resolved config:\n" + format_config(config))
  _say(f"config {config.get('name', '') or '(unnamed)'} -> {os.path.join(workdir, 'config.json')}")


def _train(config, workdir, train_iter, num_steps, async_checkpoints, quiet, devices,
           classes, latest, rl):
  t = config.train
  max_iter = int(config.optim.max_iter)
  lead = jax.process_index() == 0

  banner("devices")
  pc = jax.process_count()
  global_batch = int(t.global_batch)
  devices, note = parallel.train_devices(global_batch, devices)
  d = len(devices)
  b = global_batch // (d * pc)
  _say(f"process {jax.process_index()}/{pc}, {d} local devices ({devices[0].platform}), "
       f"{jax.device_count()} total; per-device batch {b}, global batch {global_batch}"
       + note)
  if d > 1 and devices[0].platform == "cpu" and not step_lib.mask_loss_axis(config, "x"):
    _say(f"mask losses: means over each device's {b} image(s) (train.mask_loss_norm="
         "per_device, as DDP); 'global' gives the one-device numbers")

  banner("input")
  canvases = None
  if train_iter is None:
    train_iter, data_classes = _make_iterator(config, d, b)
    classes = classes or data_classes
    canvases = _train_canvases(config)
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
  if latest is not None:
    _say(f"init: resuming from step {latest} of {ckpt_workdir.checkpoint_dir(workdir)}"
         + (" (config.weights is not used)" if config.get("weights") else ""))
    variables = jax.eval_shape(lambda: model.init(init_rng, (128, 128)))
  else:
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
  if latest is not None:
    state = jax.eval_shape(lambda p, f: step_lib.init_state(p, f, tx), variables["params"],
                           variables["frozen_bn"])
  else:
    state = step_lib.init_state(variables["params"], variables["frozen_bn"], tx)

  banner("checkpoint")
  mgr = checkpointing.make_manager(workdir, keep=int(t.keep_checkpoints),
                                   async_save=async_checkpoints)
  restored = checkpointing.restore_latest(mgr, state) if latest is not None else None
  picker = step_lib.fg_slot_picker(config)
  if restored is not None:
    start, state, data_state = restored
    data_state = dict(data_state)
    if picker is not None:
      data_state = picker.set_state(data_state)
    data_state.pop("fg_recent", None)  # saved by a run with buckets, resumed without
    train_iter.set_state(data_state)
    _say(f"restored {ckpt_workdir.checkpoint_dir(workdir)}/{start} "
         f"(data position {data_state})")
  else:
    start = 0
    _say(f"no checkpoint in {ckpt_workdir.checkpoint_dir(workdir)}: starting at step 0")
  end = max_iter if num_steps is None else min(max_iter, start + int(num_steps))

  banner("update step")
  p_steps = {}  # foreground slots per image (None: all) -> the mapped step

  def p_step_for(k):
    if k not in p_steps:
      p_steps[k] = step_lib.make_train_step(model, config, tx, lr_fn, devices=devices,
                                            fg_slots=picker.step_slots(k) if picker else None)
    return p_steps[k]
  rstate = parallel.replicate(state, devices)
  del state
  _say(f"pmapped over {d} devices, axis 'batch', state donated; compiled on the first "
       "step of each canvas" + (f" ({len(canvases)} canvases)" if canvases else "")
       + (f"; mask branch on {'/'.join(map(str, picker.buckets))} foreground slots per "
          "image, the smallest holding the recent count (train.fg_slot_buckets)"
          if picker else ""))

  banner(f"loop: steps {start + 1}..{end}")
  writer = None
  if lead:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tb"))
  bar = None
  if lead and not quiet and sys.stdout.isatty():
    from tqdm import tqdm
    bar = tqdm(total=end, initial=start, desc="train", dynamic_ncols=True,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                          "[{elapsed}{postfix}]")
  last = {}
  history = []  # total loss of every step of this run
  every = int(t.checkpoint_every)
  log_every = max(1, int(t.log_every))
  eval_every = int(t.get("eval_every", 0) or 0)
  speed = _Speed(global_batch)
  compiled = []  # (canvas, fg slots) whose update step is compiled
  executables = {}  # (canvas, fg slots) -> the update step compiled ahead of time
  evaluation = _EvalHook(config, workdir, devices, writer, rl)
  step = saved = start
  stop = _StopOnSigint()
  saver = checkpointing.Saver(mgr, _say)
  guard = Guard(bool(t.get("skip_nonfinite_steps", False)),
                lambda: (mgr.wait_until_finished(), mgr.all_steps())[1],
                ckpt_workdir.checkpoint_dir(workdir))
  if jax.process_count() == 1:  # batches copied to the devices ahead of their step
    train_iter = parallel.DevicePrefetch(train_iter, devices, size=2)
  pending = []  # (step, per-device metrics still on the devices), in step order
  window = [time.perf_counter(), 0]  # start, steps: img/s from the time between pulls

  def pull():
    """Pulls the pending steps' metrics to the host in one transfer and runs the guard on
    each in step order (raises naming the first bad step, before anything is saved)."""
    nonlocal last
    if not pending:
      return
    host = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending.clear()
    if window[1]:
      per_step = (time.perf_counter() - window[0]) / window[1]
      for _ in range(window[1]):
        speed.add(per_step)
    for s, m in zip(steps, host):
      m = parallel.first_device_metrics(m)  # host already: device_get is a no-op
      guard.check(s, m)  # non-finite: raises, or (skip mode) counts the skip
      m["skipped_total"] = float(guard.skipped)
      if picker is not None:
        m["fg_reruns_total"] = float(picker.reruns)
      last = m
      history.append(m["total_loss"])

  def restart_window():
    window[0], window[1] = time.perf_counter(), 0

  def saved_data_state():
    """The iterator position (+ the fg slot picker's history) saved with a checkpoint."""
    return dict(train_iter.get_state(), **(picker.state() if picker else {}))

  def first_count(rstate, batch):
    """The foreground count of the first step's batch (no count seen yet), from the
    forward-only program of `step.make_fg_count` (compiled, run once, then dropped; only
    at a run's first step, so no metrics are pending)."""
    _say("counting the first batch's foreground RoIs to pick its slot bucket...")
    t0 = time.perf_counter()
    count = step_lib.make_fg_count(model, config, devices)(rstate, batch, step_rng)
    count = int(np.max(jax.device_get(count)))
    _say(f"{count} in an image ({time.perf_counter() - t0:.1f} s with the compile): "
         f"the first step on {picker.bucket(count)} slots")
    return count

  def run_step(rstate, batch, canvas, k):
    """The step for (canvas, fg slots k), compiled first if new -> (state, metrics,
    compiled now)."""
    key = (canvas, k)
    compiling = key not in compiled
    if compiling:
      pull()
      compiled.append(key)
      n_canvas = len({c for c, _ in compiled})
      of = f" of {len(canvases)}" if canvases and canvas in canvases else ""
      slots = f", {k} foreground slots" if k is not None else ""
      _say(f"compiling the train step for canvas {canvas[0]}x{canvas[1]}{slots} "
           f"({n_canvas}{of})...")
    global _STEP_COMPILED_IN_PROCESS
    p_step = p_step_for(k)
    if compiling and not _STEP_COMPILED_IN_PROCESS:
      # The process's first update step: the programs compiled before it (variable init,
      # the first batch's foreground count) ran once, and jax's caches would keep their
      # executables for the whole run (Lite V-19-slim-DW: peak RSS 2.65 -> 2.46 GiB). Later
      # runs in the same process keep theirs: they reuse the steps of the runs before them.
      parallel.drop_compiled_programs()
      _STEP_COMPILED_IN_PROCESS = True
    if compiling and jax.process_count() == 1 and hasattr(p_step, "lower"):
      executables[key] = parallel.compile_ahead(p_step, rstate, batch, step_rng)
    rstate, metrics = executables.get(key, p_step)(rstate, batch, step_rng)
    return rstate, metrics, compiling

  try:
    stop.__enter__()
    while step < end and not stop.requested:
      batch = next(train_iter)
      canvas = tuple(int(v) for v in np.shape(batch["image"])[-3:-1])
      t0 = time.perf_counter()
      k = picker.pick(lambda: first_count(rstate, batch)) if picker else None
      rstate, metrics, compiling = run_step(rstate, batch, canvas, k)
      while picker is not None:  # the host reads the step's foreground count
        fg_max = int(np.max(jax.device_get(metrics["fg_max"])))
        again = picker.observe(k, fg_max)
        if again is None:
          break
        rl.to_file(f"  step {step + 1}: {fg_max} foreground RoIs in an image > {k} slots: "
                   f"run again on {again} (the state was left unchanged)")
        k = again
        rstate, metrics, c = run_step(rstate, batch, canvas, k)
        compiling = compiling or c
      del batch
      step += 1
      pending.append((step, metrics))
      if compiling:
        jax.block_until_ready(metrics)
        _say(f"compiled and ran step {step} for canvas {canvas[0]}x{canvas[1]} in "
             f"{time.perf_counter() - t0:.1f} s")
        pull()
        restart_window()
      else:
        window[1] += 1
        if len(pending) > 2:  # at most two steps in flight without a host transfer
          jax.block_until_ready(pending[-3][1])
      saver.poll(step)  # a failed async save is reported (and retried once) now
      if bar is not None:
        bar.update(1)
      save = bool(every and step % every == 0) or step == end
      evaluate = eval_every >= 0 and ((eval_every and step % eval_every == 0)
                                      or step == max_iter)
      logging_step = step % log_every == 0 or step == end
      if logging_step or save or evaluate:
        pull()
      ips, eta = speed.images_per_s(), speed.eta(end - step)
      if bar is not None and last and not pending:
        bar.set_postfix_str(f"loss {last['total_loss']:.3f}, lr {last['lr']:.2e}, "
                            + (f"{ips:.1f} img/s, ETA {runlog.format_seconds(eta)}"
                               if ips else "compiling"), refresh=False)
      if logging_step:
        line = (f"step {step}/{end}: loss {last['total_loss']:.4f} ("
                + ", ".join(f"{k[5:]} {last[k]:.4f}" for k in step_lib.LOSS_KEYS
                            if k in last)
                + f"), lr {last['lr']:.3g}"
                + (f", {ips:.2f} img/s, ETA {runlog.format_seconds(eta)}" if ips else ""))
        if bar is None and not quiet:
          rl.say(line)
        else:
          rl.to_file("  " + line)
        rl.metrics(dict(step=step, time=round(time.time(), 3), **last,
                        images_per_s=ips, eta_s=eta))
        if writer is not None:
          for k, v in last.items():
            writer.add_scalar(f"train/{k}", v, step)
          if ips:
            writer.add_scalar("train/step_time_s", speed.step_time, step)
            writer.add_scalar("train/images_per_s", ips, step)
          writer.flush()
      if save:
        saver.save(step, parallel.local_copy(rstate), saved_data_state(), config, meta=meta)
        saved = step
      if evaluate:
        if bar is not None:
          bar.clear()
        if step == end and evaluation.evaluator is None:
          # The run's only evaluation, after its last step: the update programs are not
          # run again, so they go before the evaluation compiles its own (peak host
          # memory = the larger of training and evaluation, not their sum).
          executables.clear()
          parallel.drop_compiled_programs()
        evaluation.run(step, rstate)
      if logging_step or save or evaluate:
        restart_window()
    pull()  # an interrupted run: the guard sees every step before it is saved
    interrupted = stop.requested and step < end
    if interrupted and step > saved and t.get("checkpoint_on_interrupt", True):
      saver.save(step, parallel.local_copy(rstate), saved_data_state(), config, meta=meta)
      saved = step
    mgr.wait_until_finished()
    saver.poll(step)  # the last save too
  finally:
    stop.__exit__()
    mgr.wait_until_finished()
    mgr.close()
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
  host_state = parallel.local_copy(rstate)
  ckpt_dir = ckpt_workdir.checkpoint_dir(workdir)
  if interrupted:
    _say(f"interrupted at step {step}: "
         + (f"checkpoint saved to {ckpt_dir}/{step}; rerun the same command to resume"
            if saved == step else f"not saved (last checkpoint: step {saved})"))
  elif last:
    _say(f"done at step {step}: total loss {last['total_loss']:.4f}; checkpoints in {ckpt_dir}")
  return {"step": step, "state": host_state, "metrics": last, "loss_history": history,
          "eval": evaluation.results, "interrupted": interrupted}


class _EvalHook:
  """COCO evaluation of the live (replicated) train state on config.data's val split.

  Writes WORKDIR/eval/step_<N>/{bbox,segm}_results.json + metrics.json and TensorBoard
  scalars eval/{bbox,segm}_<metric>. A failing evaluation (e.g. no val split) is reported
  and counted, never fatal to a single-process run (a multi-process run stops, since the
  processes would otherwise hang in mismatched collectives).
  """

  def __init__(self, config, workdir: str, devices, writer, rl=None):
    self.config, self.workdir, self.devices, self.writer = config, workdir, devices, writer
    self.rl = rl or runlog.RunLog(None, enabled=False)
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
      tty = sys.stdout.isatty()
      with self.rl.tee_stdout():
        metrics = ev_lib.run_evaluation(
            self.config, variables, workdir=out_dir, replicated=replicated,
            evaluator=self.evaluator, progress=tty,
            title=f"COCO evaluation of the step {step} weights ({out_dir}):")
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
    if metrics:
      self.rl.metrics({"step": step, "time": round(time.time(), 3), "eval": {
          task: {k: vals[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in vals}
          for task, vals in metrics.items()}})
    if self.writer is not None and metrics:
      for task, vals in metrics.items():
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
          if k in vals:
            self.writer.add_scalar(f"eval/{task}_{k}", vals[k], step)
      self.writer.flush()
