"""Convolution kernels with per-backend implementations (one home for conv lowering).

`conv2d(x, kernel, stride, pad, groups)` is what every model conv calls. It is
`lax.conv_general_dilated` except where a rewrite that is exact up to float rounding
measured faster on the backend (`benchmarks/kernels.py`):

* depthwise (groups == C_in == C_out): on CPU, XLA lowers a grouped conv to one small
  contraction per group; a k x k depthwise conv is instead computed as k*k shifted
  multiply-adds of strided slices (one fused elementwise loop, forward and backward);
  its kernel gradient sums each tap over row x column blocks in one fused add chain
  before XLA's reduction (`_depthwise_dk`).
* dense convs (groups 1), backward: XLA:CPU's kernel-gradient convolution (a conv whose
  "kernel" is the whole output gradient) runs 3-10x slower than the forward conv of the
  same FLOPs (V-39 stage 2, 2x280x272x128 -> 128: 1.15 s vs 0.13 s). On CPU the gradients
  are matmuls instead (`conv2d_dot_grad`): dK of a 1x1 conv is x^T @ g as a batch of
  row-block partial products (`_gram`), dK of a k x k conv is im2col(x)^T @ g over bands
  of two output rows in a `lax.scan` (`_dk_banded`: 0.21 s on that shape, its memory one
  band; maps under DK_BANDED_MIN_POSITIONS output positions keep XLA's gradients). Since
  XLA:CPU runs its own convolutions rather than YNNPACK's (`xla_flags`), its kernel gradient
  of a stride-1 conv is the faster one (2x108x100x128: 70 vs 85 ms with the forward; 50
  RoIs at 14x14x128: 27 vs 37 ms) but keeps about twice its input in temporaries, so
  stride-1 convs take `_dk_banded` only from DK_BANDED_MIN_BYTES_STRIDE1 of input up;
  dx = g @ K^T for 1x1 stride 1, XLA's transposed conv for other stride-1 kernels, else
  g @ K[i, j]^T placed on the strided tap grid.
* narrow stride-1 k x k dense convs (kh * kw * C_out <= NARROW_MAX_COLS: FCOS's bbox_pred
  and ctrness) on CPU (`conv2d_narrow`): XLA:CPU's conv and above all its kernel gradient
  run such shapes at 2-30 GFLOP/s (2x108x100x128 -> 4: forward 6.5 ms, dK 27 ms). The
  forward is one matmul of the padded input by all taps' kernels ([C, kh*kw*C_out]) and a
  sum of kh*kw shifted slices of that product (2.0 ms); dK is one matmul of the padded
  input by the output gradient placed at each tap's offset (`_dk_shifted_g`, 7 ms); dx
  stays XLA's transposed conv (2 ms).
* 1x1 dense convs, forward: on CPU the matmul x[:, ::s, ::s] @ K (`_dot_conv_fwd`), 3-4x
  faster than XLA:CPU's 1x1 conv (equal up to float summation order).
* a depthwise conv then a 1x1 conv (`depthwise_pointwise`, VoVNet's slim-DW layer): on CPU
  one backward that recomputes the depthwise output instead of keeping it from the forward.
* a value read by several loops that XLA:CPU would each recompute it in (a depthwise output
  under differentiation, a 1x1 conv's cotangent read by two matmuls) is made once
  (`numerics.materialize`).
* backward rules that pad or recompute from a saved input first tie it to the cotangent
  (`numerics.after`), so that XLA neither merges the op with the forward's identical one
  nor schedules it early: either kept every layer's copy alive through the backward.

Which library XLA:CPU runs the convs with (its own rather than YNNPACK) is an XLA flag set
on import (`centermask_jax.xla_flags`).

Layout NHWC / HWIO as `lax.conv_general_dilated(..., ("NHWC", "HWIO", "NHWC"))`.
"""
import contextlib
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from centermask_jax.ops import numerics

# backend -> implementation of depthwise convs ("lax" | "shifted"); see benchmarks/kernels.py.
DEPTHWISE_IMPL = {"cpu": "shifted"}
# backend -> dense convs ("lax" | "dot": matmul gradients, 1x1 forward as a matmul).
DENSE_IMPL = {"cpu": "dot"}
# output rows per band of `_dk_banded` (1-3 measured within noise of each other on CPU, 8+
# slower: the band's im2col should stay in cache)
DK_BAND_ROWS = 2
# k x k dense convs with fewer output positions (N * H' * W') keep XLA's conv and gradients:
# on such small maps either takes about a millisecond and the rewrites only add compile time
# (tests' tiny canvases, P5-P7)
DK_BANDED_MIN_POSITIONS = 4096
# stride-1 k x k dense convs take the matmul gradients only from inputs of this many bytes
# up: below, XLA's kernel gradient (with XLA's own convolutions, `xla_flags`) is faster, but
# it needs about twice its input in temporaries, which on larger maps raises the step's peak
DK_BANDED_MIN_BYTES_STRIDE1 = 16 << 20
# stride-1 k x k dense convs with at most this many kernel columns (kh * kw * C_out) take
# `conv2d_narrow` under DENSE_IMPL "dot" (3x3 convs to 1 or 4 channels measured 1.3-3x
# faster forward, 3-4x faster kernel gradient; to 16 channels the forward is slower on large
# maps: 2x140x136x128 22 vs 10 ms)
NARROW_MAX_COLS = 48


def _backend() -> str:
  return jax.default_backend()


@contextlib.contextmanager
def depthwise_impl(impl: str):
  """Within the block, depthwise convs traced for the current backend use `impl`
  ("lax" | "shifted"), e.g. "lax" for an exported graph whose runtime has its own
  grouped-conv kernel (tools/export_onnx). Trace-time only: compiled functions keep theirs."""
  if impl not in ("lax", "shifted"):
    raise ValueError(f"depthwise impl must be 'lax' or 'shifted', got {impl!r}")
  backend = _backend()
  had, old = backend in DEPTHWISE_IMPL, DEPTHWISE_IMPL.get(backend)
  DEPTHWISE_IMPL[backend] = impl
  try:
    yield
  finally:
    if had:
      DEPTHWISE_IMPL[backend] = old
    else:
      DEPTHWISE_IMPL.pop(backend, None)


def lax_conv2d(x, kernel, stride: int = 1, pad: int = 0, groups: int = 1):
  """x [N, H, W, Cin], kernel [k, k, Cin/groups, Cout] -> [N, H', W', Cout] (XLA conv)."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _out_hw(x, kernel, stride: int, pad: int):
  """x [N, H, W, C], kernel [kh, kw, ...] -> the conv's output (H', W')."""
  return tuple((x.shape[1 + a] + 2 * pad - kernel.shape[a]) // stride + 1 for a in (0, 1))


def _pad_hw(x, pad: int):
  """x [N, H, W, C] with `pad` zeros on each side of H and W (x itself when pad is 0)."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x


def _pad_hw_after(x, g, pad: int):
  """The backward's padded copy of the saved input x, made only once the cotangent g exists
  (`numerics.after`): padded from x alone, XLA scheduled every layer's copy early and kept
  them all alive through the backward; nor is the forward's pad reused, which would then
  live until here. x itself when pad is 0."""
  return _pad_hw(numerics.after(x, g), pad) if pad else x


def _lax_conv_dx(x, kernel, pad: int, g):
  """Input gradient of the stride-1 `lax_conv2d(x, kernel, 1, pad)` for cotangent g: the
  transpose of the conv in x alone (jax.vjp would also trace the forward conv, dead code that
  XLA drops but FLOP counts of the jaxpr see)."""
  return jax.linear_transpose(lambda a: lax_conv2d(a, kernel, 1, pad), x)(g)[0]


def _tap(xp, i, j, stride, ho, wo):
  """Strided slice of the padded input seen by kernel tap (i, j): [N, ho, wo, C]."""
  n, _, _, c = xp.shape
  return jax.lax.slice(xp, (0, i, j, 0),
                       (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                       (1, stride, stride, 1))


def _shifted_macs(xp, k, stride, ho, wo):
  """sum_ij xp[:, i + s*y, j + s*x, :] * k[i, j]: xp [N, Hp, Wp, C], k [kh, kw, C] -> [N, ho, wo, C]."""
  acc = None
  for i in range(k.shape[0]):
    for j in range(k.shape[1]):
      term = _tap(xp, i, j, stride, ho, wo) * k[i, j]
      # `term + acc`: XLA:CPU then fuses each tap as fma(tap, k, acc), which is PyTorch's
      # (oneDNN's) depthwise order bit for bit (row-major taps, FMA from the first product);
      # `acc + term` fused the first two products the other way round (docs/PARITY.md).
      acc = term if acc is None else term + acc
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shifted(x, kernel, stride: int = 1, pad: int = 0):
  """Depthwise conv as shifted multiply-adds.

  x [N, H, W, C], kernel [kh, kw, 1, C] -> [N, (H + 2p - kh) // s + 1, (W + 2p - kw) // s + 1, C];
  equal to `lax_conv2d(x, kernel, stride, pad, groups=C)` up to float summation order.
  Custom gradients keep only x and the kernel for the backward pass (autodiff of the taps
  would store kh*kw shifted copies of x): dx is the same shifted multiply-add on the
  (stride-dilated) output gradient with the flipped kernel, dk per tap (`_depthwise_dk`).
  """
  return _depthwise_fwd(x, kernel, stride, pad)[0]


def _depthwise_fwd(x, kernel, stride, pad):
  c = x.shape[-1]
  kh, kw = kernel.shape[:2]
  ho, wo = _out_hw(x, kernel, stride, pad)
  xp = _pad_hw(x, pad)
  k = kernel.reshape(kh, kw, c).astype(x.dtype)
  return _shifted_macs(xp, k, stride, ho, wo), (x, kernel)


def _depthwise_bwd(stride, pad, res, g):
  x, kernel = res
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  ho, wo = g.shape[1:3]
  g = g.astype(x.dtype)
  # dx[y] = sum_i gd[y + pad - i] k[i], gd = g dilated by the stride: pad gd so that tap
  # (kh-1-i) of a stride-1 walk reads gd[y + pad - i] (negative pads crop).
  lo_h, lo_w = kh - 1 - pad, kw - 1 - pad
  gp = jax.lax.pad(g, jnp.zeros((), g.dtype),
                   ((0, 0, 0), (lo_h, h + pad - (ho - 1) * stride - 1, stride - 1),
                    (lo_w, w + pad - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)))
  kf = kernel.reshape(kh, kw, c)[::-1, ::-1].astype(x.dtype)
  dx = _shifted_macs(gp, kf, 1, h, w)
  xp = _pad_hw_after(x, g, pad)
  dk = _depthwise_dk(xp, g, stride, kh, kw).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dk


# Row x column blocks of the depthwise kernel gradient's partial sums (see `_depthwise_dk`):
# at most DK_BLOCKS, and blocks of at least DK_BLOCK_MIN rows / columns. Each block is a few
# ops per tap to compile (tiny test train step: stablehlo 32.6k lines with 8x4 blocks
# everywhere, 22.3k with DK_BLOCK_MIN 8); fewer blocks make XLA's final reduction slower on
# small maps (27x25x112 map: 0.3-0.5 ms with 8x4 blocks, 0.4-0.9 ms with 3x3, 1.0-1.5 ms with
# 1x1), so the minimum stays small.
DK_BLOCKS = (8, 4)
DK_BLOCK_MIN = 8


def _blocks(size, count):
  """`count` contiguous blocks of `size` (at most; fewer when size < count), each of
  ceil(size / count) rows but the last: -> (block length, [(start, length)])."""
  step = -(-size // count)
  return step, [(a, min(step, size - a)) for a in range(0, size, step)]


def _depthwise_dk(xp, g, stride, kh, kw):
  """Depthwise kernel gradient: xp [N, Hp, Wp, C] padded input, g [N, ho, wo, C] ->
  [kh * kw, C] = sum over N, y, x of xp[:, i + s*y, j + s*x] * g, taps row-major.

  XLA:CPU does not fuse a product into a reduction over major dimensions, so
  `sum(tap * g, axis=(0, 1, 2))` writes every tap product out before summing it. Here each
  tap is first summed over row x column blocks of the map (DK_BLOCKS, fewer on small maps:
  DK_BLOCK_MIN) as one elementwise add chain (one fused loop that reads x and g once and
  writes 1/32 of the map), and only those partial sums (stacked over the taps) go through
  XLA's reduction.
  """
  n, ho, wo, c = g.shape
  acc = jnp.promote_types(xp.dtype, jnp.float32)
  nh, nw = (max(1, min(b, size // DK_BLOCK_MIN)) for b, size in zip(DK_BLOCKS, (ho, wo)))
  hb, rows = _blocks(ho, nh)
  wb, cols = _blocks(wo, nw)
  parts = []
  for i in range(kh):
    for j in range(kw):
      part = None
      for y0, yn in rows:
        for x0, xn in cols:
          t = jax.lax.slice(xp, (0, i + stride * y0, j + stride * x0, 0),
                            (n, i + stride * (y0 + yn - 1) + 1,
                             j + stride * (x0 + xn - 1) + 1, c), (1, stride, stride, 1))
          p = t.astype(acc) * jax.lax.slice(g, (0, y0, x0, 0),
                                            (n, y0 + yn, x0 + xn, c)).astype(acc)
          if (yn, xn) != (hb, wb):  # the short last blocks: zeros after them
            p = jnp.pad(p, ((0, 0), (0, hb - yn), (0, wb - xn), (0, 0)))
          part = p if part is None else part + p
      parts.append(part)
  return jnp.sum(jnp.stack(parts, axis=3), axis=(0, 1, 2))


def _depthwise_vjp_fwd(x, kernel, stride, pad):
  """Under differentiation the output is made once (`numerics.materialize`): XLA:CPU had
  copied its k*k multiply-adds into each of the ~8 loops that read it in MobileNetV2's train
  step (the forward, the ReLU6 / FrozenBN backward masks, the next 1x1 conv's two matmul
  views). VoVNet's `_dw_pw` output has one reader and keeps the fused form."""
  y, res = _depthwise_fwd(x, kernel, stride, pad)
  return numerics.materialize(y), res


depthwise_shifted.defvjp(_depthwise_vjp_fwd, _depthwise_bwd)


def _gram(a, b, acc):
  """a [N, H, W, C], b [N, H, W, D] -> sum over N, H, W of a^T b: [C, D] in dtype `acc`.

  As a batch of partial products over row blocks, then summed: one [C, D] output tile is
  too little parallel work for XLA:CPU's single matmul over N*H*W (3x slower at 432x400)."""
  c, d = a.shape[-1], b.shape[-1]
  m = a.shape[0] * a.shape[1] * a.shape[2]
  blocks = next((k for k in (32, 16, 8, 4, 2) if m % k == 0 and m // k >= 1024), 1)
  part = jnp.einsum("bmc,bmd->bcd", a.reshape(blocks, m // blocks, c),
                    b.reshape(blocks, m // blocks, d), preferred_element_type=acc)
  return jnp.sum(part, axis=0)


def _dk_banded(xp, g, stride: int, kh: int, kw: int, acc, rows: int = DK_BAND_ROWS):
  """Kernel gradient of a k x k conv: xp [N, Hp, Wp, C] (input, padded), g [N, H', W', D]
  -> [kh, kw, C, D] in dtype `acc`, sum over N, H', W' of tap(i, j)^T g.

  Bands of `rows` output rows in a scan: each band's kh*kw taps side by side ([N*rows*W',
  kh*kw*C], im2col) times the band's g, accumulated (only one band's im2col exists)."""
  hp, c = xp.shape[1], xp.shape[3]
  ho, wo, d = g.shape[1:]
  bands = -(-ho // rows)
  span = (rows - 1) * stride + kh  # input rows under one band
  need = (bands - 1) * rows * stride + span
  if need > hp:  # the last band's rows beyond H' meet zero rows of g and of xp
    xp = jnp.pad(xp, ((0, 0), (0, need - hp), (0, 0), (0, 0)))
  if bands * rows > ho:
    g = jnp.pad(g, ((0, 0), (0, bands * rows - ho), (0, 0), (0, 0)))

  def band(total, b):
    xb = jax.lax.dynamic_slice_in_dim(xp, b * rows * stride, span, axis=1)
    gb = jax.lax.dynamic_slice_in_dim(g, b * rows, rows, axis=1)
    cols = jnp.concatenate([_tap(xb, i, j, stride, rows, wo)
                            for i in range(kh) for j in range(kw)], axis=-1)
    part = jnp.einsum("mk,md->kd", cols.reshape(-1, kh * kw * c), gb.reshape(-1, d),
                      preferred_element_type=acc)
    return total + part, None

  total, _ = jax.lax.scan(band, jnp.zeros((kh * kw * c, d), acc), jnp.arange(bands))
  return total.reshape(kh, kw, c, d)


def _dot_conv_fwd(x, kernel, stride: int, pad: int):
  """The forward of `conv2d_dot_grad`: a 1x1 conv without padding as the matmul
  x[:, ::s, ::s] @ K (XLA:CPU's 1x1 conv is 3-4x slower than the same matmul, e.g. the
  V-39 OSA concat conv 2x280x272x768 -> 256: 1.21 s vs 0.39 s; equal to it up to float
  summation order, bit for bit on the V-39 shapes measured), other kernels as XLA's conv."""
  if kernel.shape[0] == kernel.shape[1] == 1 and pad == 0:
    xs = x[:, ::stride, ::stride] if stride > 1 else x
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.einsum("nhwc,cd->nhwd", xs, kernel[0, 0],
                      preferred_element_type=acc).astype(x.dtype)
  return lax_conv2d(x, kernel, stride, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_dot_grad(x, kernel, stride: int = 1, pad: int = 0):
  """Dense conv (groups 1) = `lax_conv2d` (1x1 as a matmul), gradients as matmuls:
  x [N, H, W, Cin], kernel [kh, kw, Cin, Cout] -> [N, H', W', Cout]."""
  return _dot_conv_fwd(x, kernel, stride, pad)


def _dot_grad_fwd(x, kernel, stride, pad):
  return _dot_conv_fwd(x, kernel, stride, pad), (x, kernel)


def _dot_grad_bwd(stride, pad, res, g):
  x, kernel = res
  n, h, w, cin = x.shape
  kh, kw, _, cout = kernel.shape
  ho, wo = g.shape[1:3]
  xp = _pad_hw_after(x, g, pad)
  acc = jnp.promote_types(x.dtype, jnp.float32)
  if kh == kw == 1:
    # read by two matmuls through different views: made once, not once per view
    g = numerics.materialize(g)
    dk = _gram(_tap(xp, 0, 0, stride, ho, wo), g, acc).reshape(kernel.shape)
  else:
    dk = _dk_banded(xp, g, stride, kh, kw, acc)
  dk = dk.astype(kernel.dtype)
  if kh == kw == 1 and stride == 1:
    dx = jnp.einsum("nhwd,cd->nhwc", g, kernel[0, 0], preferred_element_type=acc)
    dx = dx.astype(x.dtype)
  elif stride == 1:
    dx = _lax_conv_dx(x, kernel, pad, g)
  else:
    hp, wp = xp.shape[1:3]
    dxp = None
    for i in range(kh):
      for j in range(kw):
        t = jnp.einsum("nhwd,cd->nhwc", g, kernel[i, j], preferred_element_type=acc)
        t = jax.lax.pad(t, jnp.zeros((), t.dtype),
                        ((0, 0, 0), (i, hp - i - stride * (ho - 1) - 1, stride - 1),
                         (j, wp - j - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
        dxp = t if dxp is None else dxp + t
    dx = dxp[:, pad:pad + h, pad:pad + w].astype(x.dtype)
  return dx, dk


conv2d_dot_grad.defvjp(_dot_grad_fwd, _dot_grad_bwd)


def _narrow_fwd(x, kernel, pad: int):
  """`conv2d_narrow`'s forward: y = sum over taps (i, j) of P[:, i:i+H', j:j+W', tap],
  P = xp @ K as [N, Hp, Wp, kh*kw, Cout] (one matmul reads the input once)."""
  kh, kw, c, d = kernel.shape
  ho, wo = _out_hw(x, kernel, 1, pad)
  xp = _pad_hw(x, pad)
  n, hp, wp, _ = xp.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)
  k = kernel.astype(x.dtype).transpose(2, 0, 1, 3).reshape(c, kh * kw * d)
  prod = jnp.einsum("nhwc,ce->nhwe", xp, k, preferred_element_type=acc)
  prod = prod.reshape(n, hp, wp, kh * kw, d)
  y = None
  for i in range(kh):
    for j in range(kw):
      t = jax.lax.slice(prod, (0, i, j, i * kw + j, 0), (n, i + ho, j + wo, i * kw + j + 1, d))
      y = t if y is None else y + t
  return y.reshape(n, ho, wo, d).astype(x.dtype)


def _dk_shifted_g(xp, g, kh: int, kw: int, acc):
  """Kernel gradient of a stride-1 k x k conv with few output channels: xp [N, Hp, Wp, C]
  (padded input), g [N, H', W', D] -> [kh, kw, C, D] in dtype `acc`, as one product
  xp^T G, G [N, Hp, Wp, kh*kw*D] = g placed at each tap's offset (zeros around)."""
  hp, wp, c = xp.shape[1:]
  ho, wo, d = g.shape[1:]
  gs = jnp.concatenate([jnp.pad(g, ((0, 0), (i, hp - ho - i), (j, wp - wo - j), (0, 0)))
                        for i in range(kh) for j in range(kw)], axis=-1)
  dk = _gram(xp, gs, acc)  # [C, kh*kw*D]
  return dk.reshape(c, kh, kw, d).transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_narrow(x, kernel, pad: int = 0):
  """Stride-1 dense conv with few output channels: x [N, H, W, Cin], kernel [kh, kw, Cin,
  Cout] -> [N, H + 2 pad - kh + 1, W + 2 pad - kw + 1, Cout], equal to `lax_conv2d(x,
  kernel, 1, pad)` up to float summation order (per tap over Cin, then over the taps).
  Forward `_narrow_fwd`, dK `_dk_shifted_g`, dx XLA's transposed conv."""
  return _narrow_fwd(x, kernel, pad)


def _narrow_vjp_fwd(x, kernel, pad):
  return _narrow_fwd(x, kernel, pad), (x, kernel)


def _narrow_vjp_bwd(pad, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xp = _pad_hw_after(x, g, pad)
  dk = _dk_shifted_g(xp, g.astype(x.dtype), kh, kw, acc).astype(kernel.dtype)
  return _lax_conv_dx(x, kernel, pad, g), dk


conv2d_narrow.defvjp(_narrow_vjp_fwd, _narrow_vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dw_pw(x, kdw, kpw, stride, pad):
  return _dw_pw_fwd(x, kdw, kpw, stride, pad)[0]


def _dw_pw_fwd(x, kdw, kpw, stride, pad):
  y = _depthwise_fwd(x, kdw, stride, pad)[0]
  return _dot_conv_fwd(y, kpw, 1, 0), (x, kdw, kpw)


def _dw_pw_bwd(stride, pad, res, g):
  x, kdw, kpw = res
  # the depthwise output again, made after g (not merged with the forward's)
  y = _depthwise_fwd(numerics.after(x, g), kdw, stride, pad)[0]
  dy, dkpw = _dot_grad_bwd(1, 0, (y, kpw), g)
  dx, dkdw = _depthwise_bwd(stride, pad, (x, kdw), dy)
  return dx, dkdw, dkpw


_dw_pw.defvjp(_dw_pw_fwd, _dw_pw_bwd)


def depthwise_pointwise(x, kdw, kpw, stride: int = 1, pad: int = 1):
  """A depthwise conv then a 1x1 conv (VoVNet's slim-DW layer): x [N, H, W, C], kdw [k, k,
  1, C], kpw [1, 1, C, D] -> [N, H', W', D], the numbers of `conv2d(conv2d(x, kdw, stride,
  pad, groups=C), kpw)`. With the shifted depthwise and matmul gradients (CPU), the backward
  recomputes the depthwise output (k*k multiply-adds per element) instead of keeping it from
  the forward: one full-size tensor less per layer (the Lite V-19-slim-DW stem's is 89 MB at
  batch 2, 832x832)."""
  backend = _backend()
  if DEPTHWISE_IMPL.get(backend) == "shifted" and DENSE_IMPL.get(backend) == "dot":
    return _dw_pw(x, kdw, kpw, stride, pad)
  return conv2d(conv2d(x, kdw, stride, pad, groups=x.shape[-1]), kpw)


def conv2d(x, kernel, stride: int = 1, pad: int = 0, groups: int = 1,
           impl: Optional[str] = None):
  """The model's conv: x [N, H, W, Cin], kernel [k, k, Cin/groups, Cout] -> [N, H', W', Cout].

  impl: None = the backend's choice; "lax" forces XLA's conv (and its gradients),
  "shifted" the depthwise rewrite (depthwise only), "dot" the matmul gradients (groups 1;
  for 1x1 without padding the forward too), "narrow" `conv2d_narrow` (groups 1, stride 1).
  """
  cin, cout = x.shape[-1], kernel.shape[-1]
  depthwise = groups > 1 and groups == cin == cout
  if depthwise:
    impl = impl or DEPTHWISE_IMPL.get(_backend(), "lax")
    if impl == "shifted":
      return depthwise_shifted(x, kernel, stride, pad)
  elif groups == 1:
    if impl is None:
      impl = DENSE_IMPL.get(_backend(), "lax")
      ho, wo = _out_hw(x, kernel, stride, pad)
      taps = kernel.shape[0] * kernel.shape[1]
      if taps > 1:
        if x.shape[0] * ho * wo < DK_BANDED_MIN_POSITIONS:
          impl = "lax"
        elif impl == "dot" and stride == 1 and taps * cout <= NARROW_MAX_COLS:
          impl = "narrow"
        elif stride == 1 and x.size * x.dtype.itemsize < DK_BANDED_MIN_BYTES_STRIDE1:
          impl = "lax"
    if impl == "dot":
      return conv2d_dot_grad(x, kernel, stride, pad)
    if impl == "narrow":
      if stride != 1:
        raise ValueError(f"impl 'narrow' needs stride 1, got {stride}")
      return conv2d_narrow(x, kernel, pad)
  return lax_conv2d(x, kernel, stride, pad, groups)
