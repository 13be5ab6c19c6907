"""ImageNet initialisation as centermask2 does it: vovnet-detectron2 `.pth` files and
detectron2's MSRA/FAIR Caffe2 `.pkl` files (`{"blobs": ...}` or flat), format detected by
content, Caffe2 blob names renamed as detectron2's c2_model_loading, keys matched by
suffix, FrozenBN statistics absent from the file set to 0 / 1, other formats and
non-numpy pickles refused with one error naming them.

The synthetic files are written here from the official key listings
(`../shared/fixtures/state_dict_keys/`) and a Caffe2 naming written independently below.
"""
import io
import os
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centermask_jax.checkpoints import c2_names, official
from centermask_jax.models import resnet, vovnet
from conftest import STATE_DICT_KEYS, require

PREFIX = "backbone.bottom_up."


def _listing(name):
  """{key below backbone.bottom_up.: shape} of one official state-dict listing."""
  out = {}
  for line in require(STATE_DICT_KEYS / f"{name}.tsv").read_text().splitlines()[1:]:
    key, shape = line.split("\t")[:2]
    if key.startswith(PREFIX):
      out[key[len(PREFIX):]] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
  return out


def _caffe2_blob(key):
  """detectron2 ResNet key -> the MSRA / FAIR Caffe2 blob name (None: not in such files).

  Caffe2 names (Detectron model zoo): stem conv `conv1_w`, its affine `res_conv1_bn_{s,b}`;
  block j of stage n `res{n}_{j}_branch2{a,b,c}_w` (+ `_bn_s`, `_bn_b`), projection
  shortcut `res{n}_{j}_branch1_*`. Caffe2's AffineChannel has no running statistics.
  """
  if key.endswith(("running_mean", "running_var")):
    return None
  suffix = {"weight": "w", "norm.weight": "bn_s", "norm.bias": "bn_b"}
  m = re.fullmatch(r"stem\.conv1\.(weight|norm\.weight|norm\.bias)", key)
  if m:
    return ("conv1_" if m.group(1) == "weight" else "res_conv1_") + suffix[m.group(1)]
  m = re.fullmatch(r"res(\d)\.(\d+)\.(conv1|conv2|conv3|shortcut)\.(weight|norm\.weight|"
                   r"norm\.bias)", key)
  assert m, key
  branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c",
            "shortcut": "branch1"}[m.group(3)]
  return f"res{m.group(1)}_{m.group(2)}_{branch}_{suffix[m.group(4)]}"


# ------------------------------------------------------------------- names vs listings
@pytest.mark.parametrize("name", ["centermask_R_50_FPN_ms_3x", "centermask_R_101_FPN_ms_3x",
                                  "centermask_X_101_FPN_ms_3x"])
def test_caffe2_names_reach_every_listed_resnet_key(name):
  """Every blob of an MSRA/FAIR ImageNet file renames to its listed key; the FrozenBN
  statistics (absent in Caffe2) are exactly the keys set to 0 / 1; the classifier and
  momentum blobs are left out."""
  listing = _listing(name)
  blobs = {_caffe2_blob(k): np.broadcast_to(np.float32(1), s)
           for k, s in listing.items() if _caffe2_blob(k)}
  blobs.update({"fc1000_w": np.zeros((1000, 2048), np.float32), "fc1000_b": np.zeros(1000),
                "res2_0_branch2a_w_momentum": np.zeros(1)})
  renamed = c2_names.convert_blobs(blobs)
  assert set(renamed) == {k for k in listing if _caffe2_blob(k)} | {"fc1000.weight",
                                                                    "fc1000.bias"}
  expected = {PREFIX + k: s for k, s in listing.items()}
  aligned, filled, unused = official.align_backbone(expected, renamed)
  assert set(aligned) == set(expected)
  assert set(filled) == {PREFIX + k for k in listing if k.endswith(("running_mean",
                                                                     "running_var"))}
  assert len(filled) == 2 * sum(k.endswith("norm.weight") for k in listing)
  assert unused == ["fc1000.bias", "fc1000.weight"]
  for k in filled:
    want = 0.0 if k.endswith("running_mean") else 1.0
    np.testing.assert_array_equal(aligned[k], np.full(expected[k], want, np.float32))


def test_caffe2_renames_of_detection_blobs():
  """detectron2's renames beyond the backbone (facts of c2_model_loading)."""
  cases = {
      "pred_w": "linear.weight", "res5_2_branch2c_bn_riv": "res5.2.conv3.norm.running_var",
      "res4_5_branch2b_gn_s": "res4.5.conv2.norm.weight",
      "fpn_inner_res3_3_sum_lateral_w": "fpn_lateral3.weight",
      "fpn_res4_5_sum_b": "fpn_output4.bias",
      "conv_rpn_fpn2_w": "proposal_generator.rpn_head.conv.weight",
      "rpn_bbox_pred_fpn2_b": "proposal_generator.rpn_head.anchor_deltas.bias",
      "fc6_w": "box_head.fc1.weight", "cls_score_b": "cls_score.bias",
      "conv5_mask_w": "mask_head.deconv.weight",
      "mask_fcn_logits_w": "mask_head.predictor.weight",
  }
  for blob, want in cases.items():
    assert c2_names.convert_name(blob) == want, blob
  with pytest.raises(ValueError, match="both map to"):
    c2_names.convert_blobs({"conv1_w": 1, "conv1.w": 2})


# ----------------------------------------------------------------- files into our model
def _backbone_template(module, collection_root=("backbone", "bottom_up")):
  """Zero variables of `module` nested under backbone.bottom_up (as inside CenterMask)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                          jnp.array([[64, 64]], jnp.int32))
  out = {}
  for col, tree in shapes.items():
    tree = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)
    for part in reversed(collection_root):
      tree = {part: tree}
    out[col] = tree
  return out


@pytest.mark.parametrize("layout", ["blobs", "flat"])
def test_caffe2_pkl_into_resnet(tmp_path, layout):
  """A synthetic MSRA-style (`{"blobs": ...}`) or FAIR-style (flat) Caffe2 .pkl of a small
  ResNeXt: every conv kernel is its OIHW blob in HWIO, each FrozenBN weight/bias its
  `_bn_s`/`_bn_b`, running_mean 0 and running_var 1; the extension plays no part."""
  module = resnet.ResNet(depth=50, num_groups=2, width_per_group=2, stride_in_1x1=False)
  template = _backbone_template(module)
  expected = official.expected_keys(template)
  rng = np.random.default_rng(0)
  blobs = {}
  for key, shape in expected.items():
    blob = _caffe2_blob(key[len(PREFIX):])
    if blob:
      torch_shape = shape if len(shape) != 4 else (shape[3], shape[2], shape[0], shape[1])
      blobs[blob] = rng.standard_normal(torch_shape).astype(np.float32)
  blobs["fc1000_w"] = rng.standard_normal((1000, 2048)).astype(np.float32)
  blobs["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])
  content = {"blobs": blobs} if layout == "blobs" else blobs
  path = tmp_path / "R-50.weights"  # no telling extension
  path.write_bytes(pickle.dumps(content, protocol=2))

  fmt, sd = official.read_checkpoint(str(path))
  assert fmt == "caffe2-pkl"
  got, filled, unused = official.load_backbone(template, sd, str(path))
  assert unused == ["fc1000.weight"]
  flat = official.flatten_variables(got)
  assert len(filled) == 2 * sum(1 for p in flat if p[0] == "frozen_bn" and p[-1] == "weight")
  for p, v in flat.items():
    key = official.torch_key(p)
    blob = _caffe2_blob(key[len(PREFIX):])
    if blob is None:
      want = 0.0 if p[-1] == "running_mean" else 1.0
      np.testing.assert_array_equal(v, np.full(v.shape, want, np.float32), err_msg=key)
    elif v.ndim == 4:
      np.testing.assert_array_equal(v, blobs[blob].transpose(2, 3, 1, 0), err_msg=key)
    else:
      np.testing.assert_array_equal(v, blobs[blob], err_msg=key)

  del blobs["res3_0_branch1_bn_s"]  # strict: a missing (non-statistics) key is named
  path.write_bytes(pickle.dumps(content, protocol=2))
  with pytest.raises(official.CheckpointMismatchError, match="res3.0.shortcut.norm.weight"):
    official.load_backbone(template, official.read_state_dict(str(path)), str(path))


@pytest.mark.parametrize("legacy", [False, True])
def test_vovnet_pth_into_vovnet(tmp_path, legacy):
  """A vovnet-detectron2-style ImageNet .pth (keys as in the V-19-slim-DW listing below
  `backbone.bottom_up.`, fp16 values, BN statistics, num_batches_tracked and a classifier;
  DataParallel `module.` prefix), zip or legacy torch.save, named .pkl: loads exactly."""
  torch = pytest.importorskip("torch")
  listing = _listing("centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x")
  template = _backbone_template(vovnet.VoVNet("V-19-slim-dw-eSE"))
  gen = torch.Generator().manual_seed(0)
  sd = {}
  for k, s in listing.items():
    sd["module." + k] = torch.randn(s, generator=gen).half()
    if k.endswith("running_var"):
      sd["module." + k] = sd["module." + k].abs() + 0.5
      sd["module." + k[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(7)
  sd["module.classifier.weight"] = torch.randn(1000, 1024, generator=gen)
  path = tmp_path / "vovnet19_slim_dw.pkl"
  torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
  assert zipfile.is_zipfile(path) != legacy

  fmt, read = official.read_checkpoint(str(path))
  assert fmt == "pytorch"
  got, filled, unused = official.load_backbone(template, read, str(path))
  assert filled == []
  assert unused == sorted(k[len("module."):] for k in sd if k.endswith(
      ("num_batches_tracked", "classifier.weight")))
  flat = official.flatten_variables(got)
  assert {official.torch_key(p)[len(PREFIX):] for p in flat} == set(listing)
  for p, v in flat.items():
    key = official.torch_key(p)[len(PREFIX):]
    ref = sd["module." + key].float().numpy()
    if ref.ndim == 4:
      ref = ref.transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(v, ref, err_msg=key)


def test_zip_pth_read_without_pytorch(tmp_path, monkeypatch):
  """torch.save zip archives are read without importing PyTorch: every dtype a state dict
  holds, tensors sharing one storage at offsets, non-contiguous views and Parameters come
  back equal to torch.load's (bfloat16 / float64 widened or narrowed to float32 only by
  read_checkpoint's float32 rule)."""
  torch = pytest.importorskip("torch")
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=gen)
  sd = {"a.weight": torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=gen)),
        "b.half": torch.randn(7, generator=gen).half(),
        "b.bf16": torch.randn(5, generator=gen).bfloat16(),
        "b.double": torch.randn(2, 2, generator=gen).double(),
        "c.rows": base[2:4],           # shares base's storage, at an offset
        "c.t": base.t(),               # non-contiguous view of it
        "c.base": base,
        "d.count": torch.tensor(7), "d.mask": torch.tensor([True, False]),
        "d.idx": torch.arange(5, dtype=torch.int32)}
  path = tmp_path / "m.pth"
  torch.save({"model": sd, "iteration": 3}, path)
  want = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in sd.items()}
  other = tmp_path / "complex.pth"  # a storage type this reader does not know
  torch.save({"z": torch.ones(2, dtype=torch.complex64)}, other)
  assert official.read_checkpoint(str(other))[1]["z"].dtype == np.complex64  # via torch
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch now fails
  fmt, got = official.read_checkpoint(str(path))
  assert fmt == "pytorch" and set(got) == set(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  with pytest.raises(official.CheckpointFormatError, match="refusing to unpickle torch.Complex"):
    official.read_checkpoint(str(other))


# ------------------------------------------------------------------------- refusals
class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def _npz_bytes():
  buf = io.BytesIO()
  np.savez(buf, a=np.zeros(3))
  return buf.getvalue()


@pytest.mark.parametrize("content,what", [
    (b"", "empty file"),
    (b"model weights, see README\n", "text"),
    (b"\x89HDF\r\n\x1a\n" + bytes(100), "HDF5"),
    (None, "NumPy .npz"),
    ((8).to_bytes(8, "little") + b'{"a": {}}', "safetensors"),
    (b"\x1f\x8b\x08\x00" + bytes(20), "gzip"),
    (pickle.dumps([1, 2, 3]), "pickle of list"),
    (pickle.dumps({"model": {"a": 1}}), "not a {name: tensor} dict"),
])
def test_other_formats_are_named(tmp_path, content, what):
  path = tmp_path / "weights.pth"
  path.write_bytes(_npz_bytes() if content is None else content)
  with pytest.raises(official.CheckpointFormatError) as e:
    official.read_checkpoint(str(path))
  msg = str(e.value)
  assert what in msg and str(path) in msg and "Caffe2/Detectron .pkl" in msg
  assert "\n" not in msg


def test_malicious_pickles_are_refused(tmp_path):
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"blobs": {"conv1_w": _Evil()}}, protocol=2))
  with pytest.raises(official.CheckpointFormatError, match=r"refusing to unpickle (posix|nt)\.system"):
    official.read_checkpoint(str(path))
  torch = pytest.importorskip("torch")
  torch.save({"x": _Evil()}, tmp_path / "evil.pth")
  with pytest.raises(official.CheckpointFormatError, match="refusing to load a PyTorch file"):
    official.read_checkpoint(str(tmp_path / "evil.pth"))
