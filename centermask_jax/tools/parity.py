"""Stage-by-stage parity against official centermask2 fixtures.

  python -m centermask_jax.tools.parity --config configs/NAME.py --fixture DIR [--canvas H,W]
      [--train]

Loads DIR/model_random_fp16.pth through the importer, runs DIR/inputs.npz and compares
every stage stored in eval_outputs.npz and given_boxes_outputs.npz with the tolerances
of the fixtures README §7. Prints one line per stage and exits 1 if any stage fails.
`--canvas` runs the images on a larger static canvas (padding exactness check).
`--train` compares the training targets, RoIs and losses with train_outputs.npz instead
(see `parity_train`).
"""
import argparse
import dataclasses
import os
import sys
from typing import Dict, List, Optional

import numpy as np

# Parity is a float32 exactness check: use full-precision matmuls on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from centermask_jax.config import load_config  # noqa: E402
from centermask_jax.checkpoints import official  # noqa: E402
from centermask_jax.models.centermask import CenterMask  # noqa: E402
from centermask_jax.ops import postprocess  # noqa: E402
from centermask_jax.predictor import image_instances  # noqa: E402

LEVELS = ("p3", "p4", "p5", "p6", "p7")
# Pasted-mask tolerance: pixels whose interpolated value sits at the 0.5 threshold may
# flip between float implementations (fixtures README §7).
MAX_FLIPPED_PIXELS_PER_INSTANCE = 8


@dataclasses.dataclass
class Line:
  stage: str
  err: float
  rel: float
  tol: str
  ok: bool
  note: str = ""

  def __str__(self):
    status = "PASS" if self.ok else "FAIL"
    return (f"{status}  {self.stage:42s} max_abs={self.err:.3g} max_rel={self.rel:.3g} "
            f"tol={self.tol}{'  ' + self.note if self.note else ''}")


class Report:
  def __init__(self):
    self.lines: List[Line] = []

  def add(self, line: Line):
    self.lines.append(line)
    print(line, flush=True)

  def close(self, stage, ours, ref, atol, rtol_of_max=None, note=""):
    """|ours - ref| <= atol (+ rtol_of_max * max|ref|) elementwise."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
      self.add(Line(stage, np.inf, np.inf, "shape", False, f"shape {ours.shape} vs {ref.shape}"))
      return
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    tol = atol + (rtol_of_max or 0.0) * scale
    err = float(np.abs(ours - ref).max()) if ref.size else 0.0
    tol_s = f"{tol:.3g}" if rtol_of_max is None else f"{rtol_of_max:g}*max|x|={tol:.3g}"
    self.add(Line(stage, err, err / scale if scale else err, tol_s, bool(err <= tol), note))

  def exact(self, stage, ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    ok = ours.shape == ref.shape and bool(np.all(ours == ref))
    n = int(np.sum(ours != ref)) if ours.shape == ref.shape else -1
    self.add(Line(stage, float(n), 0.0, "exact", ok,
                  "" if ok else f"{n} differ" if n >= 0 else f"shape {ours.shape} vs {ref.shape}"))

  @property
  def failed(self):
    return [l for l in self.lines if not l.ok]


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _canonical(boxes, scores, classes):
  """Order detections as a set: by class, then box coordinates (rounded), then score."""
  b = np.round(np.asarray(boxes, np.float64), 2)
  order = np.lexsort((np.asarray(scores), b[:, 3], b[:, 2], b[:, 1], b[:, 0], np.asarray(classes)))
  return order


def compare_candidate_set(rep: Report, tag, ours: Dict[str, np.ndarray], ref: Dict[str, np.ndarray]):
  """Pre-/post-NMS candidate sets (order is implementation-defined, compare as sets)."""
  v = ours["valid"]
  o = {k: ours[k][v] for k in ("boxes", "scores", "classes")}
  if len(o["scores"]) != len(ref["scores"]):
    rep.add(Line(f"{tag}_count", abs(len(o["scores"]) - len(ref["scores"])), 0, "exact", False,
                 f"{len(o['scores'])} vs {len(ref['scores'])}"))
    return
  rep.exact(f"{tag}_count", len(o["scores"]), len(ref["scores"]))
  oi = _canonical(o["boxes"], o["scores"], o["classes"])
  ri = _canonical(ref["boxes"], ref["scores"], ref["classes"])
  rep.exact(f"{tag}_classes", o["classes"][oi], ref["classes"][ri])
  rep.close(f"{tag}_boxes", o["boxes"][oi], ref["boxes"][ri], atol=1e-3)
  rep.close(f"{tag}_scores", o["scores"][oi], ref["scores"][ri], atol=1e-5)


def compare_final(rep: Report, tag, boxes, scores, classes, mask_scores, masks, ref, prefix):
  rep.close(f"{tag}_boxes", boxes, ref[f"{prefix}_boxes"], atol=1e-3)
  rep.close(f"{tag}_scores", scores, ref[f"{prefix}_scores"], atol=1e-5)
  rep.exact(f"{tag}_classes", classes, ref[f"{prefix}_classes"])
  rep.close(f"{tag}_mask_scores", mask_scores, ref[f"{prefix}_mask_scores"], atol=1e-5,
            rtol_of_max=1e-5)
  shape = tuple(ref[f"{prefix}_masks_shape"])
  ref_masks = np.unpackbits(ref[f"{prefix}_masks_packed"], axis=-1)[..., :shape[2]].astype(bool)
  if masks.shape != ref_masks.shape:
    rep.add(Line(f"{tag}_masks", np.inf, np.inf, "shape", False, f"{masks.shape} vs {ref_masks.shape}"))
    return
  flips = np.sum(masks != ref_masks, axis=(1, 2))
  rep.add(Line(f"{tag}_masks_flipped_pixels", float(flips.max(initial=0)), 0.0,
               f"<={MAX_FLIPPED_PIXELS_PER_INSTANCE}/instance",
               bool(flips.max(initial=0) <= MAX_FLIPPED_PIXELS_PER_INSTANCE),
               f"total {int(flips.sum())} of {ref_masks.sum()} fg pixels"))


def load_model(config_path: str, fixture: str):
  cfg = load_config(config_path)
  model = CenterMask(cfg)
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
  template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
  variables = official.import_checkpoint(template, os.path.join(fixture, "model_random_fp16.pth"))
  return cfg, model, variables


def fixture_images(inp, canvas: Optional[tuple] = None):
  """inputs.npz -> (images [N, Hc, Wc, 3] on the canvas, with garbage outside the official
  padded region when a canvas is given, image_hw [N, 2], orig_hw [N, 2], padded_hw [N, 2])."""
  x = inp["images_tensor"].transpose(0, 2, 3, 1).astype(np.float32)
  n, hp, wp, _ = x.shape
  ch, cw = canvas or (hp, wp)
  if ch < hp or cw < wp:
    raise ValueError(f"canvas {ch}x{cw} smaller than the official padded size {hp}x{wp}")
  images = np.zeros((n, ch, cw, 3), np.float32)
  images[:, :hp, :wp] = x
  if canvas:  # garbage outside the official region must not matter
    images[:, hp:, :] = 77.0
    images[:, :, wp:] = -55.0
  image_hw = jnp.asarray(inp["image_sizes"], jnp.int32)
  orig_hw = np.asarray(inp["orig_sizes"])
  padded_hw = jnp.asarray([[hp, wp]] * n, jnp.int32)
  return images, image_hw, orig_hw, padded_hw


def run(config_path: str, fixture: str, canvas: Optional[tuple] = None,
        train: bool = False) -> Report:
  """Inference stages (eval_outputs / given_boxes_outputs) or, with `train`, the
  training stages of train_outputs.npz (`parity_train.run_train`)."""
  cfg, model, variables = load_model(config_path, fixture)
  inp = np.load(os.path.join(fixture, "inputs.npz"))
  images, image_hw, orig_hw, padded_hw = fixture_images(inp, canvas)
  n, ch, cw, _ = images.shape
  hp, wp = (int(v) for v in padded_hw[0])
  if train:
    from centermask_jax.tools import parity_train
    rep = Report()
    print(f"config={cfg.name} fixture={fixture} images={n} padded={hp}x{wp} canvas={ch}x{cw} "
          "mode=train")
    parity_train.run_train(rep, cfg, model, variables, images, image_hw, padded_hw, fixture)
    return rep
  ev = np.load(os.path.join(fixture, "eval_outputs.npz"))
  gb_path = os.path.join(fixture, "given_boxes_outputs.npz")
  gb = np.load(gb_path) if os.path.exists(gb_path) else None

  rep = Report()
  print(f"config={cfg.name} fixture={fixture} images={n} padded={hp}x{wp} canvas={ch}x{cw}")
  predict = jax.jit(lambda v, im, ihw, phw: model.predict(v, im, ihw, phw, capture=True))
  out = jax.device_get(predict(variables, jnp.asarray(images), image_hw, padded_hw))
  inter = out["inter"]

  # --- dense maps ----------------------------------------------------------
  dense = {f"backbone_{k[len('bottom_'):]}": v for k, v in inter.items() if k.startswith("bottom_")}
  dense.update({f"fpn_{k}": inter[k] for k in LEVELS})
  for i, lvl in enumerate(LEVELS):
    dense[f"fcos_logits_{lvl}"] = inter["fcos_logits"][i]
    dense[f"fcos_bbox_reg_{lvl}"] = inter["fcos_reg"][i]
    dense[f"fcos_ctrness_{lvl}"] = inter["fcos_ctr"][i]
  names = sorted({k for k in ev.files if (k.startswith(("backbone_", "fpn_", "fcos_")))
                  and "__" not in k})
  for name in names:
    if name not in dense:
      rep.add(Line(name, np.inf, np.inf, "-", False, "stage not produced by our model"))
      continue
    ref = ev[name]
    ours = _nchw(dense[name])[:, :, :ref.shape[2], :ref.shape[3]]
    full = ours
    if f"{name}__channels" in ev.files:
      ours = ours[:, ev[f"{name}__channels"]]
    rep.close(name, ours, ref, atol=0.0, rtol_of_max=1e-4)
    if f"{name}__chmean" in ev.files:
      rep.close(f"{name}__chmean", full.astype(np.float64).mean(axis=(2, 3)),
                ev[f"{name}__chmean"], atol=0.0,
                rtol_of_max=1e-4)

  # --- FCOS post-processing and mask branch, per image ----------------------
  for i in range(n):
    p = f"img{i}"
    for stage in ("prenms", "postnms"):
      if f"{p}_{stage}_scores" not in ev.files:
        continue
      ours = {k: inter[f"{stage}_{k}"][i] for k in ("boxes", "scores", "classes")}
      ours["valid"] = inter[f"{stage}_valid"][i]
      ref = {k: ev[f"{p}_{stage}_{k}"] for k in ("boxes", "scores", "classes")}
      compare_candidate_set(rep, f"{p}_{stage}", ours, ref)
    k = len(ev[f"{p}_det_scores"])
    v = out["valid"][i]
    rep.exact(f"{p}_det_count", int(v.sum()), k)
    rep.close(f"{p}_det_boxes", out["boxes"][i][:k], ev[f"{p}_det_boxes"], atol=1e-3)
    rep.close(f"{p}_det_scores", out["scores"][i][:k], ev[f"{p}_det_scores"], atol=1e-5)
    rep.exact(f"{p}_det_classes", out["classes"][i][:k], ev[f"{p}_det_classes"])
    rep.close(f"{p}_det_locations", out["locations"][i][:k], ev[f"{p}_det_locations"], atol=1e-3)
    rep.exact(f"{p}_det_roi_level", out["roi_levels"][i][:k] + 3, ev[f"{p}_det_roi_level"])
    pooled = inter["pooled"][i]
    ref = ev[f"{p}_mask_pooled_first6"]
    rep.close(f"{p}_mask_pooled_first6", _nchw(pooled[:len(ref)]), ref, 0.0, 1e-4)
    for key, ours_key in (("sam_in_first2", "sam_in"), ("sam_out_first2", "sam_out"),
                          ("deconv_out_first2", "deconv_out")):
      if f"{p}_{key}" in ev.files:
        ref = ev[f"{p}_{key}"]
        rep.close(f"{p}_{key}", _nchw(inter[ours_key][i][:len(ref)]), ref, 0.0, 1e-4)
    ref = ev[f"{p}_mask_logits_allcls_first2"]
    rep.close(f"{p}_mask_logits_allcls_first2", _nchw(inter["mask_logits_all"][i][:len(ref)]),
              ref, 0.0, 1e-4)
    rep.close(f"{p}_mask_logits_predcls", inter["mask_logits"][i][:k],
              ev[f"{p}_mask_logits_predcls"], 0.0, 1e-4)
    rep.close(f"{p}_mask_probs", out["mask_probs"][i][:k], ev[f"{p}_mask_probs"][:, 0], atol=1e-4)
    rep.close(f"{p}_maskiou_pred_allcls", out["maskiou"][i][:k], ev[f"{p}_maskiou_pred_allcls"],
              0.0, 1e-4)
    rep.close(f"{p}_mask_scores", out["mask_scores"][i][:k], ev[f"{p}_mask_scores"], 1e-5, 1e-5)
    fin = image_instances(out["boxes"][i][:k], out["scores"][i][:k], out["classes"][i][:k],
                          out["mask_probs"][i][:k], out["mask_scores"][i][:k],
                          np.ones(k, bool), np.asarray(image_hw[i]), orig_hw[i])
    _check_final(rep, f"{p}_final", fin, ev, f"{p}_final", np.arange(k))

  if gb is not None:
    given_boxes(rep, model, variables, images, image_hw, padded_hw, orig_hw, gb, n)
  return rep


def _check_final(rep, tag, fin, ref, prefix, src_expected):
  if len(fin["src"]) != len(ref[f"{prefix}_scores"]):
    rep.add(Line(f"{tag}_count", float(len(fin["src"])), 0, "exact", False,
                 f"{len(fin['src'])} vs {len(ref[f'{prefix}_scores'])}"))
    return
  rep.exact(f"{tag}_src_index", fin["src"], src_expected)
  compare_final(rep, tag, fin["boxes"], fin["scores"], fin["classes"], fin["mask_scores"],
                fin["masks"], ref, prefix)


def given_boxes(rep, model, variables, images, image_hw, padded_hw, orig_hw, gb, n):
  """Mask branch on the fixture's hand-made boxes (all pyramid levels, borders, padding)."""
  boxes = jnp.asarray(np.stack([gb[f"img{i}_given_boxes"] for i in range(n)]))
  classes = jnp.asarray(np.stack([gb[f"img{i}_given_classes"] for i in range(n)]), jnp.int32)
  scores = jnp.asarray(np.stack([gb[f"img{i}_given_scores"] for i in range(n)]))

  @jax.jit
  def branch(v, im, ihw, phw, b, c, s):
    fpn, _ = model.features(v, im, phw)
    return model.mask_branch(v, fpn, b, c, s, ihw, phw, capture=True)

  out = jax.device_get(branch(variables, jnp.asarray(images), image_hw, padded_hw, boxes,
                              classes, scores))
  for i in range(n):
    p = f"img{i}_given"
    rep.exact(f"{p}_roi_level", out["roi_levels"][i] + 3, gb[f"{p}_roi_level"])
    rep.close(f"{p}_mask_pooled", _nchw(out["inter"]["pooled"][i]), gb[f"{p}_mask_pooled"], 0.0, 1e-4)
    rep.close(f"{p}_mask_logits_predcls", out["inter"]["mask_logits"][i],
              gb[f"{p}_mask_logits_predcls"], 0.0, 1e-4)
    rep.close(f"{p}_mask_probs", out["mask_probs"][i], gb[f"{p}_mask_probs"][:, 0], atol=1e-4)
    pooled_mask = np.asarray(postprocess.maxpool2x2(jnp.asarray(out["mask_probs"][i])))
    rep.close(f"{p}_maskiou_input_maskpool", pooled_mask, gb[f"{p}_maskiou_input_maskpool"][:, 0],
              atol=1e-4)
    rep.close(f"{p}_maskiou_pred_allcls", out["maskiou"][i], gb[f"{p}_maskiou_pred_allcls"], 0.0, 1e-4)
    rep.close(f"{p}_mask_scores", out["mask_scores"][i], gb[f"{p}_mask_scores"], 1e-5, 1e-5)
    fin = image_instances(np.asarray(boxes[i]), np.asarray(scores[i]), np.asarray(classes[i]),
                          out["mask_probs"][i], out["mask_scores"][i],
                          np.ones(len(boxes[i]), bool), np.asarray(image_hw[i]), orig_hw[i])
    _check_final(rep, f"{p}_final", fin, gb, f"{p}_final", gb[f"{p}_final_src_index"])


def parse_hw(s: Optional[str]):
  if not s:
    return None
  h, w = (int(v) for v in s.replace("x", ",").split(","))
  return h, w


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="configs/NAME.py")
  ap.add_argument("--fixture", required=True, help="fixture folder (inputs.npz, eval_outputs.npz, ...)")
  ap.add_argument("--canvas", default=None, help="run on a larger canvas H,W (e.g. 640,1024)")
  ap.add_argument("--train", action="store_true",
                  help="compare the training targets and losses with train_outputs.npz")
  args = ap.parse_args(argv)
  rep = run(args.config, args.fixture, parse_hw(args.canvas), train=args.train)
  failed = rep.failed
  print(f"parity stages: {len(rep.lines) - len(failed)} PASS, {len(failed)} FAIL")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
