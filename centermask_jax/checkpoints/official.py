"""Import official centermask2 (.pth) and detectron2 (.pkl) checkpoints into our variables.

Our Flax names mirror the PyTorch module paths ('/' written as ':'), so every leaf
of our variables has exactly one state-dict key (`torch_key`). Import is strict:
missing keys, unexpected keys and shape mismatches are all reported by name in one
`CheckpointMismatchError`.

Layouts (spec §g): conv OIHW -> HWIO, ConvTranspose IOHW -> [kh, kw, I, O],
Linear [out, in] -> [in, out], MaskIoU fc1 rows permuted from NCHW to NHWC
flatten order, GroupNorm weight -> scale, FCOS Scale -> scalar.
"""
import io
import os
import pickle
from typing import Any, Dict, Iterable, Optional, Tuple

import jax
import numpy as np

LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "scalar": "scale"}
DECONV_KEY = "roi_heads.mask_head.deconv.weight"
MASKIOU_FC1_KEY = "roi_heads.maskiou_head.maskiou_fc1.weight"


class CheckpointMismatchError(ValueError):
  """Raised when a checkpoint does not fit the model; the message names every key."""


# ------------------------------------------------------------------------ reading
class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that reconstructs numpy arrays and plain containers only."""
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
      ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f"refusing to unpickle {module}.{name}: detectron2 .pkl checkpoints hold only "
        "numpy arrays")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a .pth (torch, weights_only) or .pkl (numpy-only) checkpoint -> {key: float32}.

  Accepts a bare state dict or a dict with a "model" entry (detectron2 layout).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".pkl"):
    with open(path, "rb") as f:
      obj = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
  else:
    try:
      import torch  # optional dependency: pip install centermask_jax[torch]
    except ImportError as e:
      raise ImportError("reading .pth checkpoints needs PyTorch: "
                        "pip install 'centermask_jax[torch]'") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
    obj = obj["model"]
  if not isinstance(obj, dict):
    raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):  # torch tensor
      v = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
    v = np.asarray(v)
    out[k] = v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
  return out


# ------------------------------------------------------------------------ naming
def torch_key(path: Tuple[str, ...]) -> str:
  """Our variable path (collection, part, ..., leaf) -> state-dict key."""
  segments = list(path[1:])
  leaf = segments[-1]
  if path[0] == "params":
    leaf = LEAF_TO_TORCH.get(leaf, leaf)
  return ".".join(segments[:-1] + [leaf]).replace(":", "/")


def _path_strings(path) -> Tuple[str, ...]:
  return tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)


def flatten_variables(variables) -> Dict[Tuple[str, ...], Any]:
  return {_path_strings(p): v for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


def expected_keys(variables) -> Dict[str, Tuple[int, ...]]:
  """{state-dict key: our leaf shape} for every leaf of our variables."""
  return {torch_key(p): tuple(v.shape) for p, v in flatten_variables(variables).items()}


# ------------------------------------------------------------------------ layouts
def to_ours(key: str, value: np.ndarray, our_shape: Tuple[int, ...]) -> np.ndarray:
  """One state-dict tensor -> our layout."""
  if key == DECONV_KEY:
    return value.transpose(2, 3, 0, 1)
  if key == MASKIOU_FC1_KEY:
    out_f, in_f = value.shape
    cd = in_f // 49
    return value.reshape(out_f, cd, 7, 7).transpose(2, 3, 1, 0).reshape(49 * cd, out_f)
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2 and len(our_shape) == 2:
    return value.T
  return value


def from_ours(key: str, value: np.ndarray) -> np.ndarray:
  """Our layout -> state-dict tensor (inverse of `to_ours`)."""
  value = np.asarray(value)
  if key == DECONV_KEY:
    return value.transpose(2, 3, 0, 1)
  if key == MASKIOU_FC1_KEY:
    in_f, out_f = value.shape
    cd = in_f // 49
    return value.reshape(7, 7, cd, out_f).transpose(3, 2, 0, 1).reshape(out_f, 49 * cd)
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    return value.T
  return value


# ------------------------------------------------------------------------ import
def raise_if_mismatch(source: str, missing, unexpected, bad_shapes):
  """Raises one CheckpointMismatchError naming every missing/unexpected key and bad shape."""
  if not (missing or unexpected or bad_shapes):
    return
  lines = [f"{source} does not match the model:"]
  for title, items in (("missing keys (in the model, not in the checkpoint)", missing),
                       ("unexpected keys (in the checkpoint, not in the model)", unexpected),
                       ("shape mismatches", bad_shapes)):
    if items:
      lines.append(f"  {len(items)} {title}:")
      lines.extend(f"    {k}" for k in items)
  raise CheckpointMismatchError("\n".join(lines))


def load_into(variables, state_dict: Dict[str, np.ndarray], *, prefixes: Optional[Iterable[str]] = None,
              source: str = "checkpoint"):
  """Returns a copy of `variables` with every leaf replaced from `state_dict`.

  prefixes: only leaves whose key starts with one of these are imported (and only
  those state-dict keys are checked), e.g. ("backbone.bottom_up.",) for ImageNet
  initialisation. Raises CheckpointMismatchError naming every missing/unexpected
  key and shape mismatch.
  """
  prefixes = tuple(prefixes) if prefixes else None

  def wanted(k):
    return prefixes is None or k.startswith(prefixes)

  flat = flatten_variables(variables)
  ours = {torch_key(p): p for p in flat if wanted(torch_key(p))}
  theirs = {k for k in state_dict if wanted(k)}
  missing = sorted(set(ours) - theirs)
  unexpected = sorted(theirs - set(ours))
  new_values, bad_shapes = {}, []
  for key in sorted(set(ours) & theirs):
    path = ours[key]
    our_shape = tuple(flat[path].shape)
    theirs_value = np.asarray(state_dict[key])
    value = (to_ours(key, theirs_value, our_shape)
             if theirs_value.size == int(np.prod(our_shape)) else None)
    if value is None or tuple(value.shape) != our_shape:
      bad_shapes.append(f"{key}: checkpoint {theirs_value.shape} vs model "
                        f"{our_shape} (ours, {'HWIO' if len(our_shape) == 4 else 'layout'})")
      continue
    new_values[path] = value.astype(flat[path].dtype)
  raise_if_mismatch(source, missing, unexpected, bad_shapes)

  def replace(path, leaf):
    p = _path_strings(path)
    return new_values.get(p, leaf)

  return jax.tree_util.tree_map_with_path(replace, variables)


def import_checkpoint(variables, path: str, prefixes: Optional[Iterable[str]] = None):
  """Reads `path` (.pth/.pkl) and loads it strictly into `variables`."""
  return load_into(variables, read_state_dict(path), prefixes=prefixes, source=path)


def export_state_dict(variables) -> Dict[str, np.ndarray]:
  """Our variables -> centermask2 state dict (numpy), e.g. to save as .pth/.pkl."""
  return {torch_key(p): from_ours(torch_key(p), v)
          for p, v in flatten_variables(variables).items()}
