"""CenterMask training loss and the pmapped update step.

`loss_fn` is per-device code. The FCOS normalisers are reduced over `axis_name` (spec
§c.4, all-device positive count); the mask and MaskIoU losses are, as centermask2 under
DDP, means over each device's own foreground RoIs (`train.mask_loss_norm = "per_device"`,
the default) or over the all-device counts ("global"). `train_step` averages gradients.
`make_train_step` maps `train_step` over the devices through `centermask_jax.parallel`
(pmap by default, state donated).

State: a dict {"step": int32 [], "params": ..., "frozen_bn": ..., "opt_state": ...}
(placed on the devices by `parallel.replicate`).
"""
import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from centermask_jax import parallel

from centermask_jax.models.centermask import CenterMask
from centermask_jax.ops import fcos_postprocess
from centermask_jax.training import losses as L
from centermask_jax.training import mask_targets as MT
from centermask_jax.training import targets as T

AXIS = parallel.AXIS
LOSS_KEYS = ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask", "loss_maskiou")


def _cast(tree, dtype):
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def fg_slots(config) -> int:
  """Static number of foreground RoI slots per image (= the official fg cap)."""
  c = config.model
  return int(min(c.roi.max_fg_per_image, c.fcos.post_nms_topk_train + config.data.max_instances))


MASK_LOSS_NORMS = ("per_device", "global")


def mask_loss_axis(config, axis_name: Optional[str]) -> Optional[str]:
  """Device axis the mask / MaskIoU normalisers are reduced over: None for
  `train.mask_loss_norm = "per_device"` (centermask2 + DDP: per-device means, the train
  step then averages gradients), `axis_name` for "global" (all-device counts)."""
  norm = config.train.get("mask_loss_norm", "per_device")
  if norm not in MASK_LOSS_NORMS:
    raise ValueError(f"train.mask_loss_norm={norm!r}; expected one of {MASK_LOSS_NORMS}")
  return axis_name if norm == "global" else None


FG_BUCKETS = (16, 32, 64, 128)
FG_SLOT_MODES = ("auto", "host", "off")


def fg_buckets(config, num_rois: Optional[int] = None) -> tuple:
  """Foreground slot counts the mask branch may run on: the FG_BUCKETS up to 3/4 of the
  slot count (`fg_slots`, at most num_rois = proposals + GT slots; a bucket closer to it
  saves too little to pay for its compile), then the slot count."""
  slots = fg_slots(config) if num_rois is None else min(fg_slots(config), int(num_rois))
  return tuple(b for b in FG_BUCKETS if 4 * b <= 3 * slots) + (slots,)


def fg_slot_mode(config) -> str:
  """`train.fg_slot_buckets` resolved: "host" (the host picks a slot bucket per step, see
  `FgSlotPicker`; "auto" on CPU, where the host is the device and reading the step's
  foreground count costs nothing) or "off" (every step on all fg_slots, no host read:
  "auto" on accelerators)."""
  mode = config.train.get("fg_slot_buckets", "auto")
  if mode not in FG_SLOT_MODES:
    raise ValueError(f"train.fg_slot_buckets={mode!r}; expected one of {FG_SLOT_MODES}")
  if mode == "auto":
    mode = "host" if jax.default_backend() == "cpu" else "off"
  return mode


def fg_slot_picker(config) -> Optional["FgSlotPicker"]:
  """The host's bucket picker for `config`, or None (mode "off", or a single bucket)."""
  buckets = fg_buckets(config)
  if fg_slot_mode(config) == "host" and len(buckets) > 1:
    return FgSlotPicker(buckets)
  return None


class FgSlotPicker:
  """Host choice of the mask branch's foreground slot bucket (`fg_slot_mode` "host").

  The step for bucket k (`make_train_step(..., fg_slots=k)`) reports the all-device
  largest per-image foreground count (metrics["fg_max"]); if it exceeds k the step left the
  state unchanged and is run again on the bucket holding it, so every applied step saw all
  its foreground RoIs (exact: the rows past the count are padding either way; the largest
  bucket cannot overflow and runs as the plain step, `step_slots`). A step runs
  on the smallest bucket holding the largest count of the last `window` applied steps; when
  there is none yet, on the bucket holding its own batch's count, read from a forward-only
  program (`make_fg_count`: compiling it and the bucket's step costs less than the all-slot
  step), or on all slots without one. The history is part of the checkpointed data state
  (`state()` / `set_state()`), so a resumed run picks the buckets the uninterrupted one did.
  """

  def __init__(self, buckets, window: int = 20):
    self.buckets = tuple(int(b) for b in buckets)
    self.window = int(window)
    self.recent = []
    self.reruns = 0

  def bucket(self, count: int) -> int:
    """Smallest bucket holding `count` foreground RoIs (the largest if none does)."""
    return next((b for b in self.buckets if b >= count), self.buckets[-1])

  def pick(self, first_count: Optional[Callable[[], int]] = None) -> int:
    """The bucket of the next step; first_count() (called only when no count has been seen)
    gives the count of the step's own batch."""
    if self.recent:
      return self.bucket(max(self.recent))
    return self.bucket(first_count()) if first_count is not None else self.buckets[-1]

  def step_slots(self, slots: int) -> Optional[int]:
    """`make_train_step`'s fg_slots for the bucket `slots`: None (the plain step) for the
    largest, which holds every foreground RoI and so never overflows."""
    return None if slots == self.buckets[-1] else slots

  def observe(self, slots: int, fg_max: int) -> Optional[int]:
    """After a step on `slots`: None if it was applied (recorded), else the bucket to run
    it again on."""
    if fg_max > slots:
      self.reruns += 1
      return self.bucket(fg_max)
    self.recent = (self.recent + [int(fg_max)])[-self.window:]
    return None

  def state(self) -> dict:
    return {"fg_recent": list(self.recent)}

  def set_state(self, data_state: dict) -> dict:
    """Takes this picker's entry out of a restored data state; returns the rest."""
    rest = dict(data_state)
    self.recent = [int(v) for v in rest.pop("fg_recent", [])][-self.window:]
    return rest


def mask_targets(config, boxes, matched_idx, fg_valid, batch, mask_size: int):
  """Foreground RoIs [N, R] -> (28x28 targets bool [N, R, S, S], MaskIoU ratio [N, R],
  overflow bool [] (device targets ran out of crossing slots)) by
  `config.model.mask_head.target_impl`: 'device' (default) or 'pycocotools' (host callback)."""
  impl = config.model.mask_head.get("target_impl", "device")
  if impl == "device":
    return MT.device_mask_targets(boxes, matched_idx, fg_valid, batch, mask_size=mask_size,
                                  num_parts=int(config.data.max_polygon_parts))
  if impl != "pycocotools":
    raise ValueError(f"model.mask_head.target_impl must be 'device' or 'pycocotools', "
                     f"got {impl!r}")
  if "gt_poly_xy64" in batch:
    mt, ratio = MT.mask_targets_packed(boxes, matched_idx, fg_valid, batch["gt_poly_xy64"],
                                       batch["gt_poly_part"], mask_size=mask_size)
  else:
    mt, ratio = MT.mask_targets(boxes, matched_idx, fg_valid, batch["gt_polys"],
                                batch["gt_poly_len"], mask_size=mask_size)
  return mt, ratio, jnp.zeros((), bool)


def _compute_dtype(config):
  return jnp.bfloat16 if bool(config.train.bf16) else jnp.float32


def _dense_forward(params, frozen_bn, batch, model: CenterMask, config):
  """Backbone, FPN and FCOS head in the compute dtype (train.bf16) -> (variables, FPN
  features, (logits, reg, ctrness) float32 lists over P3..P7)."""
  compute = _compute_dtype(config)
  variables = {"params": _cast(params, compute), "frozen_bn": frozen_bn}
  images = model.normalize(batch["image"], batch["image_hw"]).astype(compute)
  fpn, _ = model.features(variables, images, batch["padded_hw"])
  heads = model.fcos(variables, fpn, batch["padded_hw"])
  return variables, fpn, tuple(_cast(h, jnp.float32) for h in heads)


def _train_rois(heads, batch, rng, config, axis_name: Optional[str]):
  """FCOS train proposals (no gradient) matched to the GT -> (detections, RoIs of
  `targets.match_rois`: fg [N, R] ...); rng: the step's key (the device index folded in
  under `axis_name`)."""
  m, fc = config.model, config.model.fcos
  det = jax.lax.stop_gradient(fcos_postprocess.fcos_inference(
      *heads, batch["padded_hw"], strides=tuple(fc.strides), score_thresh=fc.inference_th,
      pre_nms_topk=fc.pre_nms_topk, nms_thresh=fc.nms_th,
      post_nms_topk=fc.post_nms_topk_train))
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  rois = T.match_rois(det["boxes"], det["valid"], batch["gt_boxes"], batch["gt_classes"],
                      batch["gt_valid"], batch["image_hw"], max_fg=m.roi.max_fg_per_image,
                      iou_threshold=m.roi.iou_threshold, rng=rng)
  return det, rois


def loss_fn(params, frozen_bn, batch, rng, *, model: CenterMask, config,
            axis_name: Optional[str] = AXIS, capture: bool = False,
            fg_slots: Optional[int] = None):
  """Per-device total loss.

  params / frozen_bn: model variables; batch: dict of [B, ...] arrays (the data contract
  without the device axis); rng: PRNG key (foreground subsampling); fg_slots: foreground
  RoI rows per image of the mask branch (None: all `fg_slots(config)`; fewer drops the
  foreground RoIs past that count, see `FgSlotPicker`).
  -> (total scalar, dict of the five losses + num_pos, num_fg, fg_max = this device's
  largest per-image foreground count). With `capture`, the dict
  also holds "inter": FCOS targets, train proposals, foreground RoIs, mask and MaskIoU
  targets and predictions (what `tools.parity --train` compares).
  """
  m = config.model
  fc = m.fcos
  compute = _compute_dtype(config)
  variables, fpn, (logits, reg, ctr) = _dense_forward(params, frozen_bn, batch, model, config)
  image_hw = batch["image_hw"]
  padded_hw = batch["padded_hw"]
  level_hw = [tuple(x.shape[1:3]) for x in logits]

  tg = T.fcos_targets(batch["gt_boxes"], batch["gt_classes"], batch["gt_valid"], level_hw,
                      padded_hw, strides=tuple(fc.strides),
                      sizes_of_interest=tuple(fc.sizes_of_interest),
                      center_sample_radius=fc.center_sample_radius, num_classes=m.num_classes)
  fl = L.fcos_losses(logits, reg, ctr, tg["labels"], tg["reg_targets"], tg["loc_valid"],
                     axis_name=axis_name, focal_alpha=fc.focal_alpha,
                     focal_gamma=fc.focal_gamma)

  det, rois = _train_rois((logits, reg, ctr), batch, rng, config, axis_name)
  slots = fg_buckets(config, rois["fg"].shape[1])[-1]
  k = slots if fg_slots is None else min(int(fg_slots), slots)

  def roi_branch(k):
    """The mask + MaskIoU branch on k foreground slots per image -> this device's loss
    partial sums, the target overflow flag (+ per-RoI captures padded to `slots` rows)."""
    def fn(args):
      variables, fpn, rois = args
      fg = T.select_fg(rois, k)
      boxes = jax.lax.stop_gradient(fg["boxes"])
      pooled, _ = model.pool_rois(fpn, boxes, image_hw, padded_hw)
      cls_logits, _ = model.mask_logits(variables, pooled, classes=fg["gt_classes"])
      cls_logits = cls_logits.astype(jnp.float32)
      mt, ratio, overflow = mask_targets(config, boxes, fg["matched_idx"], fg["fg"], batch,
                                         mask_size=cls_logits.shape[-1])
      iou_all = model.maskiou(variables, pooled, jax.nn.sigmoid(cls_logits).astype(compute))
      iou_g = jnp.take_along_axis(iou_all, fg["gt_classes"][..., None], axis=-1,
                                  mode="clip")[..., 0].astype(jnp.float32)
      iou_t = L.maskiou_targets(cls_logits, mt, ratio, fg["fg"])
      out = {"mask": L.mask_loss_sums(cls_logits, mt, fg["fg"]),
             "maskiou": L.maskiou_loss_sums(iou_g, iou_t, fg["fg"]),
             "overflow": overflow}
      if capture:
        pad = lambda a: jnp.pad(a, [(0, 0), (0, slots - k)] + [(0, 0)] * (a.ndim - 2))
        out["inter"] = jax.tree_util.tree_map(pad, {
            "fg_rois": fg, "mask_targets": mt, "mask_prob_gtcls": jax.nn.sigmoid(cls_logits),
            "maskiou_targets": iou_t, "maskiou_pred_gtcls": iou_g})
      return out
    return fn

  part = roi_branch(k)((variables, fpn, rois))
  mask_axis = mask_loss_axis(config, axis_name)
  loss_mask = L.normalised(part["mask"], mask_axis)
  loss_maskiou = m.maskiou_head.loss_weight * L.normalised(part["maskiou"], mask_axis)
  losses = {"loss_fcos_cls": fl["loss_fcos_cls"], "loss_fcos_loc": fl["loss_fcos_loc"],
            "loss_fcos_ctr": fl["loss_fcos_ctr"], "loss_mask": loss_mask,
            "loss_maskiou": loss_maskiou}
  total = sum(losses[k] for k in LOSS_KEYS)
  aux = dict(losses, num_pos=fl["num_pos"], num_fg=jnp.sum(rois["fg"]).astype(jnp.float32),
             fg_max=jnp.max(jnp.sum(rois["fg"], axis=1)).astype(jnp.float32),
             mask_target_overflow=part["overflow"].astype(jnp.float32))
  if capture:
    aux["inter"] = dict(part["inter"], fcos_targets=tg, proposals=det)
  return total, aux


def init_state(params, frozen_bn, tx: optax.GradientTransformation) -> Dict[str, Any]:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen_bn": frozen_bn,
          "opt_state": tx.init(params)}


def train_step(state, batch, rng, *, model, config, tx, lr_fn, axis_name=AXIS,
               fg_slots: Optional[int] = None):
  """One SGD step on this device's batch; grads and metrics averaged over `axis_name`.

  fg_slots: the mask branch's foreground rows per image (None: all). A step whose
  all-device largest per-image foreground count (metrics["fg_max"]) exceeds it leaves the
  state as it was (metrics["fg_overflow"] = 1) to be run again on more slots."""
  rng = jax.random.fold_in(rng, state["step"])
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, model=model, config=config, axis_name=axis_name,
                        fg_slots=fg_slots),
      has_aux=True)
  (total, aux), grads = grad_fn(state["params"], state["frozen_bn"], batch, rng)
  fg_max = aux.pop("fg_max")
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    fg_max = jax.lax.pmax(fg_max, axis_name)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = dict(aux, total_loss=total)
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
    metrics["num_pos"] = metrics["num_pos"] * jax.lax.psum(1, axis_name)
    metrics["num_fg"] = metrics["num_fg"] * jax.lax.psum(1, axis_name)
  metrics["lr"] = lr_fn(state["step"])
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics.update(finiteness(metrics, params, opt_state))
  if bool(config.train.get("skip_nonfinite_steps", False)):
    # A non-finite step leaves params and optimiser state as they were (counted in
    # metrics["skipped"]); the step counter still moves on.
    ok = metrics["nonfinite"] == 0
    params, opt_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(ok, new, old), (params, opt_state),
        (state["params"], state["opt_state"]))
    metrics["skipped"] = (~ok).astype(jnp.float32)
  metrics["fg_max"] = fg_max
  new_step = state["step"] + 1
  if fg_slots is not None:
    applied = fg_max <= fg_slots
    params, opt_state, new_step = jax.tree_util.tree_map(
        lambda new, old: jnp.where(applied, new, old), (params, opt_state, new_step),
        (state["params"], state["opt_state"], state["step"]))
    metrics["fg_overflow"] = (~applied).astype(jnp.float32)
  new_state = {"step": new_step, "params": params, "frozen_bn": state["frozen_bn"],
               "opt_state": opt_state}
  return new_state, metrics


def fg_count(state, batch, rng, *, model, config, axis_name=AXIS):
  """The foreground count `train_step` would report for this batch (metrics["fg_max"]:
  the all-device largest per-image foreground RoI count), from the forward alone (backbone,
  heads, train proposals, RoI matching; no mask branch, no gradients) -> float32 []."""
  rng = jax.random.fold_in(rng, state["step"])
  _, _, heads = _dense_forward(state["params"], state["frozen_bn"], batch, model, config)
  _, rois = _train_rois(heads, batch, rng, config, axis_name)
  fg_max = jnp.max(jnp.sum(rois["fg"], axis=1)).astype(jnp.float32)
  return fg_max if axis_name is None else jax.lax.pmax(fg_max, axis_name)


def make_fg_count(model, config, devices=None):
  """`fg_count` mapped as `make_train_step`'s pmap (state [D, ...], batch [D, B, ...], rng)
  -> [D] (equal entries): what the trainer's first step picks its slot bucket from when no
  count has been seen yet (`FgSlotPicker.pick`), so that it compiles that bucket's step
  instead of the all-slot one. The state is not donated."""
  fn = functools.partial(fg_count, model=model, config=config, axis_name=AXIS)
  return parallel.make_pmap_step(fn, devices, donate_state=False)


# Codes of metrics["nonfinite"]: the first non-finite quantity of a step, in this order.
NONFINITE = {0: None, 1: "loss", 2: "grad_norm", 3: "updated params",
             4: "updated optimizer state"}


def _count_nonfinite(tree) -> jax.Array:
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return sum((jnp.sum(~jnp.isfinite(x)).astype(jnp.float32) for x in leaves),
             jnp.zeros((), jnp.float32))


def finiteness(metrics, params, opt_state) -> Dict[str, jax.Array]:
  """In-step finiteness guard: {"nonfinite": code of the first non-finite quantity (see
  NONFINITE; 0 = all finite), "nonfinite_params" / "nonfinite_opt_state": counts of
  non-finite values in the updated state} (float32 scalars, the same on every device)."""
  loss_bad = ~jnp.isfinite(metrics["total_loss"])
  for k in LOSS_KEYS:
    loss_bad = loss_bad | ~jnp.isfinite(metrics[k])
  n_params, n_opt = _count_nonfinite(params), _count_nonfinite(opt_state)
  code = jnp.select([loss_bad, ~jnp.isfinite(metrics["grad_norm"]), n_params > 0, n_opt > 0],
                    [1, 2, 3, 4], 0).astype(jnp.float32)
  return {"nonfinite": code, "nonfinite_params": n_params, "nonfinite_opt_state": n_opt}


def make_train_step(model, config, tx, lr_fn, devices=None, mode: str = "pmap",
                    fg_slots: Optional[int] = None):
  """The mapped update step. mode "pmap" (default): (state [D, ...], batch [D, B, ...], rng)
  -> (state, metrics [D]); "shard_map": jit of shard_map over `parallel.make_mesh(devices)`,
  state replicated on the mesh (`parallel.replicate_on_mesh`), metrics unstacked.
  fg_slots: see `train_step` (one program per bucket; `FgSlotPicker` chooses).

  Gradients and metrics are averaged over every device of every process."""
  fn = functools.partial(train_step, model=model, config=config, tx=tx, lr_fn=lr_fn,
                         axis_name=AXIS, fg_slots=fg_slots)
  if mode == "pmap":
    return parallel.make_pmap_step(fn, devices)
  if mode == "shard_map":
    return parallel.make_shard_map_step(fn, parallel.make_mesh(devices))
  raise ValueError(f"unknown step mode {mode!r}; expected 'pmap' or 'shard_map'")
