"""Optimiser and LR schedule of centermask2 training (spec §f), in optax.

* SGD, momentum 0.9 (PyTorch semantics: buf = m * buf + (g + wd * p); p -= lr * buf).
* Weight decay 1e-4 on every parameter except normalisation affine parameters
  (GroupNorm `scale`/`bias`; `WEIGHT_DECAY_NORM = 0`). FCOS `Scale` parameters (leaf
  `scalar`) and conv/linear biases do get decay, as in detectron2.
* WarmupMultiStepLR: linear warmup over `warmup_iters` from `warmup_factor` x, then x`gamma`
  at each of `steps` (an iteration >= a milestone counts it).
* Linear LR scaling rule: the config's `base_lr` is the LR for `ims_per_batch` images per
  step (16 in every official config); with another `train.global_batch` the LR used is
  `base_lr * global_batch / ims_per_batch` (Goyal et al.). The schedule's iteration
  counts (warmup, steps, max_iter) are used as given.
* `optim.optimizer = "adamw"` swaps SGD for AdamW (decoupled decay on the same mask, same
  schedule; not an official recipe: for short from-scratch runs such as the built-in data).
* Frozen parameters (FREEZE_AT: e.g. ResNet stem / res2) get exactly zero updates
  (`optax.masked(set_to_zero())` as the last transform; the backbone also stops the
  gradient above them, `layers.freeze_below`); FrozenBN buffers are not parameters at all.
"""
from typing import Tuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

BOTTOM_UP_PREFIX = "backbone.bottom_up."


def scaled_base_lr(config) -> float:
  """Linear scaling rule: base_lr * global_batch / ims_per_batch."""
  o = config.optim
  return float(o.base_lr) * float(config.train.global_batch) / float(o.ims_per_batch)


def lr_schedule(config):
  """step (int) -> learning rate (float32): warmup then multi-step decay."""
  o = config.optim
  base = scaled_base_lr(config)
  warm = int(o.warmup_iters)
  factor = float(o.warmup_factor)
  steps = tuple(int(s) for s in o.steps)
  milestones = jnp.asarray(steps or (2 ** 31 - 1,), jnp.int32)  # () = no decay
  gamma = float(o.gamma)

  def fn(step):
    step = jnp.asarray(step)
    if warm > 0:
      alpha = jnp.minimum(step.astype(jnp.float32) / warm, 1.0)
      w = jnp.where(step < warm, factor * (1.0 - alpha) + alpha, 1.0)
    else:
      w = 1.0
    n = jnp.sum(step >= milestones.astype(step.dtype))
    return (base * w * gamma ** n).astype(jnp.float32)
  return fn


def _paths(params):
  return {k: ".".join(k) for k in traverse_util.flatten_dict(params)}


def is_norm_param(path: Tuple[str, ...], flat_keys) -> bool:
  """GroupNorm affine leaf: its module has a `scale` leaf and no `kernel`."""
  module = path[:-1]
  return (path[-1] in ("scale", "bias") and (module + ("scale",)) in flat_keys
          and (module + ("kernel",)) not in flat_keys)


def decay_mask(params):
  """Pytree of bools like params: True where weight decay applies."""
  flat = traverse_util.flatten_dict(params)
  keys = set(flat)
  return traverse_util.unflatten_dict({k: not is_norm_param(k, keys) for k in flat})


def frozen_prefixes(config) -> Tuple[str, ...]:
  """Full dotted path prefixes of frozen params (from the backbone's FREEZE_AT)."""
  b = config.model.backbone
  freeze_at = int(b.get("freeze_at", 0) or 0)
  if freeze_at <= 0:
    return ()
  if b.name == "resnet":
    from centermask_jax.models import resnet as mod
  elif b.name == "mobilenetv2":
    from centermask_jax.models import mobilenet as mod
  elif b.name == "vovnet":
    from centermask_jax.models import vovnet as mod
  else:
    raise ValueError(f"freeze_at={freeze_at} is not supported for backbone {b.name!r}")
  return tuple(BOTTOM_UP_PREFIX + p for p in mod.frozen_param_prefixes(freeze_at))


def param_labels(params, config):
  """Pytree of 'train' / 'frozen' labels like params."""
  prefixes = frozen_prefixes(config)
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({
      k: "frozen" if any((".".join(k) + ".").startswith(p) for p in prefixes) else "train"
      for k in flat})


def make_optimizer(config, params) -> optax.GradientTransformation:
  """The full optax transformation for `params` (masks are derived from its tree)."""
  o = config.optim
  dmask = decay_mask(params)
  name = str(o.get("optimizer", "sgd")).lower()
  if name not in ("sgd", "adamw"):
    raise ValueError(f"optim.optimizer={name!r}: expected 'sgd' or 'adamw'")
  if name == "adamw" and float(o.weight_decay_norm):
    raise ValueError("optim.weight_decay_norm is not supported with optim.optimizer='adamw' "
                     "(it would be coupled L2 on norm parameters next to AdamW's decoupled decay)")
  parts = []
  clip = float(o.get("clip_grad_norm", 0.0))
  if clip < 0:
    raise ValueError(f"optim.clip_grad_norm={clip}: expected >= 0 (0 = no clipping)")
  if clip:  # the (all-reduced) gradient before decay / momentum, as detectron2 clips it
    parts.append(optax.clip_by_global_norm(clip))
  if name == "sgd":
    parts.append(optax.add_decayed_weights(float(o.weight_decay), mask=dmask))
  if float(o.weight_decay_norm):
    parts.append(optax.add_decayed_weights(
        float(o.weight_decay_norm), mask=jax.tree_util.tree_map(lambda m: not m, dmask)))
  if name == "sgd":
    parts.append(optax.sgd(lr_schedule(config), momentum=float(o.momentum), nesterov=False))
  else:
    parts.append(optax.adamw(lr_schedule(config), b1=float(o.momentum), b2=0.999,
                             weight_decay=float(o.weight_decay), mask=dmask))
  labels = param_labels(params, config)
  frozen = jax.tree_util.tree_map(lambda l: l == "frozen", labels)
  if any(jax.tree_util.tree_leaves(frozen)):
    parts.append(optax.masked(optax.set_to_zero(), frozen))
  return optax.chain(*parts)
