"""Modulated deformable conv v2 vs. a scalar NumPy transliteration of detectron2's CUDA
kernel arithmetic (im2col forward, col2im / col2im_coord backward), a dense conv, and
torchvision.ops.deform_conv2d when importable."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centermask_jax.ops import deform_conv as dc

F32 = np.float32
RTOL = 1e-5


# ---------------------------------------------------------------------------------------
# Scalar reference, NCHW / OIHW as the kernel indexes them. Sample positions in float32
# (the kernel adds a float32 offset to an int), accumulation in float64.
# ---------------------------------------------------------------------------------------

def _position(h_in, i, dil, off):
  return float(F32(F32(h_in + i * dil) + F32(off)))


def _bilinear(im, height, width, h, w):
  """dmcn_im2col_bilinear: im [height, width]; neighbours outside the map read as 0."""
  h_low, w_low = math.floor(h), math.floor(w)
  h_high, w_high = h_low + 1, w_low + 1
  lh, lw = h - h_low, w - w_low
  hh, hw = 1 - lh, 1 - lw
  v1 = im[h_low, w_low] if (h_low >= 0 and w_low >= 0) else 0.0
  v2 = im[h_low, w_high] if (h_low >= 0 and w_high <= width - 1) else 0.0
  v3 = im[h_high, w_low] if (h_high <= height - 1 and w_low >= 0) else 0.0
  v4 = im[h_high, w_high] if (h_high <= height - 1 and w_high <= width - 1) else 0.0
  return hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4


def _gradient_weight(ah, aw, h, w, height, width):
  """dmcn_get_gradient_weight: d sample / d im[h, w]."""
  if ah <= -1 or ah >= height or aw <= -1 or aw >= width:
    return 0.0
  hl, wl = math.floor(ah), math.floor(aw)
  hh, wh = hl + 1, wl + 1
  weight = 0.0
  if h == hl and w == wl:
    weight = (h + 1 - ah) * (w + 1 - aw)
  if h == hl and w == wh:
    weight = (h + 1 - ah) * (aw + 1 - w)
  if h == hh and w == wl:
    weight = (ah + 1 - h) * (w + 1 - aw)
  if h == hh and w == wh:
    weight = (ah + 1 - h) * (aw + 1 - w)
  return weight


def _coordinate_weight(ah, aw, height, width, im, bp_dir):
  """dmcn_get_coordinate_weight: d sample / d h (bp_dir 0) or d w (bp_dir 1)."""
  if ah <= -1 or ah >= height or aw <= -1 or aw >= width:
    return 0.0
  hl, wl = math.floor(ah), math.floor(aw)
  hh, wh = hl + 1, wl + 1
  ok_ll = hl >= 0 and wl >= 0
  ok_lh = hl >= 0 and wh <= width - 1
  ok_hl = hh <= height - 1 and wl >= 0
  ok_hh = hh <= height - 1 and wh <= width - 1
  weight = 0.0
  if bp_dir == 0:
    if ok_ll:
      weight += -1 * (wl + 1 - aw) * im[hl, wl]
    if ok_lh:
      weight += -1 * (aw - wl) * im[hl, wh]
    if ok_hl:
      weight += (wl + 1 - aw) * im[hh, wl]
    if ok_hh:
      weight += (aw - wl) * im[hh, wh]
  else:
    if ok_ll:
      weight += -1 * (hl + 1 - ah) * im[hl, wl]
    if ok_lh:
      weight += (hl + 1 - ah) * im[hl, wh]
    if ok_hl:
      weight += -1 * (ah - hl) * im[hh, wl]
    if ok_hh:
      weight += (ah - hl) * im[hh, wh]
  return weight


def _im2col(x, offset, mask, kh, kw, s, p, d, ho, wo):
  """modulated_deformable_im2col: columns [C*kh*kw, N, Ho, Wo] (float64)."""
  n, c, height, width = x.shape
  cols = np.zeros((c * kh * kw, n, ho, wo))
  for b in range(n):
    for ci in range(c):
      for h in range(ho):
        for w in range(wo):
          for i in range(kh):
            for j in range(kw):
              t = i * kw + j
              him = _position(h * s - p, i, d, offset[b, 2 * t, h, w])
              wim = _position(w * s - p, j, d, offset[b, 2 * t + 1, h, w])
              val = 0.0
              if him > -1 and wim > -1 and him < height and wim < width:
                val = _bilinear(x[b, ci], height, width, him, wim)
              cols[ci * kh * kw + t, b, h, w] = val * float(mask[b, t, h, w])
  return cols


def ref_forward(x, offset, mask, weight, s, p, d):
  """x [N,C,H,W], offset [N,2K,Ho,Wo], mask [N,K,Ho,Wo], weight [O,C,kh,kw] -> [N,O,Ho,Wo]."""
  o, c, kh, kw = weight.shape
  ho = (x.shape[2] + 2 * p - (d * (kh - 1) + 1)) // s + 1
  wo = (x.shape[3] + 2 * p - (d * (kw - 1) + 1)) // s + 1
  cols = _im2col(x.astype(np.float64), offset, mask, kh, kw, s, p, d, ho, wo)
  out = weight.reshape(o, -1).astype(np.float64) @ cols.reshape(cols.shape[0], -1)
  return out.reshape(o, x.shape[0], ho, wo).transpose(1, 0, 2, 3), cols


def ref_backward(x, offset, mask, weight, s, p, d, grad_out):
  """Gradients (input, offset, mask, weight) of sum(out * grad_out), as the CUDA backward."""
  n, c, height, width = x.shape
  o, _, kh, kw = weight.shape
  k = kh * kw
  _, cols = ref_forward(x, offset, mask, weight, s, p, d)
  _, _, ho, wo = grad_out.shape
  go = grad_out.astype(np.float64).transpose(1, 0, 2, 3).reshape(o, -1)
  grad_weight = (go @ cols.reshape(c * k, -1).T).reshape(weight.shape)
  grad_cols = (weight.reshape(o, -1).astype(np.float64).T @ go).reshape(c * k, n, ho, wo)
  xd = x.astype(np.float64)
  # col2im: gradient w.r.t. the input.
  grad_x = np.zeros_like(xd)
  for ci in range(c):
    for i in range(kh):
      for j in range(kw):
        t = i * kw + j
        for b in range(n):
          for h in range(ho):
            for w in range(wo):
              hh = _position(h * s - p, i, d, offset[b, 2 * t, h, w])
              ww = _position(w * s - p, j, d, offset[b, 2 * t + 1, h, w])
              top = grad_cols[ci * k + t, b, h, w] * float(mask[b, t, h, w])
              ch, cw = int(hh), int(ww)  # C++ truncation toward zero
              for dy in range(-2, 3):
                for dx in range(-2, 3):
                  yy, xx = ch + dy, cw + dx
                  if (0 <= yy < height and 0 <= xx < width and abs(hh - yy) < 1
                      and abs(ww - xx) < 1):
                    grad_x[b, ci, yy, xx] += _gradient_weight(hh, ww, yy, xx, height,
                                                              width) * top
  # col2im_coord: gradients w.r.t. offset and mask.
  grad_off = np.zeros(offset.shape)
  grad_mask = np.zeros(mask.shape)
  for b in range(n):
    for oc in range(2 * k):
      t, bp_dir = oc // 2, oc % 2
      i, j = t // kw, t % kw
      for h in range(ho):
        for w in range(wo):
          val = mval = 0.0
          for ci in range(c):
            gcol = grad_cols[ci * k + t, b, h, w]
            ih = _position(h * s - p, i, d, offset[b, 2 * t, h, w])
            iw = _position(w * s - p, j, d, offset[b, 2 * t + 1, h, w])
            if ih <= -1 or iw <= -1 or ih >= height or iw >= width:
              ih = iw = -2
            else:
              mval += gcol * _bilinear(xd[b, ci], height, width, ih, iw)
            val += _coordinate_weight(ih, iw, height, width, xd[b, ci], bp_dir) * gcol * float(
                mask[b, t, h, w])
          grad_off[b, oc, h, w] = val
          if bp_dir == 0:
            grad_mask[b, t, h, w] = mval
  return grad_x, grad_off, grad_mask, grad_weight


# ---------------------------------------------------------------------------------------
# Inputs: offsets that push samples across the borders and into the padding, plus a few
# exact integer / half positions (floor boundaries, the -1 and H-1 edges).
# ---------------------------------------------------------------------------------------

def _inputs(seed, n, c, h, w, o, k, s, p, d, spread=3.0):
  rng = np.random.default_rng(seed)
  ho = (h + 2 * p - (d * (k - 1) + 1)) // s + 1
  wo = (w + 2 * p - (d * (k - 1) + 1)) // s + 1
  x = rng.normal(size=(n, c, h, w)).astype(F32)
  offset = rng.uniform(-spread, spread, size=(n, 2 * k * k, ho, wo)).astype(F32)
  exact = rng.random(offset.shape) < 0.15
  offset[exact] = rng.integers(-3, 4, size=exact.sum()).astype(F32) * F32(0.5)
  mask = rng.uniform(0.05, 1.0, size=(n, k * k, ho, wo)).astype(F32)
  weight = rng.normal(size=(o, c, k, k)).astype(F32)
  grad_out = rng.normal(size=(n, o, ho, wo)).astype(F32)
  return x, offset, mask, weight, grad_out


def _nhwc(a):
  return jnp.asarray(a.transpose(0, 2, 3, 1))


def _hwio(wt):
  return jnp.asarray(wt.transpose(2, 3, 1, 0))


@functools.lru_cache(maxsize=None)
def _vjp_fn(s, p, d, impl):
  def f(x, off, m, wt, g, valid_hw):
    y, vjp = jax.vjp(lambda *a: dc.modulated_deform_conv(
        *a, stride=s, padding=p, dilation=d, valid_hw=valid_hw, impl=impl), x, off, m, wt)
    return (y,) + vjp(g)
  return jax.jit(f)


def _rel_err(got, ref):
  return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _check(case, impl, canvas=None):
  """Forward + 4 gradients vs the reference; canvas=(Hc, Wc) runs on a larger canvas."""
  s, p, d = case["s"], case["p"], case["d"]
  x, off, m, wt, g = _inputs(case["seed"], 2, 3, case["h"], case["w"], 4, 3, s, p, d)
  ref_y, _ = ref_forward(x, off, m, wt, s, p, d)
  ref_gx, ref_goff, ref_gm, ref_gw = ref_backward(x, off, m, wt, s, p, d, g)
  n, c, h, w = x.shape
  ho, wo = g.shape[2:]
  valid = np.array([[h, w]] * n, np.int32)
  xj, offj, mj, gj = _nhwc(x), _nhwc(off), _nhwc(m), _nhwc(g)
  if canvas is not None:
    # Garbage everywhere outside the official region: it must never be read.
    hc, wc = canvas
    hoc = dc.out_size(hc, 3, s, p, d)
    woc = dc.out_size(wc, 3, s, p, d)
    rng = np.random.default_rng(7)

    def embed(a, shape):
      big = rng.normal(size=(n,) + shape + (a.shape[-1],)).astype(F32) * 100
      big[:, :a.shape[1], :a.shape[2]] = np.asarray(a)
      return jnp.asarray(big)
    xj = embed(xj, (hc, wc))
    offj, mj = embed(offj, (hoc, woc)), embed(mj, (hoc, woc))
    gbig = np.zeros((n, hoc, woc, 4), F32)
    gbig[:, :ho, :wo] = np.asarray(gj)
    gj = jnp.asarray(gbig)
  y, gx, goff, gm, gw = _vjp_fn(s, p, d, impl)(xj, offj, mj, _hwio(wt), gj, valid)
  y, gx, goff, gm = (np.asarray(a)[:, :hh, :ww] for a, (hh, ww) in
                     zip((y, gx, goff, gm), ((ho, wo), (h, w), (ho, wo), (ho, wo))))
  errs = {
      "forward": _rel_err(y, ref_y.transpose(0, 2, 3, 1)),
      "d_input": _rel_err(gx, ref_gx.transpose(0, 2, 3, 1)),
      "d_offset": _rel_err(goff, ref_goff.transpose(0, 2, 3, 1)),
      "d_mask": _rel_err(gm, ref_gm.transpose(0, 2, 3, 1)),
      "d_weight": _rel_err(gw, ref_gw.transpose(2, 3, 1, 0)),
  }
  assert max(errs.values()) <= RTOL, errs
  return errs


CASES = {
    "k3_s1_p1": dict(seed=0, h=5, w=6, s=1, p=1, d=1),  # the VoVNet DCN layer
    "k3_s2_p2_d2": dict(seed=1, h=7, w=6, s=2, p=2, d=2),
}


@pytest.mark.parametrize("name,impl", [("k3_s1_p1", "gather"), ("k3_s1_p1", "naive"),
                                       ("k3_s2_p2_d2", "gather")])
def test_matches_cuda_kernel_transliteration(name, impl):
  """Measured: every relative error <= 2e-7 (float32 op vs float64 reference)."""
  _check(CASES[name], impl)


def test_larger_canvas_same_numbers():
  """Official map 5x6 inside a 9x11 canvas full of garbage: identical official region."""
  _check(CASES["k3_s1_p1"], "gather", canvas=(9, 11))


def test_samples_really_cross_borders():
  """The test inputs do exercise every branch of the sampling rule (rows shown)."""
  _, off, _, _, _ = _inputs(0, 2, 3, 5, 6, 4, 3, 1, 1, 1)
  rows = (np.arange(5)[None, None, :, None] - 1 + (np.arange(9) // 3)[None, :, None, None]
          + off[:, 0::2])  # [N, 9, Ho, Wo]
  assert (rows <= -1).any() and (rows >= 5).any()  # outside (-1, H): contributes 0
  assert ((rows > -1) & (rows < 0)).any() and ((rows > 4) & (rows < 5)).any()  # half outside
  assert (np.floor(rows) == rows).any()  # exact integers (floor boundaries)


def test_zero_offsets_unit_mask_is_dense_conv():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 6, 7, 5)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(3, 3, 5, 4)), jnp.float32)
  for s, p, d in ((1, 1, 1), (2, 2, 2)):
    ho, wo = dc.out_size(6, 3, s, p, d), dc.out_size(7, 3, s, p, d)
    y = jax.jit(functools.partial(dc.modulated_deform_conv, stride=s, padding=p, dilation=d))(
        x, jnp.zeros((2, ho, wo, 18)), jnp.ones((2, ho, wo, 9)), wt)
    ref = jax.lax.conv_general_dilated(x, wt, (s, s), [(p, p), (p, p)], rhs_dilation=(d, d),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision="highest")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_offset_layout_interleaved_dy_dx():
  """Point t reads offset channels (2t, 2t+1) = (dy, dx): a whole-pixel shift of the
  centre point only, with all other points masked out, shifts the image."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(1, 6, 7, 2)), jnp.float32)
  wt = np.zeros((3, 3, 2, 2), np.float32)
  wt[1, 1] = np.eye(2)
  off = np.zeros((1, 6, 7, 18), np.float32)
  off[..., 8], off[..., 9] = 1.0, -2.0  # centre point t=4: dy=+1, dx=-2
  mask = np.zeros((1, 6, 7, 9), np.float32)
  mask[..., 4] = 1.0
  y = np.asarray(jax.jit(functools.partial(dc.modulated_deform_conv, padding=1))(
      x, jnp.asarray(off), jnp.asarray(mask), jnp.asarray(wt)))
  want = np.zeros_like(y)
  want[0, :5, 2:] = np.asarray(x)[0, 1:, :5]
  np.testing.assert_array_equal(y, want)


def test_torchvision_semantics_coincide():
  """torchvision.ops.deform_conv2d (same sampling rule and offset layout) if importable."""
  try:
    import torch
    from torchvision import ops as tv_ops
  except Exception as e:  # absent, or a build that does not match the installed torch
    pytest.skip(f"torchvision not usable: {type(e).__name__}: {str(e)[:80]}")
  x, off, m, wt, _ = _inputs(5, 2, 3, 5, 6, 4, 3, 1, 1, 1)
  ref = tv_ops.deform_conv2d(torch.from_numpy(x), torch.from_numpy(off), torch.from_numpy(wt),
                             padding=(1, 1), mask=torch.from_numpy(m)).numpy()
  y = dc.modulated_deform_conv(_nhwc(x), _nhwc(off), _nhwc(m), _hwio(wt), padding=1)
  assert _rel_err(y, ref.transpose(0, 2, 3, 1).astype(np.float64)) <= RTOL


def test_no_recompile_same_shapes():
  f = _vjp_fn(1, 1, 1, "gather")
  x, off, m, wt, g = _inputs(0, 2, 3, 5, 6, 4, 3, 1, 1, 1)
  valid = np.array([[5, 6], [4, 6]], np.int32)
  args = (_nhwc(x), _nhwc(off), _nhwc(m), _hwio(wt), _nhwc(g))
  f(*args, valid)
  size = f._cache_size()
  x2, off2, m2, wt2, g2 = _inputs(9, 2, 3, 5, 6, 4, 3, 1, 1, 1)
  f(_nhwc(x2), _nhwc(off2), _nhwc(m2), _hwio(wt2), _nhwc(g2), np.array([[3, 2], [5, 6]],
                                                                         np.int32))
  assert f._cache_size() == size


def test_bad_shapes_raise():
  x = jnp.zeros((1, 4, 4, 2))
  wt = jnp.zeros((3, 3, 2, 1))
  with pytest.raises(ValueError, match="offset shape"):
    dc.modulated_deform_conv(x, jnp.zeros((1, 4, 4, 9)), jnp.zeros((1, 4, 4, 9)), wt, padding=1)
  with pytest.raises(ValueError, match="input channels"):
    dc.modulated_deform_conv(x, jnp.zeros((1, 4, 4, 18)), jnp.zeros((1, 4, 4, 9)),
                             jnp.zeros((3, 3, 3, 1)), padding=1)


@pytest.mark.parametrize("s,p,d,valid", [(1, 1, 1, ((5, 6), (9, 11))), (2, 2, 2, ((7, 4), (3, 9)))])
def test_custom_backward_equals_autodiff(s, p, d, valid):
  """impl="gather" (hand-written backward: one scatter-add, row dots) vs JAX autodiff of
  the same forward ("gather_autodiff") on a 9x11 canvas holding official maps of other
  sizes (garbage outside them), offsets up to +-4 px: samples cross the borders, land in
  the padding and outside the official map. Measured: every relative error <= 2e-7."""
  x, off, m, wt, g = _inputs(11, 2, 6, 9, 11, 5, 3, s, p, d, spread=4.0)
  valid = np.array(valid, np.int32)
  vh, vw = valid[0]
  x[0, :, vh:], x[0, :, :, vw:] = 1e3, -1e3  # garbage outside image 0's official map
  args = (_nhwc(x), _nhwc(off), _nhwc(m), _hwio(wt), _nhwc(g), valid)
  got = _vjp_fn(s, p, d, "gather")(*args)
  want = _vjp_fn(s, p, d, "gather_autodiff")(*args)
  for name, a, b in zip(("forward", "d_input", "d_offset", "d_mask", "d_weight"), got, want):
    ref = np.asarray(b, np.float64)
    assert np.abs(ref).max() > 0, name
    assert _rel_err(a, ref) <= 1e-6, (name, _rel_err(a, ref))
  gx = np.asarray(got[1])
  assert (gx[0, vh:] == 0).all() and (gx[0, :, vw:] == 0).all()  # nothing read outside
