"""ops/kernels.py: every rewrite equals XLA's plain conv up to float rounding (fwd + grads)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centermask_jax.models import layers as L
from centermask_jax.ops import kernels as K
from fast_init import jit_init

# Each test compiles its own small programs, used by no other: dropped after each test (they
# piled up to 4.6 GB RSS over this file in CI).
pytestmark = pytest.mark.drop_programs

# (N, H, W, C, k, stride, pad): odd and even sizes, strides 1 and 2, the model's 3x3 p1
# and a 5x5 / no-padding case.
CASES = [(2, 9, 12, 8, 3, 1, 1), (1, 10, 7, 16, 3, 2, 1), (2, 11, 11, 4, 3, 2, 1),
         (1, 8, 9, 6, 5, 1, 2), (1, 9, 8, 5, 3, 1, 0)]


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# The tests below run their computations jitted (one program per case): eagerly, every
# primitive of the shifted multiply-adds was its own XLA compile (100-300 per case).
@functools.partial(jax.jit, static_argnums=(2, 3))
def _shifted_and_lax(x, kern, s, p):
  return (K.lax_conv2d(x, kern, s, p, groups=x.shape[-1]), K.depthwise_shifted(x, kern, s, p))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _shifted_and_lax_grads(x, kern, g, s, p):
  """Gradients w.r.t. input and kernel of a non-linear function of the output, for
  (lax, shifted)."""
  c = x.shape[-1]
  f = lambda fn: jax.grad(lambda a, b: jnp.sum(jnp.tanh(fn(a, b)) * g), (0, 1))(x, kern)
  return (f(lambda a, b: K.lax_conv2d(a, b, s, p, groups=c)),
          f(lambda a, b: K.depthwise_shifted(a, b, s, p)))


@pytest.mark.parametrize("n,h,w,c,k,s,p", CASES)
def test_depthwise_shifted_equals_lax_conv(n, h, w, c, k, s, p):
  x, kern = _rand((n, h, w, c), 0), _rand((k, k, 1, c), 1)
  ref, out = _shifted_and_lax(x, kern, s, p)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # gradients w.r.t. input and kernel of a non-linear function of the output
  g = _rand(ref.shape, 2)
  (gx_ref, gk_ref), (gx, gk) = _shifted_and_lax_grads(x, kern, g, s, p)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gk, gk_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,h,w,c,k,s", [(2, 37, 29, 3, 3, 1), (1, 23, 41, 5, 3, 2),
                                         (1, 5, 3, 4, 3, 1), (2, 17, 19, 2, 5, 2)])
@pytest.mark.parametrize("block_min", [1, K.DK_BLOCK_MIN])
def test_depthwise_dk_blocks_equal_float64_sum(n, h, w, c, k, s, block_min, monkeypatch):
  """The blocked kernel gradient (row x column block partial sums, short last blocks, more
  blocks than rows; and the fewer blocks small maps get by default) == sum over N, y, x of
  tap * g in float64."""
  monkeypatch.setattr(K, "DK_BLOCK_MIN", block_min)
  xp = _rand((n, h, w, c), 20)
  ho, wo = (h - k) // s + 1, (w - k) // s + 1
  g = _rand((n, ho, wo, c), 21)
  # a fresh jitted function per case: traced under this case's DK_BLOCK_MIN (jax's trace
  # cache, keyed by function and shapes, would not see the patched global)
  got = jax.jit(lambda xp, g: K._depthwise_dk(xp, g, s, k, k))(xp, g)
  a, b = np.asarray(xp, np.float64), np.asarray(g, np.float64)
  ref = np.stack([np.sum(a[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s] * b,
                         axis=(0, 1, 2)) for i in range(k) for j in range(k)])
  assert got.shape == (k * k, c)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_conv2d_dispatch():
  """conv2d picks the rewrite only for depthwise convs; both impls agree through it."""
  x = _rand((1, 8, 8, 6), 3)
  dw = _rand((3, 3, 1, 6), 4)
  a = K.conv2d(x, dw, 1, 1, groups=6, impl="lax")
  b = K.conv2d(x, dw, 1, 1, groups=6, impl="shifted")
  c = K.conv2d(x, dw, 1, 1, groups=6)
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
  # grouped (not depthwise) convs go to lax, dense k x k ones keep XLA's forward (exactly equal)
  grouped = _rand((3, 3, 3, 6), 5)
  np.testing.assert_array_equal(K.conv2d(x, grouped, 1, 1, groups=2),
                                K.lax_conv2d(x, grouped, 1, 1, groups=2))
  dense = _rand((3, 3, 6, 4), 6)
  np.testing.assert_array_equal(K.conv2d(x, dense, 1, 1), K.lax_conv2d(x, dense, 1, 1))


# (N, H, W, Cin, Cout, k, stride, pad): 1x1, 3x3 s1/s2 (odd and even sizes), 3x3 no pad
DENSE = [(2, 9, 12, 5, 7, 1, 1, 0), (2, 9, 12, 5, 7, 3, 1, 1), (1, 10, 7, 4, 6, 3, 2, 1),
         (2, 11, 11, 3, 8, 3, 2, 1), (1, 9, 8, 4, 3, 3, 1, 0), (1, 8, 8, 4, 5, 1, 2, 0)]


@pytest.mark.parametrize("n,h,w,ci,co,k,s,p", DENSE)
def test_dense_dot_grad_equals_lax_conv_grads(n, h, w, ci, co, k, s, p):
  x, kern = _rand((n, h, w, ci), 7), _rand((k, k, ci, co), 8)
  ref = K.lax_conv2d(x, kern, s, p)
  if k == 1:  # the matmul forward: the float64 conv up to float32 rounding
    ref64 = np.einsum("nhwc,cd->nhwd", np.asarray(x, np.float64)[:, ::s, ::s],
                      np.asarray(kern, np.float64)[0, 0])
    got = K.conv2d_dot_grad(x, kern, s, p)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_allclose(got, ref64, rtol=1e-6, atol=1e-6 * np.abs(ref64).max())
    np.testing.assert_allclose(ref, ref64, rtol=1e-6, atol=1e-6 * np.abs(ref64).max())
  else:
    np.testing.assert_array_equal(K.conv2d_dot_grad(x, kern, s, p), ref)  # same forward op
  g = _rand(ref.shape, 9)
  f = lambda fn: jax.grad(lambda a, b: jnp.sum(jnp.tanh(fn(a, b)) * g), (0, 1))(x, kern)
  gx_ref, gk_ref = f(lambda a, b: K.lax_conv2d(a, b, s, p))
  gx, gk = f(lambda a, b: K.conv2d(a, b, s, p, impl="dot"))
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gk, gk_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("n,h,w,ci,co,k,s,p", [d for d in DENSE if d[5] > 1])
def test_dk_banded_equals_float64_tap_sums(n, h, w, ci, co, k, s, p, rows):
  """The banded im2col kernel gradient == sum over N, H', W' of tap(i, j)^T g in float64,
  for band heights that do and do not divide H' (odd sizes, stride 2, no padding)."""
  x = np.asarray(_rand((n, h, w, ci), 13), np.float64)
  ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
  g = np.asarray(_rand((n, ho, wo, co), 14), np.float64)
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  want = np.stack([np.einsum("nhwc,nhwd->cd",
                             xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s], g)
                   for i in range(k) for j in range(k)]).reshape(k, k, ci, co)
  got = K._dk_banded(jnp.asarray(xp, jnp.float32), jnp.asarray(g, jnp.float32), s, k, k,
                     jnp.float32, rows=rows)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_dense_kxk_grads_banded_only_on_large_enough_maps(monkeypatch):
  """On CPU a 3x3 dense conv's kernel gradient is the banded scan for stride 2 from
  DK_BANDED_MIN_POSITIONS output positions (N * H' * W') up and for stride 1 from inputs of
  DK_BANDED_MIN_BYTES_STRIDE1 up; XLA's below (traced only)."""
  monkeypatch.setattr(K, "DENSE_IMPL", {K._backend(): "dot"})

  def uses_scan(n, h, w, stride, c=4):
    x = jax.ShapeDtypeStruct((n, h, w, c), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, c, 8), jnp.float32)  # wider than `conv2d_narrow`'s
    jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(K.conv2d(a, b, stride, 1)), 1))(x, k)
    return "scan" in str(jaxpr)
  assert K.DK_BANDED_MIN_POSITIONS == 4096 and K.DK_BANDED_MIN_BYTES_STRIDE1 == 16 << 20
  assert uses_scan(1, 128, 128, 2) and uses_scan(2, 64, 128, 2)  # 4096 output positions
  assert not uses_scan(1, 126, 128, 2) and not uses_scan(4, 32, 32, 2)
  assert uses_scan(1, 256, 256, 1, c=64)  # 16 MiB of input
  assert not uses_scan(1, 255, 256, 1, c=64) and not uses_scan(2, 64, 64, 1)


# (N, H, W, Cin, Cout, k, pad): FCOS's 3x3 p1 to 4 and 1 channels, no padding, 5x5 p2, odd sizes
NARROW = [(2, 9, 12, 5, 4, 3, 1), (1, 11, 7, 6, 1, 3, 1), (1, 9, 8, 4, 3, 3, 0),
          (1, 8, 9, 6, 1, 5, 2)]


@functools.partial(jax.jit, static_argnums=(3,))
def _narrow_and_grads(x, kern, g, p):
  """conv2d_narrow's output and its gradients w.r.t. input and kernel of sum(y * g)."""
  y, vjp = jax.vjp(lambda a, b: K.conv2d(a, b, 1, p, impl="narrow"), x, kern)
  return (y,) + vjp(g)


@pytest.mark.parametrize("n,h,w,ci,co,k,p", NARROW)
def test_narrow_conv_equals_float64_conv_and_its_gradients(n, h, w, ci, co, k, p):
  """`conv2d_narrow` (one matmul by all taps, then shifted sums; dK as one matmul with the
  shifted output gradient) == the float64 conv and its kernel gradient (sums of taps over
  N, H', W') up to float32 rounding; dx is XLA's transposed conv, as autodiff of lax's."""
  x, kern = _rand((n, h, w, ci), 21), _rand((k, k, ci, co), 22)
  ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
  g = _rand((n, ho, wo, co), 23)
  y, gx, gk = _narrow_and_grads(x, kern, g, p)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
  k64, g64 = np.asarray(kern, np.float64), np.asarray(g, np.float64)
  taps = [(i, j) for i in range(k) for j in range(k)]
  want_y = sum(np.einsum("nhwc,cd->nhwd", xp[:, i:i + ho, j:j + wo], k64[i, j]) for i, j in taps)
  want_k = np.stack([np.einsum("nhwc,nhwd->cd", xp[:, i:i + ho, j:j + wo], g64)
                     for i, j in taps]).reshape(k, k, ci, co)
  assert y.shape == want_y.shape and y.dtype == jnp.float32 and gk.dtype == jnp.float32
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6 * np.abs(want_y).max())
  np.testing.assert_allclose(gk, want_k, rtol=1e-5, atol=1e-6 * np.abs(want_k).max())
  _, lax_vjp = jax.vjp(lambda a: K.lax_conv2d(a, kern, 1, p), x)
  np.testing.assert_array_equal(gx, lax_vjp(g)[0])


def test_narrow_conv_in_bfloat16_keeps_the_dtypes():
  """bf16 compute (train.compute_dtype): output and input gradient in bf16, the kernel
  gradient in the kernel's float32, each close to the float32 result at bf16 precision."""
  x, kern = _rand((1, 11, 7, 6), 24), _rand((3, 3, 6, 4), 25)
  g = _rand((1, 11, 7, 4), 26)
  y32, gx32, gk32 = _narrow_and_grads(x, kern, g, 1)
  f = jax.jit(lambda a, b, c: jax.vjp(
      lambda a, b: K.conv2d(a, b.astype(jnp.bfloat16), 1, 1, impl="narrow"), a, b)[1](c))
  y = K.conv2d(x.astype(jnp.bfloat16), kern.astype(jnp.bfloat16), 1, 1, impl="narrow")
  gx, gk = f(x.astype(jnp.bfloat16), kern, g.astype(jnp.bfloat16))
  assert (y.dtype, gx.dtype, gk.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  for got, want in ((y, y32), (gx, gx32), (gk, gk32)):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05,
                               atol=0.02 * float(jnp.abs(want).max()))


def test_narrow_conv_only_for_few_output_channels_on_large_enough_maps(monkeypatch):
  """With the matmul gradients (CPU), a stride-1 k x k dense conv with kh*kw*Cout <=
  NARROW_MAX_COLS takes `conv2d_narrow` from DK_BANDED_MIN_POSITIONS output positions up;
  wider, strided or smaller convs do not (traced only)."""
  monkeypatch.setattr(K, "DENSE_IMPL", {K._backend(): "dot"})

  def narrow(n, h, w, co, stride=1, k=3):
    x = jax.ShapeDtypeStruct((n, h, w, 16), jnp.float32)
    kern = jax.ShapeDtypeStruct((k, k, 16, co), jnp.float32)
    return "conv2d_narrow" in str(jax.make_jaxpr(
        lambda a, b: K.conv2d(a, b, stride, k // 2))(x, kern))
  assert K.NARROW_MAX_COLS == 48
  assert narrow(2, 64, 32, 4) and narrow(1, 64, 64, 1) and narrow(1, 64, 64, 5)
  assert not narrow(1, 64, 64, 6) and not narrow(1, 64, 64, 4, stride=2)
  assert not narrow(1, 64, 63, 4)  # 4032 output positions
  assert not narrow(2, 64, 32, 2, k=5)  # 50 columns
  assert not narrow(1, 64, 64, 1, k=1)
  monkeypatch.setattr(K, "DENSE_IMPL", {})
  assert not narrow(2, 64, 32, 4)


@pytest.mark.parametrize("kind", ["depthwise", "dense"])
def test_backward_pads_wait_for_the_cotangent(kind, monkeypatch):
  """The backward's padded copy of a saved conv input is made after the cotangent
  (numerics.after): otherwise XLA merges it with the forward's pad (depthwise) or schedules
  it early (dense), and every layer's padded input stays alive through the backward. A
  chain of masked conv layers needs less temporary memory with the tie than without."""
  from centermask_jax.ops import numerics
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 64, 64, 16), np.float32))
  m = jnp.asarray(rng.random((2, 64, 64, 1)) > 0.2)
  shape = (3, 3, 1, 16) if kind == "depthwise" else (3, 3, 16, 16)
  ks = [jnp.asarray(rng.standard_normal(shape, np.float32) * 0.2) for _ in range(3)]
  pw = jnp.asarray(rng.standard_normal((1, 1, 16, 16), np.float32) * 0.2)

  def loss(ks, x):
    for k in ks:
      y = K.conv2d(jnp.where(m, x, 0.0), k, 1, 1, 16 if kind == "depthwise" else 1,
                   impl=None if kind == "depthwise" else "dot")  # the matmul gradients
      x = jax.nn.relu(K.conv2d(y, pw) if kind == "depthwise" else y)
    return jnp.sum(x * x)

  def temp_bytes():
    return jax.jit(jax.grad(loss)).lower(ks, x).compile().memory_analysis().temp_size_in_bytes
  tied = temp_bytes()
  monkeypatch.setattr(numerics, "after", lambda a, g: a)
  untied = temp_bytes()
  assert tied < 0.8 * untied, (tied, untied)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_pointwise_equals_the_two_convs_and_keeps_less(stride):
  """kernels.depthwise_pointwise: the numbers of the depthwise conv then the 1x1 conv, values
  and all three gradients bit for bit; its backward recomputes the depthwise output, so a
  chain of masked slim-DW layers compiles to less temporary memory than the two convs."""
  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.standard_normal((2, 20, 18, 16)), jnp.float32)
  kdw = jnp.asarray(rng.standard_normal((3, 3, 1, 16)) * 0.3, jnp.float32)
  kpw = jnp.asarray(rng.standard_normal((1, 1, 16, 24)) * 0.3, jnp.float32)
  fused = lambda x, a, b: K.depthwise_pointwise(x, a, b, stride, 1)
  two = lambda x, a, b: K.conv2d(K.conv2d(x, a, stride, 1, groups=16), b)
  y = fused(x, kdw, kpw)
  np.testing.assert_array_equal(y, two(x, kdw, kpw))
  w = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.tanh(f(*a)) * w), (0, 1, 2))(x, kdw, kpw)
           for f in (fused, two)]
  for a, b in zip(*grads):
    np.testing.assert_array_equal(a, b)
  if stride > 1:
    return
  m = jnp.asarray(rng.random((2, 64, 64, 1)) > 0.2)
  big = jnp.asarray(rng.standard_normal((2, 64, 64, 16)), jnp.float32)
  kws = [(jnp.asarray(rng.standard_normal((3, 3, 1, 16)) * 0.3, jnp.float32),
          jnp.asarray(rng.standard_normal((1, 1, 16, 16)) * 0.3, jnp.float32))
         for _ in range(6)]

  def temp_bytes(f):
    def loss(kws, x):
      for a, b in kws:
        x = jax.nn.relu(f(jnp.where(m, x, 0.0), a, b) * 0.9 + 0.1)
      return jnp.sum(x * x)
    return jax.jit(jax.grad(loss)).lower(kws, big).compile().memory_analysis().temp_size_in_bytes
  t_fused, t_two = temp_bytes(fused), temp_bytes(two)
  assert t_fused < 0.85 * t_two, (t_fused, t_two)  # 6.1 vs 7.9 MB


def test_class_predictor_selected_equals_full_then_select():
  """Mask predictor for one class per RoI == full per-class 1x1 conv, then the channel
  (forward and gradients w.r.t. input and parameters); out-of-range classes clip."""
  from centermask_jax.models.mask_head import ClassPredictor
  from centermask_jax.ops.postprocess import select_class_masks
  x = _rand((5, 6, 6, 8), 10)
  classes = jnp.asarray([3, 0, 6, -1, 9], jnp.int32)  # out of range: as select_class_masks
  m = ClassPredictor(7)
  params = m.init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(lambda p: _rand(p.shape, 11), params)  # non-zero bias
  g = _rand((5, 6, 6), 12)

  def full(p, a):
    return select_class_masks(m.apply(p, a), classes)

  def sel(p, a):
    return m.apply(p, a, classes)
  np.testing.assert_allclose(sel(params, x), full(params, x), rtol=1e-5, atol=1e-5)
  f = lambda fn: jax.grad(lambda p, a: jnp.sum(jnp.tanh(fn(p, a)) * g), (0, 1))(params, x)
  (gp_ref, gx_ref), (gp, gx) = f(full), f(sel)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(gp_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_deconv2x2_equals_lax_conv_transpose():
  """Mask-head deconv (k = s = 2) as per-row-parity GEMMs == XLA's transposed conv
  (out[2i+a, 2j+b] = x[i, j] @ k[a, b] + bias), forward and gradients."""
  from centermask_jax.models.mask_head import Deconv2x2
  x, k, b = _rand((3, 5, 4, 6), 13), _rand((2, 2, 6, 7), 14), _rand((7,), 15)
  g = _rand((3, 10, 8, 7), 16)

  def ref(x, k, b):
    return jax.lax.conv_transpose(x, k[::-1, ::-1], (2, 2), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC")) + b

  def ours(x, k, b):
    return Deconv2x2(7).apply({"params": {"kernel": k, "bias": b}}, x)
  np.testing.assert_allclose(ours(x, k, b), ref(x, k, b), rtol=1e-5, atol=1e-5)
  f = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.tanh(fn(*a)) * g), (0, 1, 2))(x, k, b)
  for a, r in zip(f(ours), f(ref)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def _max_pool_grad64(xp, g):
  """NumPy float64: 3x3 s2 VALID max-pool gradient, each window's g to its first maximal
  tap in row-major order (PyTorch CPU's rule)."""
  xp, g = np.asarray(xp, np.float64), np.asarray(g, np.float64)
  dx = np.zeros_like(xp)
  n, ho, wo, c = g.shape
  for b in range(n):
    for y in range(ho):
      for x in range(wo):
        win = xp[b, 2 * y:2 * y + 3, 2 * x:2 * x + 3].reshape(9, c)
        k = np.argmax(win, axis=0)  # first maximum
        np.add.at(dx[b], (2 * y + k // 3, 2 * x + k % 3, np.arange(c)), g[b, y, x])
  return dx


@pytest.mark.parametrize("shape,ties", [((2, 9, 12, 5), False), ((1, 10, 7, 3), True),
                                        ((2, 15, 15, 4), True)])
@pytest.mark.parametrize("zero_empty", [False, True])
def test_max_pool3s2_equals_reduce_window(shape, ties, zero_empty):
  """layers.max_pool3s2 (taps + custom gradient): forward == XLA's reduce-window max bit for
  bit; gradient == float64 first-max routing and XLA's reduce-window gradient (with ties
  from integer inputs and -inf windows, as max_pool_ceil's padding makes). zero_empty:
  -inf windows give 0 and no gradient, as `where(isneginf(y), 0, y)` after the pool."""
  import flax.linen as nn
  rng = np.random.default_rng(30)
  x = rng.integers(0, 3, size=shape) if ties else rng.normal(size=shape)
  x = x.astype(np.float32)
  x[:, -4:, -5:] = -np.inf
  xp = jnp.asarray(x)
  ref_pool = lambda a: nn.max_pool(a, (3, 3), strides=(2, 2), padding="VALID")
  ref_fn = (lambda a: L._zero_neg_inf(ref_pool(a))) if zero_empty else ref_pool
  ref = ref_fn(xp)
  empty = np.isneginf(np.asarray(ref_pool(xp)))
  assert empty.any() and zero_empty == (not np.isneginf(np.asarray(ref)).any())
  fn = functools.partial(L.max_pool3s2, zero_empty=zero_empty)
  np.testing.assert_array_equal(fn(xp), ref)
  g = _rand(ref.shape, 31)
  got = jax.vjp(fn, xp)[1](g)[0]
  g_routed = jnp.where(empty, 0.0, g) if zero_empty else g
  np.testing.assert_allclose(got, _max_pool_grad64(xp, g_routed), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, jax.vjp(ref_fn, xp)[1](g)[0], rtol=1e-6, atol=1e-6)
  g = g_routed
  # bit for bit a float32 accumulation tap by tap in row-major order
  x32, g32 = np.asarray(xp), np.asarray(g)
  n, ho, wo, c = g32.shape
  taps = [x32[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)]
  y = np.max(np.stack(taps), axis=0)
  left, want = g32.copy(), np.zeros_like(x32)
  for k, t in enumerate(taps):
    hit = t == y
    want[:, k // 3:k // 3 + 2 * ho - 1:2, k % 3:k % 3 + 2 * wo - 1:2] += np.where(hit, left, 0)
    left = np.where(hit, 0, left)
  np.testing.assert_array_equal(got, want)


def test_materialize_is_exact():
  """numerics.materialize returns every float32 bit pattern it is given: NaN, infinities,
  signed zeros, subnormals, the extremes."""
  from centermask_jax.ops import numerics
  special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38,
                      np.finfo(np.float32).max, np.finfo(np.float32).min, 1.0, -3.5],
                     np.float32)
  rand = np.random.default_rng(0).standard_normal(500).astype(np.float32) * 1e3
  x = np.concatenate([special, rand]).reshape(4, -1)
  y = np.asarray(jax.jit(numerics.materialize)(jnp.asarray(x)))
  np.testing.assert_array_equal(y.view(np.uint32), x.view(np.uint32))


def test_taps_and_cotangents_are_computed_once(monkeypatch):
  """A depthwise conv's output under differentiation, and a 1x1 conv's cotangent, are each
  one loop (`numerics.materialize`): without it XLA:CPU copies the depthwise's multiply-adds
  (and the cotangent's product) into every loop that reads them, so the compiled step holds
  more multiplies. Same gradients either way."""
  from centermask_jax.ops import numerics
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 16)), jnp.float32)
  kdw = jnp.asarray(rng.standard_normal((3, 3, 1, 16)) * 0.3, jnp.float32)
  kpw = jnp.asarray(rng.standard_normal((1, 1, 16, 24)) * 0.3, jnp.float32)
  a = jnp.asarray(rng.random(16) + 0.5, jnp.float32)

  def loss(kdw, kpw, x):  # MobileNetV2's dw -> FrozenBN -> ReLU6 -> 1x1 -> FrozenBN
    y = jax.nn.relu6(K.conv2d(x, kdw, 1, 1, groups=16) * a + 0.1)
    return jnp.sum(jnp.tanh(K.conv2d(y, kpw) * 1.5 + 0.2))

  def compiled():  # one compile: the program that is counted is the one that runs
    c = jax.jit(jax.grad(loss, (0, 1, 2))).lower(kdw, kpw, x).compile()
    return c(kdw, kpw, x), c.as_text().count(" multiply(")
  grads, once = compiled()
  monkeypatch.setattr(numerics, "materialize", lambda y: y)
  grads_fused, fused = compiled()
  for g1, g2 in zip(grads, grads_fused):
    np.testing.assert_array_equal(g1, g2)
  assert once < fused, (once, fused)


def _temp_bytes(fn, *args):
  """Temporary bytes of the compiled program (XLA's buffer assignment)."""
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_max_pool_keeps_only_the_winning_tap():
  """Under differentiation max_pool_ceil keeps one int8 per output from the forward to the
  backward: with the -inf windows zeroed outside the pool's custom gradient (as before) and
  the winning tap left to XLA, the backward's loop re-derived them from the padded input,
  which then stayed alive (a whole input-sized buffer more at the program's peak)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 32, 48, 64)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(64, 1024)) * 0.05, jnp.float32)

  def loss(pool):  # the pool, then a wide layer whose residuals make the peak
    return lambda x: jnp.sum(jnp.tanh(jax.nn.relu(pool(x) @ k)))
  old = lambda a: L._zero_neg_inf(L.max_pool3s2(jnp.pad(a, ((0, 0), (0, 1), (0, 1), (0, 0)),
                                                        constant_values=-jnp.inf)))
  new = lambda a: L.max_pool_ceil(a)

  def run(pool):  # one compile: the program measured is the one that runs
    c = jax.jit(jax.grad(loss(pool))).lower(x).compile()
    return c(x), c.memory_analysis().temp_size_in_bytes
  (grad, kept), (grad_old, before) = run(new), run(old)
  np.testing.assert_array_equal(grad, grad_old)
  padded = 2 * 33 * 49 * 64 * 4
  assert kept <= before - padded * 3 // 4, (kept, before, padded)


@pytest.mark.parametrize("relu", [False, True])
def test_group_norm_backward_equals_autodiff_and_keeps_less(relu):
  """layers.group_norm (masked GroupNorm, ReLU fused when `relu`; its backward recomputes
  the statistics from the saved input and applies the gradient's closed form): forward bit
  for bit the plain function's, gradients (input, scale, bias) equal to its autodiff's up
  to float rounding (the closed form sums in another order); in a chain of conv ->
  GroupNorm -> ReLU layers under grad the compiled program needs fewer temporary bytes
  (autodiff kept the centred and the normalised input of every layer as well)."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 24, 20, 32)) * 2 + 1, jnp.float32)
  mask = np.ones((2, 24, 20, 1), np.float32)
  mask[0, 17:], mask[1, :, 13:] = 0, 0
  mask = jnp.asarray(mask)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 32), jnp.float32)
  bias = jnp.asarray(rng.normal(size=32) * 0.3, jnp.float32)
  g = _rand(x.shape, 6)
  plain = lambda x, s, b: L._group_norm(x, mask, s, b, 8, 1e-5, relu)
  fused = lambda x, s, b: L.group_norm(x, mask, s, b, 8, 1e-5, relu)
  both = jax.jit(lambda *a: [(fn(*a), jax.vjp(fn, *a)[1](g)) for fn in (plain, fused)])
  (y0, g0), (y1, g1) = both(x, scale, bias)
  np.testing.assert_array_equal(y1, y0)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))
  assert np.all(np.asarray(g1[0])[np.asarray(mask)[..., 0] == 0] == 0)  # none outside

  ks = [jnp.asarray(rng.normal(size=(3, 3, 32, 32)) * 0.1, jnp.float32) for _ in range(4)]

  def chain(gn):
    def loss(x, ks):
      for kk in ks:
        x = gn(K.lax_conv2d(jnp.where(mask > 0, x, 0.0), kk, 1, 1), mask, scale, bias, 8,
               1e-5, True)
      return jnp.sum(x * x)
    return jax.grad(loss, (0, 1))
  kept, before = _temp_bytes(chain(L.group_norm), x, ks), _temp_bytes(chain(L._group_norm), x, ks)
  assert kept < before, (kept, before)


@pytest.mark.parametrize("top", [None, 6.0])
def test_relu_gradient_from_its_output(top):
  """layers.relu / relu6: jax.nn.relu's / relu6's values and gradients bit for bit (0 at
  both edges, -0 and NaN), the mask taken from the output."""
  special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1.0, -3.5, 6.0,
                      np.nextafter(6, 0), np.nextafter(6, 7)], np.float32)
  x = jnp.asarray(np.concatenate([special, np.random.default_rng(2).standard_normal(88)
                                  .astype(np.float32) * 5]))
  g = _rand(x.shape, 3)
  fn, ref = (L.relu, jax.nn.relu) if top is None else (L.relu6, jax.nn.relu6)
  f = jax.jit(lambda x: [(h(x), jax.vjp(h, x)[1](g)[0]) for h in (fn, ref)])
  (y, dx), (y_ref, dx_ref) = f(x)
  np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(y_ref).view(np.uint32))
  np.testing.assert_array_equal(np.asarray(dx).view(np.uint32),
                                np.asarray(dx_ref).view(np.uint32))


# `layers.relu_chain_concat`'s forward as plain ops, without its custom VJP (what autodiff
# differentiates layer by layer); taken once, before any test monkeypatches the name.
_plain_relu_chain_concat = L.relu_chain_concat.fun


@pytest.mark.parametrize("depthwise", [False, True])
def test_relu_chain_concat_backward_equals_autodiff(depthwise):
  """layers.relu_chain_concat (an OSA block's layers and their concatenation; its backward
  reads each layer's output from the concatenation): forward and gradients (block input,
  reduced input, kernels) bit for bit the plain chain's and its autodiff's, through
  VoVNet's dense and depthwise FrozenBN layers with a region mask."""
  from centermask_jax.models import vovnet as V
  rng = np.random.default_rng(8)
  c0, width, n = 24, 16, 3
  x0 = jnp.asarray(rng.normal(size=(2, 40, 32, c0)), jnp.float32)
  mask = np.ones((2, 40, 32, 1), np.float32)
  mask[0, 29:], mask[1, :, 21:] = 0, 0
  mask = jnp.asarray(mask)
  red = jnp.asarray(rng.normal(size=(2, 40, 32, width)), jnp.float32) if depthwise else None
  frozen = [(jnp.asarray(rng.uniform(0.5, 1.5, width), jnp.float32),
             jnp.asarray(rng.normal(size=width) * 0.3, jnp.float32)) for _ in range(n)]
  if depthwise:
    layer = V._dw_bn
    ks = [(jnp.asarray(rng.normal(size=(3, 3, 1, width)) * 0.3, jnp.float32),
           jnp.asarray(rng.normal(size=(1, 1, width, width)) * 0.3, jnp.float32))
          for _ in range(n)]
  else:
    layer = V._conv_bn
    ks = [(jnp.asarray(rng.normal(size=(3, 3, c0 if i == 0 else width, width)) * 0.1,
                       jnp.float32),) for i in range(n)]
  wc = jnp.asarray(rng.normal(size=(1, 1, c0 + n * width, 32)) * 0.1, jnp.float32)

  def plain(x0, red, ks):
    return _plain_relu_chain_concat(layer, width, x0, red, mask,
                                    tuple(k + f for k, f in zip(ks, frozen)))

  def chain(x0, red, ks):
    return L.relu_chain_concat(layer, width, x0, red, mask,
                               tuple(k + f for k, f in zip(ks, frozen)))

  def loss(fn):  # the block's 1x1 conv reads the concatenation, as OSAModule's
    return lambda x0, red, ks: jnp.sum(jnp.tanh(K.conv2d(fn(x0, red, ks), wc)))
  both = jax.jit(lambda *a: [(fn(*a), jax.grad(loss(fn), (0, 1, 2))(*a))
                             for fn in (plain, chain)])
  (y0, g0), (y1, g1) = both(x0, red, ks)
  np.testing.assert_array_equal(y1, y0)
  leaves0, leaves1 = jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)
  assert len(leaves0) == len(leaves1) == (2 if depthwise else 1) + len(jax.tree_util.tree_leaves(ks))
  for a, b in zip(leaves1, leaves0):
    np.testing.assert_array_equal(a, b)


def test_vovnet_osa_blocks_keep_each_layer_output_once(monkeypatch):
  """VoVNet V-39 under grad: with `relu_chain_concat` (each OSA layer's output kept only
  inside the concatenation) the compiled program needs fewer temporary bytes than with the
  plain chain (autodiff kept both) by more than stage 2's five layer outputs; gradients
  equal up to float rounding (the identity blocks' input cotangent is summed in another
  order: three terms)."""
  from centermask_jax.models import vovnet as V
  hw = (128, 160)
  m = V.VoVNet("V-39-eSE")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *hw, 3)), jnp.float32)
  phw = jnp.asarray([hw, (hw[0] - 32, hw[1] - 32)], jnp.int32)
  v = jit_init(m, jax.random.PRNGKey(0), x, phw)

  def loss(p):
    return sum(jnp.sum(jnp.tanh(t)) for t in m.apply({**v, "params": p}, x, phw).values())

  def run():  # one compile: the program measured is the one that runs
    c = jax.jit(jax.grad(loss)).lower(v["params"]).compile()
    return c(v["params"]), c.memory_analysis().temp_size_in_bytes
  grads, kept = run()

  monkeypatch.setattr(L, "relu_chain_concat", _plain_relu_chain_concat)
  grads_plain, before = run()
  stage2_outputs = 5 * 2 * (hw[0] // 4) * (hw[1] // 4) * 128 * 4
  assert kept <= before - stage2_outputs, (kept, before, stage2_outputs)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_plain)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(b))))
