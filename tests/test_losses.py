"""FCOS, mask and MaskIoU losses vs the training fixture and NumPy re-derivations."""
import functools

import jax
import numpy as np
import pytest

from centermask_jax.training import losses as Lo
from centermask_jax.training import mask_targets as MT
from centermask_jax.training import targets as T
from fixture_gt import load_gt
from test_targets import fcos_targets  # jitted (eagerly ~100 primitive compiles)

LEVELS = ("p3", "p4", "p5", "p6", "p7")
STRIDES = (8, 16, 32, 64, 128)
PADDED = (608, 928)


def fcos_maps(fixture):
  """Dense FCOS head outputs of eval_outputs.npz as NHWC lists (logits, reg, ctrness)."""
  ev = np.load(fixture / "eval_outputs.npz")
  nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
  return ([nhwc(ev[f"fcos_logits_{l}"]) for l in LEVELS],
          [nhwc(ev[f"fcos_bbox_reg_{l}"]) for l in LEVELS],
          [nhwc(ev[f"fcos_ctrness_{l}"]) for l in LEVELS])


def pad_canvas(maps, canvas_hw, rng):
  """Pads each [N, h, w, C] map to the canvas with garbage outside the official region."""
  out = []
  for m, (h, w) in zip(maps, canvas_hw):
    big = rng.uniform(-30, 30, (m.shape[0], h, w, m.shape[-1])).astype(np.float32)
    big[:, :m.shape[1], :m.shape[2]] = m
    out.append(big)
  return out


@pytest.mark.parametrize("canvas", ["official", "larger"])
def test_fcos_losses_match_fixture(lite_fixture, canvas):
  tr = np.load(lite_fixture / "train_outputs.npz")
  gt = load_gt(lite_fixture)
  logits, reg, ctr = fcos_maps(lite_fixture)
  level_hw = [m.shape[1:3] for m in logits]
  if canvas == "larger":
    level_hw = [(-(-640 // s), -(-1024 // s)) for s in STRIDES]
    rng = np.random.default_rng(0)
    logits, ctr = pad_canvas(logits, level_hw, rng), pad_canvas(ctr, level_hw, rng)
    reg = [np.abs(r) for r in pad_canvas(reg, level_hw, rng)]
  t = fcos_targets(gt["gt_boxes"], gt["gt_classes"], gt["gt_valid"], level_hw,
                   np.array([PADDED] * 2, np.int32))
  out = jax.jit(Lo.fcos_losses)(logits, reg, ctr, t["labels"], t["reg_targets"], t["loc_valid"])
  assert float(out["num_pos"]) == tr["fcos_num_pos"]
  for name in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"):
    np.testing.assert_allclose(float(out[name]), tr[name], rtol=1e-4, err_msg=name)


def np_bce(x, t):
  return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def np_fcos_losses(logits, reg, ctr, labels, reg_t, valid, c, loc_type="giou", devices=1,
                   total_pos=None, total_ctr=None):
  """Float64 NumPy transliteration of the official fcos_losses on flat [K, .] arrays ->
  (losses, local positive count, local sum of centerness targets)."""
  logits, reg, ctr, reg_t = (a.astype(np.float64) for a in (logits, reg, ctr, reg_t))
  keep = valid
  logits, reg, ctr, labels, reg_t = logits[keep], reg[keep], ctr[keep], labels[keep], reg_t[keep]
  pos = np.nonzero(labels != c)[0]
  num_pos_avg = max((len(pos) if total_pos is None else total_pos) / devices, 1.0)
  onehot = np.zeros_like(logits)
  onehot[pos, labels[pos]] = 1
  p = 1 / (1 + np.exp(-logits))
  p_t = p * onehot + (1 - p) * (1 - onehot)
  focal = np_bce(logits, onehot) * (1 - p_t) ** 2 * (0.25 * onehot + 0.75 * (1 - onehot))
  cls = focal.sum() / num_pos_avg
  pr, tg = reg[pos], reg_t[pos]
  lr, tb = tg[:, [0, 2]], tg[:, [1, 3]]
  ctr_t = np.sqrt(lr.min(1) / lr.max(1) * (tb.min(1) / tb.max(1)))
  ctr_norm = max((ctr_t.sum() if total_ctr is None else total_ctr) / devices, 1e-6)
  ta = (tg[:, 0] + tg[:, 2]) * (tg[:, 1] + tg[:, 3])
  pa = (pr[:, 0] + pr[:, 2]) * (pr[:, 1] + pr[:, 3])
  wi = np.minimum(pr[:, 0], tg[:, 0]) + np.minimum(pr[:, 2], tg[:, 2])
  hi = np.minimum(pr[:, 1], tg[:, 1]) + np.minimum(pr[:, 3], tg[:, 3])
  enc = ((np.maximum(pr[:, 0], tg[:, 0]) + np.maximum(pr[:, 2], tg[:, 2]))
         * (np.maximum(pr[:, 1], tg[:, 1]) + np.maximum(pr[:, 3], tg[:, 3])))
  union = ta + pa - wi * hi
  iou = (wi * hi + 1) / (union + 1)
  per = {"giou": 1 - (iou - (enc - union) / enc), "iou": -np.log(iou),
         "linear_iou": 1 - iou}[loc_type]
  loc = (per * ctr_t).sum() / ctr_norm
  ctr_loss = np_bce(ctr[pos, 0], ctr_t).sum() / num_pos_avg
  losses = {"loss_fcos_cls": cls, "loss_fcos_loc": loc, "loss_fcos_ctr": ctr_loss}
  return losses, len(pos), ctr_t.sum()


def random_fcos_inputs(rng, n=2, t=60, c=5):
  logits = rng.normal(0, 3, (n, t, c)).astype(np.float32)
  reg = np.abs(rng.normal(2, 2, (n, t, 4))).astype(np.float32)
  reg[0, :3] = 0  # a zero prediction (finite GIoU: the target is non-degenerate)
  ctr = rng.normal(0, 2, (n, t, 1)).astype(np.float32)
  labels = np.where(rng.uniform(size=(n, t)) < 0.3, rng.integers(0, c, (n, t)), c)
  reg_t = rng.uniform(0.05, 6, (n, t, 4)).astype(np.float32)
  valid = rng.uniform(size=(n, t)) < 0.85
  return logits, reg, ctr, labels.astype(np.int32), reg_t, valid


@pytest.mark.parametrize("loc_type", ["giou", "iou", "linear_iou"])
def test_fcos_losses_numpy_rederivation(loc_type):
  rng = np.random.default_rng(5)
  logits, reg, ctr, labels, reg_t, valid = random_fcos_inputs(rng)
  out = Lo.fcos_losses(logits, reg, ctr, labels, reg_t, valid, loc_loss_type=loc_type)
  ref, npos, _ = np_fcos_losses(logits.reshape(-1, 5), reg.reshape(-1, 4), ctr.reshape(-1, 1),
                                labels.reshape(-1), reg_t.reshape(-1, 4), valid.reshape(-1),
                                5, loc_type)
  assert npos > 10 and float(out["num_pos"]) == npos
  for k, v in ref.items():
    np.testing.assert_allclose(float(out[k]), v, rtol=1e-5, err_msg=k)
  # Elementwise focal loss too (incl. large |logits|). 1 - p_t cancels in float32 exactly as
  # in fvcore's float32 code, so tiny values (< 1e-7) are only absolutely accurate.
  x = np.linspace(-30, 30, 61).astype(np.float32)
  for tt in (0.0, 1.0):
    p = 1 / (1 + np.exp(-x.astype(np.float64)))
    p_t = p * tt + (1 - p) * (1 - tt)
    ref_f = np_bce(x.astype(np.float64), tt) * (1 - p_t) ** 2 * (0.25 * tt + 0.75 * (1 - tt))
    np.testing.assert_allclose(np.asarray(Lo.sigmoid_focal_loss(x, np.float32(tt))), ref_f,
                               rtol=1e-5, atol=1e-7)


def test_fcos_losses_no_positive_and_finite_grads():
  rng = np.random.default_rng(6)
  logits, reg, ctr, labels, reg_t, valid = random_fcos_inputs(rng)
  labels_bg = np.full_like(labels, 5)
  out = Lo.fcos_losses(logits, reg, ctr, labels_bg, reg_t, valid)
  assert float(out["loss_fcos_loc"]) == 0 and float(out["loss_fcos_ctr"]) == 0
  ref, _, _ = np_fcos_losses(logits.reshape(-1, 5), reg.reshape(-1, 4), ctr.reshape(-1, 1),
                             labels_bg.reshape(-1), reg_t.reshape(-1, 4), valid.reshape(-1), 5)
  np.testing.assert_allclose(float(out["loss_fcos_cls"]), ref["loss_fcos_cls"], rtol=1e-5)
  # Gradients are finite and vanish where the location does not count.
  reg_t[~valid] = 0  # degenerate targets outside the region must not produce NaN
  total = lambda lg, rg, ct: sum(v for k, v in Lo.fcos_losses(
      lg, rg, ct, labels, reg_t, valid).items() if k.startswith("loss"))
  grads = jax.grad(total, argnums=(0, 1, 2))(logits, reg, ctr)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  pos = valid & (labels < 5)
  assert not np.asarray(grads[0])[~valid].any()
  assert not np.asarray(grads[1])[~pos].any() and np.asarray(grads[1])[pos].any()
  assert not np.asarray(grads[2])[~pos].any()


def test_fcos_losses_pmap_normalisation():
  # 4 devices: each loss is local sum / (all-device count / 4), as the multi-GPU official
  # code; so the device mean equals the single-device loss on the whole batch.
  rng = np.random.default_rng(7)
  logits, reg, ctr, labels, reg_t, valid = random_fcos_inputs(rng, n=4)
  labels[3] = 5  # one device without positives
  f = jax.pmap(functools.partial(Lo.fcos_losses, axis_name="d"), axis_name="d")
  sh = lambda a: a[:, None]
  out = f(sh(logits), sh(reg), sh(ctr), sh(labels), sh(reg_t), sh(valid))
  single = Lo.fcos_losses(logits, reg, ctr, labels, reg_t, valid)
  _, total_pos, total_ctr = np_fcos_losses(
      logits.reshape(-1, 5), reg.reshape(-1, 4), ctr.reshape(-1, 1), labels.reshape(-1),
      reg_t.reshape(-1, 4), valid.reshape(-1), 5)
  for d in range(4):
    ref, _, _ = np_fcos_losses(logits[d], reg[d], ctr[d], labels[d], reg_t[d], valid[d], 5,
                               devices=4, total_pos=total_pos, total_ctr=total_ctr)
    for k, v in ref.items():
      np.testing.assert_allclose(float(out[k][d]), v, rtol=1e-5, atol=1e-7, err_msg=k)
  for k in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"):
    np.testing.assert_allclose(float(np.mean(out[k])), float(single[k]), rtol=1e-5)


def test_fcos_losses_no_recompile():
  rng = np.random.default_rng(8)
  f = jax.jit(functools.partial(Lo.fcos_losses, loc_loss_type="giou"))
  first = None
  for _ in range(2):
    out = f(*random_fcos_inputs(rng))
    jax.block_until_ready(out)
    first = first if first is not None else float(out["loss_fcos_cls"])
  assert f._cache_size() == 1 and float(out["loss_fcos_cls"]) != first


def fixture_mask_batch(fixture, k=8):
  """Fixture fg RoIs (sorted order) padded to [2, k]: logits of the GT-class probability,
  MaskIoU predictions, reference targets, and our mask targets / ratios for the same RoIs."""
  tr = np.load(fixture / "train_outputs.npz")
  gt = load_gt(fixture)
  props = np.stack([tr[f"img{i}_train_proposals_boxes"] for i in range(2)])
  rois = T.match_rois(props, np.ones((2, 100), bool), gt["gt_boxes"], gt["gt_classes"],
                      gt["gt_valid"], gt["image_hw"])
  sel = T.select_fg(rois, k)
  targets, ratio = MT.mask_targets(sel["boxes"], sel["matched_idx"], sel["fg"], gt["gt_polys"],
                                   gt["gt_poly_len"])
  b = {"logits": np.zeros((2, k, 28, 28), np.float32), "iou_pred": np.zeros((2, k), np.float32),
       "ref_iou_t": np.zeros((2, k)), "targets": np.zeros((2, k, 28, 28), bool),
       "ratio": np.zeros((2, k), np.float32), "fg": np.zeros((2, k), bool)}
  for i in range(2):
    fg = np.asarray(sel["fg"][i])
    boxes = np.asarray(sel["boxes"][i])[fg]
    order = np.lexsort(boxes.T[::-1])
    n = len(order)
    np.testing.assert_array_equal(boxes[order], tr[f"img{i}_fg_roi_boxes"])
    prob = tr[f"img{i}_fg_roi_mask_prob_gtcls"].astype(np.float64)
    assert not (prob == 0.5).any()  # logit > 0 <=> prob > 0.5 is then unambiguous
    b["logits"][i, :n] = np.log(prob) - np.log1p(-prob)
    b["iou_pred"][i, :n] = tr[f"img{i}_fg_roi_maskiou_pred_gtcls"]
    b["ref_iou_t"][i, :n] = tr[f"img{i}_fg_roi_maskiou_target"]
    b["targets"][i, :n] = np.asarray(targets[i])[fg][order]
    b["ratio"][i, :n] = np.asarray(ratio[i])[fg][order]
    b["fg"][i, :n] = True
  return tr, b


def test_mask_and_maskiou_losses_match_fixture(lite_fixture):
  tr, b = fixture_mask_batch(lite_fixture)
  loss = jax.jit(Lo.mask_loss)(b["logits"], b["targets"], b["fg"])
  np.testing.assert_allclose(float(loss), tr["loss_mask"], rtol=1e-4)
  loss_iou, t = jax.jit(Lo.maskiou_targets_and_loss)(b["logits"], b["targets"], b["ratio"],
                                                     b["iou_pred"], b["fg"])
  np.testing.assert_allclose(np.asarray(t), b["ref_iou_t"], atol=1e-6)
  assert (b["ref_iou_t"][b["fg"]] == 0).sum() >= 2  # zero targets are excluded from the loss
  np.testing.assert_allclose(float(loss_iou), tr["loss_maskiou"], rtol=1e-4)


def np_mask_losses(logits, targets, ratio, iou_pred, fg):
  """Float64 re-derivation of the per-device mask BCE mean and MaskIoU target/loss."""
  x, y = logits[fg].astype(np.float64), targets[fg].astype(np.float64)
  mask = np_bce(x, y).mean() if fg.any() else 0.0
  pred = x > 0
  full = y.sum((1, 2)) / np.maximum(ratio[fg].astype(np.float64), 1e-10)
  ovr = (pred * y).sum((1, 2))
  tgt = ovr / np.maximum(pred.sum((1, 2)) + full - ovr, 1)
  sel = tgt > 0
  iou_sum = (0.5 * (iou_pred[fg][sel] - tgt[sel]) ** 2).sum()
  return mask, iou_sum / max(sel.sum(), 1), tgt, np_bce(x, y).sum(), sel.sum(), iou_sum


def random_mask_batch(rng, d=4, r=6):
  logits = rng.normal(0, 2, (d, r, 28, 28)).astype(np.float32)
  targets = rng.uniform(size=(d, r, 28, 28)) < 0.4
  ratio = rng.uniform(0.3, 1.0, (d, r)).astype(np.float32)
  iou_pred = rng.normal(0.5, 0.3, (d, r)).astype(np.float32)
  fg = rng.uniform(size=(d, r)) < 0.6
  fg[1] = False  # a device without foreground RoIs
  fg[0, :2] = True
  return logits, targets, ratio, iou_pred, fg


def test_mask_losses_numpy_and_device_semantics():
  rng = np.random.default_rng(9)
  logits, targets, ratio, iou_pred, fg = random_mask_batch(rng)
  targets[0, 0] = False  # empty target -> MaskIoU target 0, excluded
  local = jax.pmap(lambda *a: (Lo.mask_loss(a[0], a[1], a[4]),)
                   + Lo.maskiou_targets_and_loss(*a))
  glob = jax.pmap(lambda *a: (Lo.mask_loss(a[0], a[1], a[4], axis_name="d"),)
                  + Lo.maskiou_targets_and_loss(*a, axis_name="d"), axis_name="d")
  sh = lambda a: a[:, None]
  args = [sh(a) for a in (logits, targets, ratio, iou_pred, fg)]
  m_loc, i_loc, t_loc = local(*args)
  m_glob, i_glob, _ = glob(*args)
  sums = []
  for d in range(4):
    mask, iou, tgt, bsum, nsel, isum = np_mask_losses(logits[d], targets[d], ratio[d],
                                                      iou_pred[d], fg[d])
    np.testing.assert_allclose(float(m_loc[d]), mask, rtol=1e-5)  # detectron2: per device
    np.testing.assert_allclose(float(i_loc[d]), iou, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(t_loc[d, 0])[fg[d]], tgt, atol=1e-6)
    assert not np.asarray(t_loc[d, 0])[~fg[d]].any()
    sums.append((bsum, fg[d].sum() * 784, isum, nsel))
  bsum, cnt, isum, nsel = np.sum(sums, axis=0)
  assert float(m_loc[1]) == 0 and float(i_loc[1]) == 0
  # With axis_name: all-device means (the device mean of the losses is the global mean).
  np.testing.assert_allclose(float(np.mean(m_glob)), bsum / cnt, rtol=1e-5)
  np.testing.assert_allclose(float(np.mean(i_glob)), isum / nsel, rtol=1e-5)


def test_mask_losses_empty_and_gradients():
  rng = np.random.default_rng(10)
  logits, targets, ratio, iou_pred, fg = random_mask_batch(rng, d=2)
  none = np.zeros_like(fg)
  def total(lg, ip, fgm):
    return Lo.mask_loss(lg, targets, fgm) + Lo.maskiou_targets_and_loss(
        lg, targets, ratio, ip, fgm)[0]
  assert float(total(logits, iou_pred, none)) == 0
  g_none = jax.grad(total, argnums=(0, 1))(logits, iou_pred, none)
  assert all(np.isfinite(np.asarray(g)).all() and not np.asarray(g).any() for g in g_none)
  g = jax.grad(total, argnums=(0, 1))(logits, iou_pred, fg)
  assert np.isfinite(np.asarray(g[0])).all()
  assert not np.asarray(g[0])[~fg].any() and np.asarray(g[0])[fg].any()
  assert not np.asarray(g[1])[~fg].any() and np.asarray(g[1])[fg].any()


def test_mask_losses_no_recompile():
  rng = np.random.default_rng(11)
  f = jax.jit(functools.partial(Lo.mask_loss, axis_name=None))
  g = jax.jit(functools.partial(Lo.maskiou_targets_and_loss, loss_weight=1.0))
  vals = []
  for _ in range(2):
    logits, targets, ratio, iou_pred, fg = random_mask_batch(rng, d=2)
    vals.append((float(f(logits, targets, fg)), float(g(logits, targets, ratio, iou_pred, fg)[0])))
  assert f._cache_size() == 1 and g._cache_size() == 1 and vals[0] != vals[1]


@pytest.mark.parametrize("norm", ["per_device", "global"])
def test_mask_loss_normalisation_over_four_devices_gradients_vs_numpy(norm):
  """4 devices holding 5, 0, 2 and 6 foreground RoIs; mask logits = w * z and MaskIoU
  predictions = v * u with shared scalars (w, v). The train step's recipe (the normaliser
  axis from `train.mask_loss_norm`, then the device mean of the gradients, as DDP) gives
  NumPy's float64 gradients of: per_device = mean over devices of each device's own mean
  (centermask2 under DDP); global = one mean over all devices' RoIs."""
  import ml_collections
  from centermask_jax.training import step as S
  rng = np.random.default_rng(12)
  d, r = 4, 7
  z = rng.normal(0, 1.5, (d, r, 28, 28)).astype(np.float32)
  targets = rng.uniform(size=(d, r, 28, 28)) < 0.4
  targets[2, 1] = False  # empty target: MaskIoU target 0, not in the MaskIoU mean
  ratio = rng.uniform(0.3, 1.0, (d, r)).astype(np.float32)
  u = rng.normal(0.5, 0.3, (d, r)).astype(np.float32)
  fg = np.zeros((d, r), bool)
  for dev, n in enumerate((5, 0, 2, 6)):
    fg[dev, :n] = True
  w, v = np.float32(0.8), np.float32(1.3)
  cfg = ml_collections.ConfigDict({"train": {"mask_loss_norm": norm}})
  axis = S.mask_loss_axis(cfg, "d")
  assert axis == ("d" if norm == "global" else None)

  def device_loss(params, zz, tt, rr, uu, ff):
    logits = params[0] * zz
    lm = Lo.mask_loss(logits, tt, ff, axis_name=axis)
    li, _ = Lo.maskiou_targets_and_loss(logits, tt, rr, params[1] * uu, ff, axis_name=axis)
    return lm + li, (lm, li)

  def step(params, *a):
    (_, parts), g = jax.value_and_grad(device_loss, has_aux=True)(params, *a)
    return jax.lax.pmean(g, "d"), parts

  sh = lambda a: a[:, None]
  params = np.broadcast_to(np.array([w, v]), (d, 2))
  g, (lm, li) = jax.pmap(step, axis_name="d")(params, sh(z), sh(targets), sh(ratio), sh(u),
                                              sh(fg))
  g = np.asarray(g[0], np.float64)

  # NumPy float64: per device sums of BCE / MaskIoU terms and their w / v derivatives.
  sig = lambda x: 1 / (1 + np.exp(-x))
  parts = []
  for dev in range(d):
    f = fg[dev]
    x = np.float64(w) * z[dev][f].astype(np.float64)
    y = targets[dev][f].astype(np.float64)
    bce_sum = np_bce(x, y).sum()
    dbce_dw = ((sig(x) - y) * z[dev][f]).sum()
    pred = x > 0
    full = y.sum((1, 2)) / np.maximum(ratio[dev][f].astype(np.float64), 1e-10)
    ovr = (pred * y).sum((1, 2))
    tgt = ovr / np.maximum(pred.sum((1, 2)) + full - ovr, 1)
    sel = tgt > 0
    p = np.float64(v) * u[dev][f][sel]
    parts.append((bce_sum, dbce_dw, f.sum() * 784, (0.5 * (p - tgt[sel]) ** 2).sum(),
                  ((p - tgt[sel]) * u[dev][f][sel]).sum(), sel.sum()))
  P = np.array(parts)
  if norm == "per_device":
    safe = lambda a, b: np.where(b > 0, a / np.maximum(b, 1), 0.0)
    want_lm = safe(P[:, 0], P[:, 2])
    want_li = safe(P[:, 3], P[:, 5])
    want_g = [np.mean(safe(P[:, 1], P[:, 2])), np.mean(safe(P[:, 4], P[:, 5]))]
    np.testing.assert_allclose(np.asarray(lm), want_lm, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(li), want_li, rtol=2e-5)
    assert float(lm[1]) == 0 and float(li[1]) == 0
  else:
    want_g = [P[:, 1].sum() / P[:, 2].sum(), P[:, 4].sum() / P[:, 5].sum()]
    np.testing.assert_allclose(float(np.mean(lm)), P[:, 0].sum() / P[:, 2].sum(), rtol=2e-5)
    np.testing.assert_allclose(float(np.mean(li)), P[:, 3].sum() / P[:, 5].sum(), rtol=2e-5)
  np.testing.assert_allclose(g, want_g, rtol=2e-5)
  # the two forms really differ on this split (unequal foreground counts)
  other = ([P[:, 1].sum() / P[:, 2].sum()] if norm == "per_device"
           else [np.mean(np.where(P[:, 2] > 0, P[:, 1] / np.maximum(P[:, 2], 1), 0))])
  assert abs(g[0] - other[0]) > 1e-3 * abs(other[0])


def test_mask_loss_norm_rejects_unknown():
  import ml_collections
  from centermask_jax.training import step as S
  with pytest.raises(ValueError, match="mask_loss_norm"):
    S.mask_loss_axis(ml_collections.ConfigDict({"train": {"mask_loss_norm": "mean"}}), "d")
  assert S.mask_loss_axis(ml_collections.ConfigDict({"train": {}}), "d") is None
