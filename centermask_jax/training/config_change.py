"""Resume guard: the current config against the one saved with the latest checkpoint.

Keys that only steer logging, saving, evaluation, paths or the run length may change
between runs; any other difference (model shapes, optimiser, batch, schedule, input) is
named and the resume refused unless `train.allow_config_change=True`. Keys present on one
side only (added or removed by a code update) are not compared.
"""
import json
from typing import Any, Dict, List, Tuple

from centermask_jax import errors

FREE = ("name", "weights", "compilation_cache_dir", "data.data_dir", "optim.max_iter",
        "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
        "train.eval_every", "train.allow_config_change", "train.checkpoint_on_interrupt",
        "train.skip_nonfinite_steps", "train.fg_slot_buckets")
GROUPS = (("model.", "model"), ("optim.steps", "schedule"), ("optim.warmup", "schedule"),
          ("optim.gamma", "schedule"), ("optim.", "optimiser"), ("train.global_batch", "batch"),
          ("input.", "input"), ("data.", "data"), ("train.", "train"))


class ConfigChangeError(ValueError, errors.UserError):
  """Resuming a workdir with a config that differs from the saved one."""


def _flat(d, prefix="") -> Dict[str, Any]:
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def changes(saved: dict, current: dict) -> List[Tuple[str, str, Any, Any]]:
  """[(group, key, saved value, current value)] of the keys that matter for a resume."""
  a, b = _flat(saved), _flat(current)
  out = []
  for k in sorted(set(a) & set(b)):
    if k in FREE or a[k] == b[k]:
      continue
    group = next((g for p, g in GROUPS if k.startswith(p)), "other")
    out.append((group, k, a[k], b[k]))
  return out


def check(saved: dict, config, where: str):
  """Raises ConfigChangeError naming every difference (unless allowed); returns them."""
  current = json.loads(config.to_json_best_effort())
  diff = changes(saved, current)
  if diff and not bool(config.train.get("allow_config_change", False)):
    shown = "; ".join(f"{g}: {k} {a!r} -> {b!r}" for g, k, a, b in diff[:8])
    more = f" (+{len(diff) - 8} more)" if len(diff) > 8 else ""
    raise ConfigChangeError(
        f"resuming {where} with a different config: {shown}{more}. Use the saved config, "
        "another --workdir, or --config.train.allow_config_change=True")
  return diff
