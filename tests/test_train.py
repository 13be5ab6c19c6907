"""Training: device-count invariance, resume exactness, no recompilation, NaN stop, optimiser."""
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centermask_jax import parallel
from centermask_jax.checkpoints import workdir as ckpt_workdir
from centermask_jax.config import base_config, lite, vovnet
from centermask_jax.models.centermask import CenterMask
from centermask_jax.training import optimizer as O
from centermask_jax.training import step as S
from centermask_jax.training import trainer

M = 4  # GT slots


def tiny_config():
  c = base_config()
  lite(c)
  vovnet(c, "V-19-slim-dw-eSE")
  c.model.num_classes = 5
  c.model.fpn_channels = 32
  # one conv per tower / head (Lite has 2): every module still runs, the programs of the
  # tests built on this config compile ~13 % faster
  c.model.fcos.num_convs = 1
  c.model.mask_head.num_convs = 1
  c.model.maskiou_head.num_convs = 1
  c.model.mask_head.conv_dim = 32
  c.model.maskiou_head.conv_dim = 32
  c.model.fcos.post_nms_topk_train = 16
  c.model.fcos.pre_nms_topk = 100
  c.model.roi.max_fg_per_image = 20  # = 16 proposals + 4 GT: never capped (deterministic)
  c.data.max_instances = M
  c.data.max_polygon_parts = 1
  c.data.max_polygon_vertices = 8
  c.train.global_batch = 4
  c.optim.base_lr = 0.004
  c.optim.warmup_iters = 2
  c.optim.max_iter = 100
  c.train.checkpoint_every = 3
  c.train.log_every = 1
  return c


def make_batch(n, seed, hw=128):
  """n images [n, ...] of random noise with M-1 rectangle instances each."""
  r = np.random.RandomState(seed)
  img = r.randn(n, hw, hw, 3).astype(np.float32)
  x0 = r.uniform(0, hw / 2, (n, M))
  y0 = r.uniform(0, hw / 2, (n, M))
  w = r.uniform(16, hw / 2, (n, M))
  h = r.uniform(16, hw / 2, (n, M))
  boxes = np.stack([x0, y0, x0 + w, y0 + h], -1).astype(np.float32)
  polys = np.zeros((n, M, 1, 8, 2), np.float32)
  polys[:, :, 0, :4] = np.stack([boxes[..., [0, 1]], boxes[..., [2, 1]], boxes[..., [2, 3]],
                                 boxes[..., [0, 3]]], 2)
  valid = np.tile(np.arange(M) < M - 1, (n, 1))
  return dict(image=img, image_hw=np.full((n, 2), hw, np.int32),
              padded_hw=np.full((n, 2), hw, np.int32),
              gt_boxes=boxes * valid[..., None], gt_classes=r.randint(0, 5, (n, M)).astype(np.int32),
              gt_valid=valid, gt_polys=polys * valid[..., None, None, None],
              gt_poly_len=np.where(valid, 4, 0)[..., None].astype(np.int32))


split = parallel.shard_batch


class FakeIterator:
  """Deterministic batches as a pure function of the step (like the data pipeline)."""

  def __init__(self, d, b, nan_at=None):
    self.d, self.b, self.step, self.nan_at = d, b, 0, nan_at

  def __next__(self):
    batch = split(make_batch(self.d * self.b, 100 + self.step), self.d)
    self.step += 1
    if self.nan_at is not None and self.step == self.nan_at:
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  def get_state(self):
    return {"step": self.step}

  def set_state(self, s):
    self.step = int(s["step"])


def _step_key(config) -> str:
  """The config without the trainer-loop keys the update step never reads."""
  c = config.copy_and_resolve_references()
  for k in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every"):
    c.train[k] = 0
  return c.to_json_best_effort(sort_keys=True)


@pytest.fixture(scope="module", autouse=True)
def _one_update_step_per_config():
  """`step.make_train_step` made once per (config, devices, mode, fg slots) in this module:
  the trainer runs (resume, foreground rerun, NaN stop) and the shard_map test share one
  compiled update step instead of compiling it once each (~50 s of CPU each). A call gets
  the trainer's program only with the trainer's input layout (batches already on the
  devices), and only until a `drop_programs` test: the one using it last carries the mark."""
  made = {}
  real = S.make_train_step

  def shared(model, config, tx, lr_fn, devices=None, mode="pmap", fg_slots=None):
    key = (_step_key(config), tuple(devices or jax.local_devices()), mode, fg_slots)
    if key not in made:
      made[key] = real(model, config, tx, lr_fn, devices=devices, mode=mode, fg_slots=fg_slots)
    return made[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(S, "make_train_step", shared)
    yield


@pytest.fixture(scope="module", autouse=True)
def _one_init_program_per_config():
  """`trainer.random_variables` (the compiled init) in this module: one program per (config,
  canvas), its variables kept as NumPy per rng, so that the programs are not compiled again
  after each `drop_programs` test and `setup`, the trainer runs and the ImageNet-init test
  all get the same variables."""
  programs, made = {}, {}

  def random_variables(model, rng, canvas_hw=(128, 128)):
    program = (model.config.to_json_best_effort(sort_keys=True), tuple(canvas_hw))
    key = (program, np.asarray(jax.random.key_data(rng)).tobytes())
    if key not in made:
      if program not in programs:  # the trainer's program, kept for the other rngs
        programs[program] = parallel.compile_run_once(model.init, rng, tuple(canvas_hw),
                                                      static_argnums=1)
      made[key] = jax.tree_util.tree_map(np.asarray, programs[program](rng))
    return jax.tree_util.tree_map(np.copy, made[key])

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "random_variables", random_variables)
    yield


@pytest.fixture(scope="module")
def setup():
  c = tiny_config()
  model = CenterMask(c)
  return c, model, trainer.random_variables(model, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def loss_one_device(setup):
  """jit of the float32 loss without a device axis (config of `setup`), one compile per
  batch shape shared by the tests below: (params, frozen_bn, batch, rng) -> (total, aux)."""
  c, model, _ = setup
  return jax.jit(functools.partial(S.loss_fn, model=model, config=c, axis_name=None))


@pytest.fixture(scope="module")
def grads_one_device(setup):
  """fg slots (None: all) -> jit of value_and_grad of the float32 loss without a device
  axis, capturing the intermediates (config of `setup`), compiled once per slot count and
  batch shape for the tests below: (params, frozen_bn, batch, rng) -> ((total, aux), grads)."""
  c, model, _ = setup
  made = {}

  def get(k=None):
    if k not in made:
      made[k] = jax.jit(jax.value_and_grad(functools.partial(
          S.loss_fn, model=model, config=c, axis_name=None, capture=True, fg_slots=k),
          has_aux=True))
    return made[k]
  return get


def _loss_and_grads(c, model, v, batch, devices):
  d = len(devices)
  fn = functools.partial(S.loss_fn, model=model, config=c, axis_name="batch")

  def per_device(p, fb, bt, rng):
    (tot, aux), g = jax.value_and_grad(fn, has_aux=True)(p, fb, bt, rng)
    return jax.lax.pmean((tot, g), "batch")
  rep = lambda t: parallel.replicate(t, devices)
  tot, g = jax.pmap(per_device, axis_name="batch", devices=devices, in_axes=(0, 0, 0, None))(
      rep(v["params"]), rep(v["frozen_bn"]), split(batch, d), jax.random.PRNGKey(3))
  return float(tot[0]), jax.tree_util.tree_map(lambda x: np.asarray(x[0]), g)


def test_init_from_imagenet_backbone_checkpoint(setup, tmp_path):
  """config.weights = an ImageNet backbone .pkl (bare VoVNet keys + a classifier): the
  bottom-up params come from the file, everything else is the fresh init; a checkpoint
  with a wrong shape is refused by name."""
  import pickle
  from centermask_jax.checkpoints import official
  c, model, v = setup
  other = trainer.random_variables(model, jax.random.PRNGKey(42))
  sd = official.export_state_dict(other)
  prefix = "backbone.bottom_up."
  bare = {k[len(prefix):]: val for k, val in sd.items() if k.startswith(prefix)}
  bare["classifier.weight"] = np.ones((10, 512), np.float32)
  path = tmp_path / "imagenet.pkl"
  path.write_bytes(pickle.dumps({"model": bare}))
  c = tiny_config()
  c.weights = str(path)
  got = trainer.init_variables(model, c, jax.random.PRNGKey(0))
  bu_got, bu_src = got["params"]["backbone"]["bottom_up"], other["params"]["backbone"]["bottom_up"]
  for a, b in zip(jax.tree_util.tree_leaves(bu_got), jax.tree_util.tree_leaves(bu_src)):
    np.testing.assert_array_equal(a, b)
  for part in ("proposal_generator.fcos_head", "roi_heads.mask_head"):
    for a, b in zip(jax.tree_util.tree_leaves(got["params"][part]),
                    jax.tree_util.tree_leaves(v["params"][part])):
      np.testing.assert_array_equal(a, b)
  key = next(k for k in bare if k.endswith("/conv.weight"))
  bare[key] = bare[key][:, :1]
  path.write_bytes(pickle.dumps({"model": bare}))
  with pytest.raises(official.CheckpointMismatchError, match=key.replace("/", ".")[:20]):
    trainer.init_variables(model, c, jax.random.PRNGKey(0))


def test_four_devices_match_one(setup, grads_one_device):
  """With train.mask_loss_norm = "global" every normaliser is an all-device count: the
  averaged gradient over 4 devices equals the one-device gradient of the whole batch (on
  one device both norms are the same counts)."""
  c, model, v = setup
  c = c.copy_and_resolve_references()
  c.train.mask_loss_norm = "global"
  assert jax.local_device_count() == 4
  batch = make_batch(4, 0)
  l4, g4 = _loss_and_grads(c, model, v, batch, jax.local_devices())
  (l1, _), g1 = grads_one_device()(v["params"], v["frozen_bn"], batch, jax.random.PRNGKey(3))
  l1, g1 = float(l1), jax.tree_util.tree_map(np.asarray, g1)
  assert np.isfinite(l1) and l1 > 0.5
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  flat4, flat1 = jax.tree_util.tree_leaves(g4), jax.tree_util.tree_leaves(g1)
  scale = max(float(np.max(np.abs(x))) for x in flat1)
  assert scale > 0
  for a, b in zip(flat4, flat1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.drop_programs
def test_fg_slot_bucket_equals_the_full_slot_count(setup, grads_one_device):
  """The mask branch on a slot bucket holding the real foreground count (what
  step.FgSlotPicker picks) keeps the same foreground RoIs and mask targets (exact) and gives
  the same predictions, losses and gradients as all fg_slots, up to float rounding (the
  heads run on fewer RoI rows, so XLA may block their GEMMs differently)."""
  c, model, v = setup
  assert S.fg_buckets(c) == (20,)  # 16 > 3/4 of 20 slots: not worth a second program
  batch = make_batch(4, 11)
  fn = grads_one_device
  (tot_b, aux_b), g_b = fn(16)(v["params"], v["frozen_bn"], batch, jax.random.PRNGKey(0))
  (tot_f, aux_f), g_f = fn(None)(v["params"], v["frozen_bn"], batch, jax.random.PRNGKey(0))
  fg = np.asarray(aux_f["inter"]["fg_rois"]["fg"])  # the fg rows come first in both
  assert 0 < fg.sum(1).max() <= 16 and float(aux_f["fg_max"]) == fg.sum(1).max()
  np.testing.assert_array_equal(np.asarray(aux_b["inter"]["fg_rois"]["fg"]), fg)
  sel = lambda a: np.asarray(a)[fg]
  for k in ("fg_rois", "mask_targets"):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(sel(a), sel(b)),
                           aux_b["inter"][k], aux_f["inter"][k])
  for k in ("mask_prob_gtcls", "maskiou_targets", "maskiou_pred_gtcls"):
    np.testing.assert_allclose(sel(aux_b["inter"][k]), sel(aux_f["inter"][k]), rtol=1e-5,
                               atol=1e-6, err_msg=k)
  for k in S.LOSS_KEYS:
    np.testing.assert_allclose(float(aux_b[k]), float(aux_f[k]), rtol=1e-5, err_msg=k)
  # measured: |diff| <= 4.3e-6 on gradient entries of ~1e-2 (the 1-ulp head differences
  # propagated through the backward pass)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         g_b, g_f)


def test_default_mask_losses_are_per_device_means(setup, loss_one_device):
  """Default (centermask2 under DDP): each device's loss_mask / loss_maskiou is the mean
  over its own foreground RoIs, i.e. what the 1-device loss gives on its sub-batch, and
  the devices hold unequal foreground counts here."""
  c, model, v = setup
  assert c.train.mask_loss_norm == "per_device"
  batch = make_batch(4, 0)
  batch["gt_valid"][1, 1:] = False  # image 1: one GT instance (the others have three)
  fn = functools.partial(S.loss_fn, model=model, config=c)
  rng = jax.random.PRNGKey(3)
  _, aux4 = jax.pmap(lambda p, fb, bt: fn(p, fb, bt, rng, axis_name="batch"),
                     axis_name="batch")(parallel.replicate(v["params"]),
                                        parallel.replicate(v["frozen_bn"]), split(batch, 4))
  num_fg = []
  for d in range(4):
    _, aux1 = loss_one_device(v["params"], v["frozen_bn"],
                              {k: x[d:d + 1] for k, x in batch.items()}, rng)
    num_fg.append(float(aux1["num_fg"]))
    assert float(aux4["num_fg"][d]) == num_fg[-1]
    for k in ("loss_mask", "loss_maskiou"):
      np.testing.assert_allclose(float(aux4[k][d]), float(aux1[k]), rtol=1e-5, err_msg=k)
  assert len(set(num_fg)) > 1, num_fg


@pytest.mark.drop_programs
def test_bf16_compute_keeps_fp32_master_params(setup, loss_one_device):
  """train.bf16: bf16 forward/backward, float32 params and optimiser state; the loss is
  close to the float32 loss on the same batch and the update moves the params."""
  c, model, v = setup
  c16 = tiny_config()
  c16.train.bf16 = True
  batch = jax.tree_util.tree_map(lambda x: x[:1], make_batch(1, 7))
  _, aux32 = loss_one_device(v["params"], v["frozen_bn"], batch, jax.random.PRNGKey(0))
  tx = O.make_optimizer(c16, v["params"])
  p_step = S.make_train_step(model, c16, tx, O.lr_schedule(c16), devices=jax.local_devices()[:1])
  state = parallel.replicate(S.init_state(v["params"], v["frozen_bn"], tx),
                             jax.local_devices()[:1])
  state, m = p_step(state, split(batch, 1), jax.random.PRNGKey(0))
  assert np.isfinite(float(m["total_loss"][0]))
  for k in ("loss_fcos_cls", "loss_fcos_loc", "loss_mask"):  # the step's (bf16) losses
    np.testing.assert_allclose(float(m[k][0]), float(aux32[k]), rtol=5e-2, err_msg=k)
  assert float(m["loss_fcos_cls"][0]) != float(aux32["loss_fcos_cls"])  # bf16 really used
  leaves = jax.tree_util.tree_leaves(state["params"]) + jax.tree_util.tree_leaves(
      state["opt_state"])
  assert all(x.dtype != jnp.bfloat16 for x in leaves)
  moved = max(float(np.max(np.abs(np.asarray(a[0]) - b))) for a, b in zip(
      jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(v["params"])))
  assert moved > 0 and np.isfinite(float(m["total_loss"][0]))


def test_resume_is_exact_and_no_recompile(setup, tmp_path, compiles):
  """6 steps in one run equal 3 + 3 resumed steps bit for bit, and the update step is
  compiled once for the three runs' 12 steps (every batch of the canvas reuses it)."""
  c = setup[0]
  mark = len(compiles.names)
  full = trainer.train_and_evaluate(c, str(tmp_path / "a"), FakeIterator(4, 1), num_steps=6,
                                    async_checkpoints=False, quiet=True)
  part = trainer.train_and_evaluate(c, str(tmp_path / "b"), FakeIterator(4, 1), num_steps=3,
                                    async_checkpoints=False, quiet=True)
  assert part["step"] == 3
  rest = trainer.train_and_evaluate(c, str(tmp_path / "b"), FakeIterator(4, 1), num_steps=3,
                                    async_checkpoints=False, quiet=True)
  assert full["step"] == rest["step"] == 6
  # pmapped functions all compile as "jit(_fun)": the update step is the one taking seconds
  assert compiles.longer_than(mark, 5.0).count("jit(_fun)") == 1, compiles.since(mark)
  from centermask_jax.checkpoints import classes
  stored = classes.read(str(tmp_path / "b"))  # stored with every checkpoint
  assert stored.num_classes == c.model.num_classes and stored.names is None
  assert np.isfinite(full["metrics"]["total_loss"])
  for a, b in zip(jax.tree_util.tree_leaves(full["state"]),
                  jax.tree_util.tree_leaves(rest["state"])):
    np.testing.assert_array_equal(a, b)
  # params moved away from init
  p0 = jax.tree_util.tree_leaves(setup[2]["params"])
  p6 = jax.tree_util.tree_leaves(full["state"]["params"])
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(p0, p6)) > 1e-6
  # eval.py / Predictor read the latest variables of a train workdir (checkpoints/workdir)
  got = ckpt_workdir.load_latest_variables(str(tmp_path / "a"), setup[2])
  for x, y in zip(jax.tree_util.tree_leaves(got["params"]), p6):
    np.testing.assert_array_equal(x, y)


def test_trainer_reruns_an_overflowing_step_and_checkpoints_the_history(tmp_path, monkeypatch,
                                                                        compiles):
  """Trainer with buckets (1, 20) and a picker forced to try 1 slot first: every step
  overflows it, leaves params, optimiser state and step counter as they were, and runs
  again on all 20 slots (the plain step, compiled for the test above); each applied count
  fits its slots and the checkpoint keeps the picker's history for a resume."""
  monkeypatch.setattr(S, "FG_BUCKETS", (1,))
  monkeypatch.setattr(S.FgSlotPicker, "pick", lambda self, first_count=None: self.buckets[0])
  real = S.make_train_step
  calls = []  # (slots, state before (host copy of two leaves), state after, metrics)

  class Recorded:
    """The trainer's step for `slots`, compiled ahead as the trainer does, recording each
    call."""

    def __init__(self, fn, slots):
      self.fn, self.slots = fn, slots

    def lower(self, *args):
      lowered = self.fn.lower(*args)
      return types.SimpleNamespace(compile=lambda: Recorded(lowered.compile(), self.slots))

    def __call__(self, state, batch, rng):
      leaves = lambda s: [np.asarray(s["step"])] + [np.asarray(x) for x in (  # noqa: E731
          jax.tree_util.tree_leaves(s["params"])[0], jax.tree_util.tree_leaves(
              s["opt_state"])[0])]
      before = leaves(state)  # copied now: the step donates its input state
      new, m = self.fn(state, batch, rng)
      calls.append((self.slots, before, leaves(new), jax.device_get(m)))
      return new, m

  monkeypatch.setattr(S, "make_train_step", lambda *a, fg_slots=None, **k: Recorded(
      real(*a, fg_slots=fg_slots, **k), fg_slots))
  c = tiny_config()  # the update step of test_resume (num_steps ends the run)
  c.train.eval_every = -1
  assert S.fg_buckets(c) == (1, 20)
  mark = len(compiles.names)
  work = str(tmp_path / "w")
  out = trainer.train_and_evaluate(c, work, FakeIterator(4, 1), num_steps=2,
                                   async_checkpoints=False, quiet=True)
  assert out["step"] == 2 and int(np.asarray(out["state"]["step"])) == 2
  assert [k for k, *_ in calls] == [1, None, 1, None]
  for k, before, after, m in calls:
    fg_max = float(np.max(m["fg_max"]))
    if k == 1:  # overflowed: nothing applied
      assert fg_max > 1 and float(np.max(m["fg_overflow"])) == 1
      for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    else:
      assert fg_max <= 20 and np.all(after[0] == before[0] + 1)
      assert not np.array_equal(after[1], before[1])
  log = open(os.path.join(work, "log.txt")).read()
  assert log.count("run again on 20") == 2
  rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
  assert rows[-1]["fg_reruns_total"] == 2
  applied = [int(np.max(m["fg_max"])) for k, _, _, m in calls if k is None]
  assert [int(r["fg_max"]) for r in rows] == applied
  data = json.load(open(os.path.join(work, "checkpoints", "2", "data", "metadata")))
  assert data["fg_recent"] == applied
  assert compiles.longer_than(mark, 5.0).count("jit(_fun)") == 1  # the 1-slot step only


def test_first_step_runs_on_the_bucket_of_its_forward_count(setup, tmp_path, monkeypatch,
                                                             compiles):
  """A fresh run (no count seen): the trainer reads the first batch's foreground count from
  the forward-only program (step.make_fg_count) and runs the first step on the bucket
  holding it, here all 20 slots of buckets (1, 20) (the update step of test_resume): no
  step on 1 slot, no rerun, and the count is the step's own fg_max. The count program does
  not recompile for a second batch of the same canvas."""
  import re
  monkeypatch.setattr(S, "FG_BUCKETS", (1,))
  c = tiny_config()
  c.train.eval_every = -1
  assert S.fg_buckets(c) == (1, 20)
  work = str(tmp_path / "w")
  out = trainer.train_and_evaluate(c, work, FakeIterator(4, 1), num_steps=1,
                                   async_checkpoints=False, quiet=True)
  assert out["step"] == 1
  log = open(os.path.join(work, "log.txt")).read()
  got = re.search(r"(\d+) in an image \(.*\): the first step on 20 slots", log)
  assert got and "run again" not in log, log[-2000:]
  rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
  assert int(rows[0]["fg_max"]) == int(got.group(1)) > 1 and rows[0]["fg_reruns_total"] == 0
  model, v = setup[1], setup[2]
  state = parallel.replicate(S.init_state(v["params"], v["frozen_bn"],
                                          O.make_optimizer(c, v["params"])))
  count = S.make_fg_count(model, c)
  it = FakeIterator(4, 1)
  first = count(state, next(it), jax.random.PRNGKey(0))
  mark = len(compiles.names)
  second = count(state, next(it), jax.random.PRNGKey(0))
  assert compiles.since(mark) == []
  assert np.all(np.asarray(first) == int(got.group(1))) and np.ptp(np.asarray(second)) == 0


def test_nan_loss_stops_with_step(setup, tmp_path):
  """Metrics reach the host only at log / checkpoint steps (log_every 10 here), yet the
  error names the first bad step (5) and nothing is saved after it (no checkpoint 6)."""
  c = tiny_config()
  c.train.log_every = 10
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 5 .*Last good checkpoint: "
                     r".*checkpoints/3"):
    trainer.train_and_evaluate(c, str(tmp_path / "n"), FakeIterator(4, 1, nan_at=5),
                               num_steps=6, async_checkpoints=False, quiet=True)
  from centermask_jax.checkpoints import workdir as ckpt_workdir
  assert sorted(os.listdir(ckpt_workdir.checkpoint_dir(str(tmp_path / "n")))) == ["3"]


@pytest.mark.drop_programs
def test_shard_map_step_equals_pmap_step(setup, compiles):
  """jit(shard_map) variant of the update: the same params as the pmap step (the trainer's,
  compiled ahead) after 2 steps on 4 devices; its second step does not recompile."""
  c, model, v = setup
  assert jax.local_device_count() == 4
  tx = O.make_optimizer(c, v["params"])
  init = S.init_state(v["params"], v["frozen_bn"], tx)
  p_step = S.make_train_step(model, c, tx, O.lr_schedule(c))
  s_step = S.make_train_step(model, c, tx, O.lr_schedule(c), mode="shard_map")
  ps = parallel.replicate(init)
  ss = parallel.replicate_on_mesh(init, parallel.make_mesh(jax.local_devices()))
  # the batches on the devices as the trainer feeds them (its compiled step's input layout)
  it_p = parallel.DevicePrefetch(FakeIterator(4, 1), jax.local_devices(), size=1)
  it_s = FakeIterator(4, 1)
  p_exe = None
  for i in range(2):
    batch = next(it_p)
    p_exe = p_exe or parallel.compile_ahead(p_step, ps, batch, jax.random.PRNGKey(5))
    ps, mp = p_exe(ps, batch, jax.random.PRNGKey(5))
    lr = float(mp["lr"][0]) if i == 0 else lr
    mark = len(compiles.names)
    ss, ms = s_step(ss, next(it_s), jax.random.PRNGKey(5))
  assert compiles.since(mark) == []
  assert int(ss["step"]) == int(ps["step"][0]) == 2
  assert np.isfinite(float(mp["total_loss"][0])) and float(mp["lr"][0]) > lr  # warmup
  np.testing.assert_allclose(float(ms["total_loss"]), float(mp["total_loss"][0]), rtol=1e-5)
  got = jax.tree_util.tree_leaves(jax.device_get(ss["params"]))
  want = jax.tree_util.tree_leaves(parallel.local_copy(ps["params"]))
  start = jax.tree_util.tree_leaves(v["params"])
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(want, start)) > 1e-6
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_and_decay_masks(setup):
  c, _, v = setup
  c = tiny_config()
  c.optim.warmup_iters = 10
  c.optim.steps = (20, 30)
  c.train.global_batch = 8
  c.optim.ims_per_batch = 16
  c.optim.base_lr = 0.02
  lr = jax.jit(O.lr_schedule(c))  # jitted, as in the train step (eagerly ~200 compiles here)
  base = 0.01  # 0.02 * 8 / 16
  np.testing.assert_allclose(float(lr(0)), base * 0.001, rtol=1e-6)
  np.testing.assert_allclose(float(lr(5)), base * (0.001 * 0.5 + 0.5), rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), base, rtol=1e-6)
  np.testing.assert_allclose(float(lr(20)), base * 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(lr(35)), base * 0.01, rtol=1e-6)
  mask = O.decay_mask(v["params"])
  from flax import traverse_util
  flat = {".".join(k): m for k, m in traverse_util.flatten_dict(mask).items()}
  assert not flat["proposal_generator.fcos_head.cls_tower.1.scale"]
  assert not flat["proposal_generator.fcos_head.cls_tower.1.bias"]
  assert flat["proposal_generator.fcos_head.cls_tower.0.bias"]
  assert flat["proposal_generator.fcos_head.scales.0.scalar"]
  # one SGD step by hand: p - lr * (g + wd p) for a decayed leaf, p - lr * g for a GN leaf
  tx = O.make_optimizer(c, v["params"])
  g = jax.tree_util.tree_map(np.ones_like, v["params"])
  upd, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(g, v["params"])
  fu = traverse_util.flatten_dict(upd)
  fp = traverse_util.flatten_dict(v["params"])
  k1 = next(k for k in fp if ".".join(k) == "proposal_generator.fcos_head.scales.0.scalar")
  k2 = next(k for k in fp if ".".join(k) == "proposal_generator.fcos_head.cls_tower.1.scale")
  np.testing.assert_allclose(fu[k1], -base * 0.001 * (1 + 1e-4 * fp[k1]), rtol=1e-5)
  np.testing.assert_allclose(fu[k2], -base * 0.001 * np.ones_like(fp[k2]), rtol=1e-5)


def test_frozen_resnet_stages_get_zero_updates():
  c = base_config()
  from centermask_jax.config import resnet
  resnet(c, 50)
  params = {"backbone": {"bottom_up": {"stem": {"conv1": {"kernel": np.ones(3, np.float32)}},
                                       "res2": {"0": {"kernel": np.ones(3, np.float32)}},
                                       "res3": {"0": {"kernel": np.ones(3, np.float32)}}}}}
  tx = O.make_optimizer(c, params)
  upd, _ = tx.update(jax.tree_util.tree_map(np.ones_like, params), tx.init(params), params)
  bu = upd["backbone"]["bottom_up"]
  assert np.all(np.asarray(bu["stem"]["conv1"]["kernel"]) == 0)
  assert np.all(np.asarray(bu["res2"]["0"]["kernel"]) == 0)
  assert np.all(np.asarray(bu["res3"]["0"]["kernel"]) < 0)


def test_adamw_matches_numpy_with_decay_mask():
  """optim.optimizer='adamw': two steps equal a NumPy AdamW (decoupled decay on kernels,
  none on GroupNorm affine leaves), LR from the same warmup schedule."""
  c = tiny_config()
  c.optim.optimizer = "adamw"
  c.optim.weight_decay = 0.05
  c.optim.base_lr = 0.004  # x 4/16 -> 1e-3
  c.optim.warmup_iters = 0
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": rng.normal(size=(3, 3)).astype(np.float32)},
            "gn": {"scale": rng.normal(size=3).astype(np.float32),
                   "bias": rng.normal(size=3).astype(np.float32)}}
  tx = O.make_optimizer(c, params)
  state = tx.init(params)
  p = jax.tree_util.tree_map(np.float64, params)
  m = jax.tree_util.tree_map(np.zeros_like, p)
  v = jax.tree_util.tree_map(np.zeros_like, p)
  cur = params
  for t in (1, 2):
    g = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    upd, state = tx.update(g, state, cur)
    cur = jax.tree_util.tree_map(lambda a, u: np.asarray(a + u), cur, upd)
    for mod, leaf in (("conv", "kernel"), ("gn", "scale"), ("gn", "bias")):
      gg = g[mod][leaf].astype(np.float64)
      m[mod][leaf] = 0.9 * m[mod][leaf] + 0.1 * gg
      v[mod][leaf] = 0.999 * v[mod][leaf] + 0.001 * gg ** 2
      mh, vh = m[mod][leaf] / (1 - 0.9 ** t), v[mod][leaf] / (1 - 0.999 ** t)
      wd = 0.05 if mod == "conv" else 0.0
      p[mod][leaf] = p[mod][leaf] - 1e-3 * (mh / (np.sqrt(vh) + 1e-8) + wd * p[mod][leaf])
  for mod, leaf in (("conv", "kernel"), ("gn", "scale"), ("gn", "bias")):
    np.testing.assert_allclose(cur[mod][leaf], p[mod][leaf], rtol=1e-5, atol=1e-7)
  c.optim.weight_decay_norm = 1e-4
  with pytest.raises(ValueError, match="weight_decay_norm is not supported"):
    O.make_optimizer(c, params)
  c.optim.optimizer = "lamb"
  with pytest.raises(ValueError, match="optim.optimizer='lamb'"):
    O.make_optimizer(c, params)


def test_clip_grad_norm_scales_the_global_gradient():
  """optim.clip_grad_norm: SGD's first update is -lr * (g * min(1, clip / ||g||) + wd p)
  with ||g|| the L2 norm over every leaf; off (0) leaves g as is; negative is an error."""
  c = tiny_config()
  c.optim.warmup_iters = 0
  c.optim.weight_decay = 0.0
  rng = np.random.default_rng(1)
  params = {"a": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
            "b": {"kernel": rng.normal(size=5).astype(np.float32)}}
  g = jax.tree_util.tree_map(lambda x: 3.0 * rng.normal(size=x.shape).astype(np.float32),
                             params)
  norm = np.sqrt(sum(np.sum(np.square(x.astype(np.float64)))
                     for x in jax.tree_util.tree_leaves(g)))
  lr = float(O.lr_schedule(c)(0))
  for clip, scale in ((0.0, 1.0), (0.5, 0.5 / norm), (float(10 * norm), 1.0)):
    c.optim.clip_grad_norm = clip
    tx = O.make_optimizer(c, params)
    upd, _ = tx.update(g, tx.init(params), params)
    for k in ("a", "b"):
      np.testing.assert_allclose(upd[k]["kernel"], -lr * scale * g[k]["kernel"], rtol=1e-5)
  c.optim.clip_grad_norm = -1.0
  with pytest.raises(ValueError, match="clip_grad_norm"):
    O.make_optimizer(c, params)


def test_device_prefetch_keeps_order_state_and_layout():
  """DevicePrefetch: same batches in order, already laid out as pmap's inputs, and
  get_state() = the position of the next batch it yields (checkpoints resume exactly)."""
  devs = jax.local_devices()
  p = parallel.DevicePrefetch(FakeIterator(4, 1), devs, size=2)
  assert p.get_state() == {"step": 0}
  first = next(p)
  assert p.get_state() == {"step": 1}
  np.testing.assert_array_equal(np.asarray(first["image"]),
                                split(make_batch(4, 100), 4)["image"])
  assert first["image"].sharding == parallel.batch_sharding(devs)
  p.set_state({"step": 5})
  assert p.get_state() == {"step": 5}
  np.testing.assert_array_equal(np.asarray(next(p)["gt_boxes"]),
                                split(make_batch(4, 105), 4)["gt_boxes"])
  assert p.get_state() == {"step": 6}
