"""CenterMask: backbone + FPN + FCOS + SAG-Mask + MaskIoU, wired functionally.

`CenterMask(config)` holds four Flax modules whose variables live side by side under
the centermask2 state-dict prefixes:
  backbone (bottom-up + FPN), proposal_generator.fcos_head, roi_heads.mask_head,
  roi_heads.maskiou_head.
so `variables = {"params": {prefix: ...}, "frozen_bn": {"backbone": ...}}`.

Inputs are NHWC normalised images on a static canvas (multiple of 32) plus per image
`image_hw` (resized size) and `padded_hw` (official detectron2 padded size, multiple
of 32). Images travel as uint8 and are normalised on the device by `normalize` (the one
home of the pixel normalisation, used by training, evaluation and the Predictor).
Outputs are padded arrays with validity masks; see `predict`.
"""
import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections


from centermask_jax.models.fcos import FCOSHead
from centermask_jax.models.fpn import FPN, check_canvas
from centermask_jax.models.mask_head import SAGMaskHead
from centermask_jax.models.maskiou_head import MaskIoUHead
from centermask_jax.ops import fcos_postprocess, normalize, postprocess, roi_align

BACKBONE = "backbone"
FCOS_HEAD = "proposal_generator.fcos_head"
MASK_HEAD = "roi_heads.mask_head"
MASKIOU_HEAD = "roi_heads.maskiou_head"
PARTS = (BACKBONE, FCOS_HEAD, MASK_HEAD, MASKIOU_HEAD)


def build_bottom_up(bcfg) -> Tuple[Any, Tuple[str, str, str]]:
  """Backbone config -> (Flax module named 'bottom_up', names of its C3..C5 outputs)."""
  norm = bcfg.get("norm", "FrozenBN")
  freeze_at = int(bcfg.get("freeze_at", 0) or 0)
  dcn = tuple(bool(v) for v in bcfg.get("stage_with_dcn", (False,) * 4))
  if bcfg.name != "vovnet" and norm != "FrozenBN":
    raise ValueError(f"model.backbone.norm={norm!r} is only supported for VoVNet "
                     f"(backbone {bcfg.name!r} uses FrozenBN)")
  if bcfg.name != "vovnet" and any(dcn):
    raise ValueError(f"model.backbone.stage_with_dcn is only supported for VoVNet "
                     f"(backbone {bcfg.name!r})")
  if bcfg.name == "vovnet":
    from centermask_jax.models.vovnet import VoVNet
    if len(dcn) != 4:
      raise ValueError(f"model.backbone.stage_with_dcn needs 4 entries (stages 2..5), got {dcn}")
    return (VoVNet(bcfg.variant, norm=norm, freeze_at=freeze_at, stage_with_dcn=dcn,
                   dcn_impl=bcfg.get("dcn_impl", "gather"), name="bottom_up"),
            ("stage3", "stage4", "stage5"))
  if bcfg.name == "resnet":
    from centermask_jax.models.resnet import ResNet
    return (ResNet(depth=bcfg.depth, num_groups=bcfg.num_groups,
                   width_per_group=bcfg.width_per_group, stride_in_1x1=bcfg.stride_in_1x1,
                   freeze_at=freeze_at, name="bottom_up"), ("res3", "res4", "res5"))
  if bcfg.name == "mobilenetv2":
    from centermask_jax.models.mobilenet import MobileNetV2
    return MobileNetV2(freeze_at=freeze_at, name="bottom_up"), ("res3", "res4", "res5")
  raise ValueError(f"unknown backbone {bcfg.name!r} (vovnet | resnet | mobilenetv2)")


def sub_variables(variables, part: str):
  """The variables of one part ({collection: tree}) from the full variables."""
  return {col: tree[part] for col, tree in variables.items() if part in tree}


@dataclasses.dataclass
class CenterMask:
  config: ml_collections.ConfigDict  # the full config (uses .model)

  def __post_init__(self):
    m = self.config.model
    bottom_up, in_features = build_bottom_up(m.backbone)
    self.fpn = FPN(bottom_up, in_features, m.fpn_channels)
    self.fcos_head = FCOSHead(m.num_classes, m.fcos.num_convs, tuple(m.fcos.strides),
                              m.fcos.prior_prob)
    self.mask_head = SAGMaskHead(m.num_classes, m.mask_head.num_convs, m.mask_head.conv_dim)
    self.maskiou_head = MaskIoUHead(m.num_classes, m.maskiou_head.num_convs,
                                    m.maskiou_head.conv_dim)
    self.strides = tuple(m.fcos.strides)

  # ---------------------------------------------------------------- init
  def init(self, rng, canvas_hw=(128, 128)) -> Dict[str, Dict[str, Any]]:
    """Random variables (spec init) for every part; canvas only sets trace shapes."""
    m = self.config.model
    r = jax.random.split(rng, 4)
    x = jnp.zeros((1, *canvas_hw, 3), jnp.float32)
    phw = jnp.array([canvas_hw], jnp.int32)
    parts = {}
    parts[BACKBONE] = self.fpn.init(r[0], x, phw)
    feats = jax.eval_shape(lambda: self.fpn.apply(parts[BACKBONE], x, phw)[0])
    feats = [jnp.zeros(feats[k].shape, feats[k].dtype) for k in ("p3", "p4", "p5", "p6", "p7")]
    parts[FCOS_HEAD] = self.fcos_head.init(r[1], feats, phw)
    res = m.mask_head.pooler_resolution
    pooled = jnp.zeros((1, res, res, m.fpn_channels), jnp.float32)
    parts[MASK_HEAD] = self.mask_head.init(r[2], pooled)
    parts[MASKIOU_HEAD] = self.maskiou_head.init(r[3], pooled,
                                                 jnp.zeros((1, 2 * res, 2 * res), jnp.float32))
    out = {}
    for part, v in parts.items():
      for col, tree in v.items():
        if col == "intermediates":
          continue
        out.setdefault(col, {})[part] = tree
    out.setdefault("frozen_bn", {})  # empty when no part has FrozenBN (e.g. a GN backbone)
    return out

  # ---------------------------------------------------------------- stages
  def normalize(self, images, image_hw):
    """uint8 [N, Hc, Wc, 3] -> normalised float32 (config.input pixel_mean / pixel_std),
    zeros outside image_hw [N, 2]; floating input is returned as is (`ops.normalize`)."""
    inp = self.config.input
    return normalize.normalize_images(images, image_hw, inp.pixel_mean, inp.pixel_std)

  def features(self, variables, images, padded_hw):
    """images [N, Hc, Wc, 3] -> ({p3..p7}, bottom-up dict)."""
    check_canvas(images.shape[1:3])
    return self.fpn.apply(sub_variables(variables, BACKBONE), images, padded_hw)

  def fcos(self, variables, fpn_feats, padded_hw):
    """-> (logits, reg, ctrness) lists over P3..P7 (NHWC)."""
    feats = [fpn_feats[k] for k in ("p3", "p4", "p5", "p6", "p7")]
    return self.fcos_head.apply(sub_variables(variables, FCOS_HEAD), feats, padded_hw)

  def pool_rois(self, fpn_feats, boxes, image_hw, padded_hw, skip_empty_levels: bool = False):
    """RoIAlign on P3..P5 by the ratio rule: boxes [N, R, 4] -> (pooled [N, R, S, S, C], levels).
    skip_empty_levels: see `roi_align.multilevel_roi_align` (inference sets it)."""
    mh = self.config.model.mask_head
    levels = roi_align.assign_levels(boxes, image_hw, mh.level_k_min, mh.level_k_max)
    pooled = roi_align.multilevel_roi_align(
        [fpn_feats["p3"], fpn_feats["p4"], fpn_feats["p5"]], boxes, levels, padded_hw,
        strides=self.strides[:3], output_size=mh.pooler_resolution,
        sampling_ratio=mh.sampling_ratio, skip_empty_levels=skip_empty_levels)
    return pooled, levels

  def mask_logits(self, variables, pooled, capture: bool = False, classes=None):
    """pooled [N, R, S, S, C] -> mask logits [N, R, 2S, 2S, num_classes] (+ intermediates);
    with classes int [N, R]: [N, R, 2S, 2S], the logits of those classes only (the
    predictor evaluated for one class per RoI, `mask_head.ClassPredictor`)."""
    n, r = pooled.shape[:2]
    flat = pooled.reshape(n * r, *pooled.shape[2:])
    cls = None if classes is None else classes.reshape(n * r)
    out, state = self.mask_head.apply(sub_variables(variables, MASK_HEAD), flat, cls,
                                      mutable=["intermediates"] if capture else [])
    out = out.reshape(n, r, *out.shape[1:])
    if not capture:
      return out, {}
    inter = {k: v[0].reshape(n, r, *v[0].shape[1:])
             for k, v in state["intermediates"].items()}
    return out, inter

  def maskiou(self, variables, pooled, mask_prob):
    """pooled [N, R, S, S, C], mask_prob [N, R, 2S, 2S] -> IoU per class [N, R, num_classes]."""
    n, r = pooled.shape[:2]
    out = self.maskiou_head.apply(sub_variables(variables, MASKIOU_HEAD),
                                  pooled.reshape(n * r, *pooled.shape[2:]),
                                  mask_prob.reshape(n * r, *mask_prob.shape[2:]))
    return out.reshape(n, r, -1)

  # ---------------------------------------------------------------- inference
  def predict(self, variables, images, image_hw, padded_hw, capture: bool = False):
    """Full inference in resized-image coordinates (before detector_postprocess).

    images [N, Hc, Wc, 3] uint8 (normalised here) or float (normalised); image_hw,
    padded_hw [N, 2] int32. Returns a dict:
      boxes [N, K, 4], scores [N, K], classes [N, K], locations [N, K, 2], valid [N, K],
      roi_levels [N, K], mask_probs [N, K, 28, 28] (predicted class), maskiou [N, K, C],
      mask_scores [N, K];  K = post_nms_topk_test. With capture=True also every
      intermediate the parity tool compares ("inter" sub-dict).
    """
    fc = self.config.model.fcos
    images = self.normalize(images, image_hw)
    fpn_feats, bottom = self.features(variables, images, padded_hw)
    logits, reg, ctr = self.fcos(variables, fpn_feats, padded_hw)
    det = fcos_postprocess.fcos_inference(
        logits, reg, ctr, padded_hw, strides=self.strides, score_thresh=fc.inference_th,
        pre_nms_topk=fc.pre_nms_topk, nms_thresh=fc.nms_th,
        post_nms_topk=fc.post_nms_topk_test, return_intermediates=capture)
    out = self.mask_branch(variables, fpn_feats, det["boxes"], det["classes"], det["scores"],
                           image_hw, padded_hw, capture=capture)
    out.update({k: det[k] for k in ("boxes", "scores", "classes", "locations", "valid")})
    if capture:
      out["inter"].update(fpn_feats)
      out["inter"].update({f"bottom_{k}": v for k, v in bottom.items()})
      out["inter"].update({"fcos_logits": logits, "fcos_reg": reg, "fcos_ctr": ctr})
      out["inter"].update({k: v for k, v in det.items()
                           if k not in ("boxes", "scores", "classes", "locations", "valid")})
    return out

  def mask_branch(self, variables, fpn_feats, boxes, classes, scores, image_hw, padded_hw,
                  capture: bool = False):
    """Mask + MaskIoU heads on given boxes [N, R, 4] with classes/scores [N, R]."""
    pooled, levels = self.pool_rois(fpn_feats, boxes, image_hw, padded_hw,
                                    skip_empty_levels=True)
    if capture:  # every class's logits are a compared stage
      logits, inter = self.mask_logits(variables, pooled, capture=True)
      cls_logits = postprocess.select_class_masks(logits, classes)
    else:
      cls_logits, _ = self.mask_logits(variables, pooled, classes=classes)
    probs = jax.nn.sigmoid(cls_logits)
    iou = self.maskiou(variables, pooled, probs)
    out = {"roi_levels": levels, "mask_probs": probs, "maskiou": iou,
           "mask_scores": postprocess.maskiou_rescore(scores, iou, classes)}
    if capture:
      inter.update({"pooled": pooled, "mask_logits_all": logits, "mask_logits": cls_logits})
      out["inter"] = inter
    return out


def count_values(variables) -> int:
  """Number of scalars in params + frozen_bn (compare with a state dict)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables))
