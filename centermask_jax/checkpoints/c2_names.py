"""Caffe2 / Detectron blob names -> detectron2 state-dict names.

detectron2 (`checkpoint/c2_model_loading.py`) renames the blobs of MSRA/FAIR ImageNet
`.pkl` files (`conv1_w`, `res_conv1_bn_s`, `res2_0_branch2a_w`, `fc1000_b`, ...) before
matching them to a model by key suffix. This module applies the same renames, in the
same order, as an ordered table of regular-expression rules:

  res2_0_branch2a_bn_s -> res2.0.conv1.norm.weight
  res_conv1_bn_b       -> stem.conv1.norm.bias
  conv1_w              -> stem.conv1.weight
  res3_0_branch1_w     -> res3.0.shortcut.weight

Only names change here; detectron2 additionally drops/moves background-class rows of
Fast R-CNN / Mask R-CNN predictor blobs, which no CenterMask key receives.
"""
import re
from typing import Dict, Iterable, Tuple

# (pattern, replacement) applied with re.sub to every name, in this order, after
# "pred_w"/"pred_b" -> "linear_w"/"linear_b" and "_" -> ".".
_BASIC: Tuple[Tuple[str, str], ...] = (
    (r"\.b$", ".bias"),
    (r"\.w$", ".weight"),
    # batch / group norm parameters and statistics -> "norm.*"
    (r"bn\.s$", "norm.weight"),
    (r"bn\.bias$", "norm.bias"),
    (r"bn\.rm", "norm.running_mean"),
    (r"bn\.running\.mean$", "norm.running_mean"),
    (r"bn\.riv$", "norm.running_var"),
    (r"bn\.running\.var$", "norm.running_var"),
    (r"bn\.gamma$", "norm.weight"),
    (r"bn\.beta$", "norm.bias"),
    (r"gn\.s$", "norm.weight"),
    (r"gn\.bias$", "norm.bias"),
    # stem: res_conv1_bn_* and conv1_* live under stem.conv1
    (r"^res\.conv1\.norm\.", "conv1.norm."),
    (r"^conv1\.", "stem.conv1."),
    # bottleneck branches
    (r"\.branch1\.", ".shortcut."),
    (r"\.branch2a\.", ".conv1."),
    (r"\.branch2b\.", ".conv2."),
    (r"\.branch2c\.", ".conv3."),
    # DensePose heads
    (r"^body\.conv\.fcn", "body_conv_fcn"),
    (r"AnnIndex\.lowres", "ann_index_lowres"),
    (r"Index\.UV\.lowres", "index_uv_lowres"),
    (r"U\.lowres", "u_lowres"),
    (r"V\.lowres", "v_lowres"),
)

# Detectron (detection model) blobs: RPN, box head, mask head, keypoint head.
_DETECTION: Tuple[Tuple[str, str], ...] = (
    (r"conv\.rpn\.fpn2", "proposal_generator.rpn_head.conv"),
    (r"conv\.rpn", "proposal_generator.rpn_head.conv"),
    (r"rpn\.bbox\.pred\.fpn2", "proposal_generator.rpn_head.anchor_deltas"),
    (r"rpn\.cls\.logits\.fpn2", "proposal_generator.rpn_head.objectness_logits"),
    (r"rpn\.bbox\.pred", "proposal_generator.rpn_head.anchor_deltas"),
    (r"rpn\.cls\.logits", "proposal_generator.rpn_head.objectness_logits"),
    (r"^bbox\.pred", "bbox_pred"),
    (r"^cls\.score", "cls_score"),
    (r"^fc6\.", "box_head.fc1."),
    (r"^fc7\.", "box_head.fc2."),
    (r"^head\.conv", "box_head.conv"),
)
_MASK_KEYPOINT: Tuple[Tuple[str, str], ...] = (
    (r"\.\[mask\]\.fcn", "mask_head.mask_fcn"),
    (r"^\.mask\.fcn", "mask_head.mask_fcn"),
    (r"mask\.fcn\.logits", "mask_head.predictor"),
    (r"conv5\.mask", "mask_head.deconv"),
    (r"conv\.fcn", "roi_heads.keypoint_head.conv_fcn"),
    (r"kps\.score\.lowres", "roi_heads.keypoint_head.score_lowres"),
    (r"kps\.score\.", "roi_heads.keypoint_head.score."),
)
_FIXED = {"pred_b": "linear_b", "pred_w": "linear_w"}
_FPN_INNER = re.compile(r"^fpn\.inner\.res(\d+)\.")
_FPN_OUTPUT = re.compile(r"^fpn\.res(\d+)\.")


def _fpn(name: str) -> str:
  """fpn.inner.res3.3.sum.lateral.weight -> fpn_lateral3.weight; fpn.res3.3.sum.weight ->
  fpn_output3.weight (".norm" kept when the blob is a norm's)."""
  parts = name.split(".")
  norm = ".norm" if "norm" in parts else ""
  for pattern, kind in ((_FPN_INNER, "lateral"), (_FPN_OUTPUT, "output")):
    m = pattern.match(name)
    if m:
      return f"fpn_{kind}{int(m.group(1))}{norm}.{parts[-1]}"
  return name


def _apply(name: str, rules) -> str:
  for pattern, repl in rules:
    name = re.sub(pattern, repl, name)
  return name


def convert_name(blob: str) -> str:
  """One Caffe2 blob name -> its detectron2 name."""
  name = _FIXED.get(blob, blob).replace("_", ".")
  name = _apply(name, _BASIC)
  name = _apply(name, _DETECTION)
  name = _fpn(name)
  return _apply(name, _MASK_KEYPOINT)


def convert_blobs(blobs: Dict[str, object]) -> Dict[str, object]:
  """{Caffe2 blob name: array} -> {detectron2 name: array}.

  Optimiser state (`*_momentum`) is dropped, as detectron2 does when reading a Caffe2
  file. Raises ValueError if two blobs map to one name.
  """
  out, source = {}, {}
  for blob in sorted(blobs):
    if blob.endswith("_momentum"):
      continue
    name = convert_name(blob)
    if name in out:
      raise ValueError(f"Caffe2 blobs {source[name]!r} and {blob!r} both map to {name!r}")
    out[name], source[name] = blobs[blob], blob
  return out


def looks_like_caffe2(keys: Iterable[str]) -> bool:
  """True for Caffe2 blob names (no '.' anywhere, e.g. `res2_0_branch2a_w`), False for
  PyTorch state-dict keys (dotted module paths)."""
  keys = list(keys)
  return bool(keys) and not any("." in k for k in keys)

