"""Parity report lines and comparison helpers shared by `tools.parity` (inference stages)
and `tools.parity_train` (training stages)."""
import dataclasses
from typing import Dict, List

import numpy as np

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


def nchw(x):
  """[N, H, W, C] -> NumPy [N, C, H, W] (the fixtures' layout)."""
  return np.asarray(x).transpose(0, 3, 1, 2)


# A candidate of ours and one of the reference are the same row when they have the same
# class and their boxes agree within this gate (px, max over coordinates); rows beyond it
# are reported as extra / missing. Their numeric agreement is then checked at the
# README §7 tolerances (boxes 1e-3 px, scores 1e-5).
MATCH_GATE_PX = 1.0


def match_sets(ob, os_, oc, rb, rs, rc, gate: float = MATCH_GATE_PX):
  """Matches two candidate sets row to row: same class, then nearest box (greedy on the
  max-coordinate box distance, then score distance). Near-equal keys make any canonical
  order unstable (fixtures README §7), a matching is not.

  ob [n, 4], os_ [n], oc [n] (ours); rb [m, 4], rs [m], rc [m] (reference)
  -> (oi [k], ri [k] matched row indices, extra [n - k] ours unmatched, missing [m - k]).
  """
  oi, ri = [], []
  ob, rb = np.asarray(ob, np.float64), np.asarray(rb, np.float64)
  os_, rs = np.asarray(os_, np.float64), np.asarray(rs, np.float64)
  oc, rc = np.asarray(oc), np.asarray(rc)
  for c in np.union1d(oc, rc):
    a, b = np.nonzero(oc == c)[0], np.nonzero(rc == c)[0]
    if not len(a) or not len(b):
      continue
    d = np.abs(ob[a][:, None] - rb[b][None]).max(-1)
    ds = np.abs(os_[a][:, None] - rs[b][None])
    pa, pb = np.nonzero(d <= gate)
    order = np.lexsort((ds[pa, pb], d[pa, pb]))
    used_a, used_b = set(), set()
    for t in order:
      x, y = pa[t], pb[t]
      if x in used_a or y in used_b:
        continue
      used_a.add(x)
      used_b.add(y)
      oi.append(a[x])
      ri.append(b[y])
  oi, ri = np.asarray(oi, np.int64), np.asarray(ri, np.int64)
  extra = np.setdiff1d(np.arange(len(oc)), oi)
  missing = np.setdiff1d(np.arange(len(rc)), ri)
  return oi, ri, extra, missing


def _rows(boxes, scores, classes, idx, limit=3):
  s = "; ".join(f"#{i} cls {int(classes[i])} score {float(scores[i]):.6g} box "
                f"[{', '.join(f'{v:.2f}' for v in boxes[i])}]" for i in idx[:limit])
  return s + (f"; ... {len(idx) - limit} more" if len(idx) > limit else "")


def compare_candidate_set(rep: Report, tag, ours: Dict[str, np.ndarray], ref: Dict[str, np.ndarray]):
  """Pre-/post-NMS candidate sets (order is implementation-defined): matched as sets by
  class, then nearest box. Lines: `_count`, `_classes` (every row matched, extra and
  missing rows named), `_boxes` and `_scores` over the matched rows."""
  v = np.asarray(ours["valid"], bool)
  o = {k: np.asarray(ours[k])[v] for k in ("boxes", "scores", "classes")}
  r = {k: np.asarray(ref[k]) for k in ("boxes", "scores", "classes")}
  no, nr = len(o["scores"]), len(r["scores"])
  rep.add(Line(f"{tag}_count", float(abs(no - nr)), 0.0, "exact", no == nr,
               "" if no == nr else f"{no} vs {nr}"))
  oi, ri, extra, missing = match_sets(o["boxes"], o["scores"], o["classes"],
                                      r["boxes"], r["scores"], r["classes"])
  note = []
  if len(extra):
    note.append(f"extra (ours only) {len(extra)}: " + _rows(o["boxes"], o["scores"], o["classes"], extra))
  if len(missing):
    note.append(f"missing (reference only) {len(missing)}: " +
                _rows(r["boxes"], r["scores"], r["classes"], missing))
  ok = not len(extra) and not len(missing)
  rep.add(Line(f"{tag}_classes", float(len(extra) + len(missing)), 0.0,
               f"matched by class + box <= {MATCH_GATE_PX:g} px", ok,
               " | ".join(note) or f"{len(oi)} rows matched"))
  rep.close(f"{tag}_boxes", o["boxes"][oi], r["boxes"][ri], atol=1e-3)
  rep.close(f"{tag}_scores", o["scores"][oi], r["scores"][ri], atol=1e-5)


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
