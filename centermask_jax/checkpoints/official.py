"""Import official centermask2 (.pth) and detectron2 / Caffe2 (.pkl) checkpoints.

Formats are told apart by content (`read_checkpoint`); Caffe2 blob names are renamed as
detectron2 does (`c2_names`); ImageNet backbone files are matched by key suffix
(`load_backbone`).

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

from centermask_jax import errors

LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "scalar": "scale"}
DECONV_KEY = "roi_heads.mask_head.deconv.weight"
MASKIOU_FC1_KEY = "roi_heads.maskiou_head.maskiou_fc1.weight"


class CheckpointMismatchError(ValueError, errors.UserError):
  """Raised when a checkpoint does not fit the model; the message names every key."""


# ------------------------------------------------------------------------ reading
class CheckpointFormatError(ValueError, errors.UserError):
  """The file is not a checkpoint format we read; the message names what it is."""


ACCEPTED = ("a PyTorch .pth (torch.save: zip or legacy pickle), a detectron2 .pkl "
            "({'model': {name: array}}), a Caffe2/Detectron .pkl ({'blobs': {...}} or "
            "{blob name: array}), a model checkpoint directory or a train.py workdir")
_TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # first object of a pre-1.6 torch.save file


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that reconstructs numpy arrays and plain containers only."""
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
      ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
      ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f"refusing to unpickle {module}.{name}: detectron2 .pkl checkpoints hold only "
        "numpy arrays")


def sniff_format(path: str) -> str:
  """Names the file's format from its first bytes (not its extension).

  Returns "pytorch-zip", "pickle" (a detectron2/Caffe2 .pkl or a legacy torch.save
  file; told apart when read), or a description of another format ("HDF5 (Keras / h5py)",
  "NumPy .npz", "safetensors", "gzip", "text", "empty file", "unknown binary ...").
  """
  with open(path, "rb") as f:
    head = f.read(64)
  if not head:
    return "empty file"
  if head.startswith(b"PK\x03\x04"):
    import zipfile
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile:
      return "damaged zip archive"
    if any(n.endswith("data.pkl") for n in names):
      return "pytorch-zip"
    if names and all(n.endswith(".npy") for n in names):
      return "NumPy .npz"
    return f"zip archive without a torch data.pkl (entries: {', '.join(names[:3])})"
  if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
    return "pickle"
  if head.startswith(b"\x89HDF"):
    return "HDF5 (Keras / h5py)"
  if head.startswith(b"\x93NUMPY"):
    return "NumPy .npy"
  if head.startswith(b"\x1f\x8b"):
    return "gzip"
  if len(head) > 9 and head[8:10] == b'{"':
    return "safetensors"
  if head[:1] in (b"(", b"}", b"]"):  # pickle protocols 0/1
    return "pickle"
  try:
    head.decode("utf-8")
    return "text"
  except UnicodeDecodeError:
    return f"unknown binary (starts with {head[:8]!r})"


def _not_a_checkpoint(path, what):
  return CheckpointFormatError(f"{path} is {what}, not a checkpoint; expected {ACCEPTED}")


# torch.save's typed storage classes -> NumPy dtype names (bfloat16 from ml_dtypes)
_TORCH_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool"}


def _rebuild_tensor(storage, offset, size, stride, *_):
  """torch._utils._rebuild_tensor_v2 for a NumPy storage -> an owned array."""
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


class _UnknownTorchType(pickle.UnpicklingError):
  """A torch global the zip reader does not rebuild (PyTorch itself may)."""


def _more_than_tensors(path, error) -> CheckpointFormatError:
  """The refusal of a PyTorch file whose pickle holds more than tensors."""
  return CheckpointFormatError(f"{path}: refusing to load a PyTorch file that holds more "
                               f"than tensors: {str(error).splitlines()[0]}")


class _TorchZipUnpickler(pickle.Unpickler):
  """data.pkl of a torch.save zip archive -> NumPy arrays, without PyTorch: storages are
  read from the archive's data/ entries; globals other than tensor rebuilding, the typed
  storages and OrderedDict are refused (what torch.load(weights_only=True) accepts for a
  state dict)."""

  def __init__(self, file, archive, prefix: str):
    super().__init__(file, encoding="latin1")
    self._archive, self._prefix, self._storages = archive, prefix, {}

  def find_class(self, module, name):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, *_: data
    if module == "torch" and name in _TORCH_STORAGES:
      return _TORCH_STORAGES[name]
    if (module, name) == ("collections", "OrderedDict"):
      return super().find_class(module, name)
    unknown = _UnknownTorchType if module.split(".")[0] == "torch" else pickle.UnpicklingError
    raise unknown(f"refusing to unpickle {module}.{name}")

  def persistent_load(self, pid):
    kind, dtype, key = pid[0], pid[1], str(pid[2])
    if kind != "storage" or not isinstance(dtype, str):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid[:2]!r}")
    if key not in self._storages:
      if dtype == "bfloat16":
        import ml_dtypes
        dt = np.dtype(ml_dtypes.bfloat16)
      else:
        dt = np.dtype(dtype).newbyteorder("<")
      raw = self._archive.read(f"{self._prefix}data/{key}")
      self._storages[key] = np.frombuffer(raw, dt)
    return self._storages[key]


def _read_torch_zip(path):
  """A torch.save zip archive -> its pickled object with NumPy arrays for tensors (no
  PyTorch needed; little-endian archives, as torch writes them on every common host)."""
  import zipfile
  with zipfile.ZipFile(path) as z:
    pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
    prefix = pkl[:-len("data.pkl")]
    order = f"{prefix}byteorder"
    if order in z.namelist() and z.read(order).strip() != b"little":
      return _torch_load(path)  # a big-endian archive: let PyTorch convert it
    try:
      return _TorchZipUnpickler(io.BytesIO(z.read(pkl)), z, prefix).load()
    except pickle.UnpicklingError as e:
      if isinstance(e, _UnknownTorchType) and _torch_importable():
        return _torch_load(path)  # a torch type this reader does not know: PyTorch's own
      raise _more_than_tensors(path, e) from None


def _torch_importable() -> bool:
  import importlib.util
  try:
    return importlib.util.find_spec("torch") is not None
  except ValueError:  # torch in sys.modules as None (import disabled)
    return False


def _torch_load(path):
  try:
    import torch  # optional dependency: pip install centermask_jax[torch]
  except ImportError as e:
    raise ImportError(f"{path} is a PyTorch checkpoint; reading it needs PyTorch: "
                      "pip install 'centermask_jax[torch]'") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise _more_than_tensors(path, e) from None


def _unpickle_numpy(path):
  with open(path, "rb") as f:
    data = f.read()
  try:
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
  except pickle.UnpicklingError as e:
    raise CheckpointFormatError(f"{path}: {e}") from None
  except Exception as e:  # noqa: BLE001 - truncated / not really a pickle
    raise _not_a_checkpoint(path, f"an unreadable pickle ({type(e).__name__}: {e})") from None


def _is_tensor_dict(obj) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and all(
      hasattr(v, "shape") for v in obj.values())


def read_checkpoint(path: str) -> Tuple[str, Dict[str, np.ndarray]]:
  """Reads an official checkpoint, format detected by content -> (format, {key: array}).

  format: "pytorch" (.pth, zip or legacy; a bare state dict or {"model"/"state_dict":
  ...}), "detectron2-pkl" ({"model": {name: array}}, names as in PyTorch) or
  "caffe2-pkl" (Caffe2 / Detectron: {"blobs": {...}} or a flat {blob: array} dict, blob
  names renamed as detectron2 does, `*_momentum` dropped; see `c2_names`). Floating
  arrays become float32. Pickles may hold numpy arrays only (anything else is refused);
  a file of any other format raises CheckpointFormatError naming that format.
  """
  from centermask_jax.checkpoints import c2_names
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  kind = sniff_format(path)
  if kind == "pytorch-zip":
    fmt, obj = "pytorch", _read_torch_zip(path)
  elif kind == "pickle":
    obj = _unpickle_numpy(path)
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
      fmt, obj = "pytorch", _torch_load(path)
    elif isinstance(obj, dict) and isinstance(obj.get("blobs"), dict):
      fmt, obj = "caffe2-pkl", obj["blobs"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
      fmt, obj = "detectron2-pkl", obj["model"]
      if obj and c2_names.looks_like_caffe2(obj):
        fmt = "caffe2-pkl"
    elif _is_tensor_dict(obj):
      fmt = "caffe2-pkl" if c2_names.looks_like_caffe2(obj) else "detectron2-pkl"
    else:
      raise _not_a_checkpoint(path, f"a pickle of {type(obj).__name__} without arrays")
  else:
    raise _not_a_checkpoint(path, "a file of format: " + kind)
  if fmt == "pytorch" and isinstance(obj, dict):
    for wrapper in ("model", "state_dict"):
      if isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
        break
  if not _is_tensor_dict(obj):
    raise _not_a_checkpoint(path, f"a {fmt} file whose content is not a {{name: tensor}} dict")
  if fmt == "caffe2-pkl":
    obj = c2_names.convert_blobs(obj)
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):  # torch tensor
      v = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
    v = np.asarray(v)
    out[k] = v.astype(np.float32) if jax.numpy.issubdtype(v.dtype, jax.numpy.floating) else v
  return fmt, out


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """`read_checkpoint` without the format: {detectron2 key: array}."""
  return read_checkpoint(path)[1]


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


def strict_like(template, restored, source: str):
  """`restored` cast to `template`'s dtypes after checking it has exactly its keys and
  shapes (CheckpointMismatchError naming every difference)."""
  want = expected_keys(template)
  got = expected_keys(restored)
  raise_if_mismatch(
      source, sorted(set(want) - set(got)), sorted(set(got) - set(want)),
      [f"{k}: checkpoint {got[k]} vs model {want[k]}"
       for k in sorted(set(want) & set(got)) if want[k] != got[k]])
  return jax.tree_util.tree_map(lambda t, r: np.asarray(r, t.dtype), template, restored)


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


FROZEN_BN_DEFAULTS = {"running_mean": 0.0, "running_var": 1.0}


def align_backbone(expected: Dict[str, Tuple[int, ...]], state_dict: Dict[str, np.ndarray],
                   prefix: str = "backbone.bottom_up."):
  """Matches checkpoint keys to our `prefix` keys as detectron2 does for ImageNet files.

  expected: {our state-dict key: shape} (e.g. `expected_keys(variables)`). A checkpoint
  key k matches our key K when K == k or K ends with "." + k (so bare ImageNet names,
  `backbone.bottom_up.` names and renamed Caffe2 blobs all match); the longest match
  wins; a leading "module." (DataParallel) is dropped first. FrozenBN `running_mean` /
  `running_var` the file lacks are set to 0 / 1, as detectron2's FrozenBatchNorm2d
  does for state dicts without version metadata (Caffe2 files hold only `_s`/`_b`).
  Returns ({our key: array}, filled: our keys set to defaults, unused: checkpoint keys
  matching none of ours). Raises CheckpointMismatchError if a checkpoint key matches two
  of ours.
  """
  sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
  out, source, filled = {}, {}, []
  for key in sorted(k for k in expected if k.startswith(prefix)):
    parts = key.split(".")
    match = next((".".join(parts[i:]) for i in range(len(parts))
                  if ".".join(parts[i:]) in sd), None)
    if match is None:
      leaf_owner, leaf = key.rsplit(".", 1)
      if leaf in FROZEN_BN_DEFAULTS and f"{leaf_owner}.weight" in expected:
        out[key] = np.full(expected[key], FROZEN_BN_DEFAULTS[leaf], np.float32)
        filled.append(key)
      continue
    if match in source:
      raise CheckpointMismatchError(
          f"checkpoint key {match} matches two model keys: {source[match]} and {key}")
    out[key], source[match] = sd[match], key
  unused = sorted(set(sd) - set(source))
  return out, filled, unused


def load_backbone(variables, state_dict: Dict[str, np.ndarray], source: str = "checkpoint",
                  prefix: str = "backbone.bottom_up."):
  """ImageNet initialisation: `prefix` leaves from `state_dict` (see `align_backbone`),
  strictly (a backbone key the file lacks, other than FrozenBN statistics, or a shape
  mismatch raises CheckpointMismatchError naming it); everything else keeps its value.
  Returns (variables, filled keys, unused checkpoint keys)."""
  aligned, filled, unused = align_backbone(expected_keys(variables), state_dict, prefix)
  return (load_into(variables, aligned, prefixes=(prefix,), source=source), filled, unused)


def export_state_dict(variables) -> Dict[str, np.ndarray]:
  """Our variables -> centermask2 state dict (numpy), e.g. to save as .pth/.pkl."""
  return {torch_key(p): from_ours(torch_key(p), v)
          for p, v in flatten_variables(variables).items()}
