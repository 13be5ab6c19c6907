"""PyTorch CPU's float32 arithmetic order for our own model (a parity diagnostic).

The Mv2 fixture's backbone amplifies any 1-ulp difference ~1.3x per block (docs/PARITY.md).
Our FrozenBN, ReLU6 and depthwise convs already round as PyTorch's CPU kernels; this module
changes only what differs, through flax method interception (our modules and weights are
otherwise unchanged):
* dense 1x1 convs with K <= 384 input channels (stride 1): one sequential FMA chain over the
  input channels, as oneDNN sums them (K = 960 is XLA's dot order already; K = 576 unknown);
* the 3 -> C stem conv: one sequential FMA chain over (kh, kw, c) (oneDNN's order at the
  fixture's size);
Found element by element against PyTorch 2.13 (AVX-512 CPU); slow (an FMA chain per output
instead of a matmul), for parity runs only: `tools.parity --conv-order pytorch`.
Not reproduced: detectron2's training-form FrozenBN (x * s + (b - mean * s), each operation
rounded), which the reference's training pass used: XLA:CPU contracts the multiply-add into
an FMA even across an optimization barrier, so `--train` stays 5 stages short (docs/PARITY.md).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from centermask_jax.models import layers as L
from centermask_jax.ops.padding import apply_mask

MAX_SEQUENTIAL_K = 384


def sequential_1x1(x, kernel):
  """x [N, H, W, K], kernel [1, 1, K, C] -> [N, H, W, C]: acc = fma(x_k, w_k, acc), k = 0..K-1.
  (`term + acc`: XLA:CPU contracts it into fma(x_k, w_k, acc).)"""
  w = kernel[0, 0]
  acc = None
  for k in range(w.shape[0]):
    term = x[..., k:k + 1] * w[k]
    acc = term if acc is None else term + acc
  return acc


def sequential_dense(x, kernel, stride: int, pad: int):
  """k x k conv as one FMA chain over (kh, kw, c): x [N, H, W, Cin], kernel [k, k, Cin, C]."""
  n, h, w, cin = x.shape
  kh, kw = kernel.shape[:2]
  ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  acc = None
  for i in range(kh):
    for j in range(kw):
      for c in range(cin):
        tap = jax.lax.slice(xp, (0, i, j, c),
                            (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c + 1),
                            (1, stride, stride, 1))
        term = tap * kernel[i, j, c]
        acc = term if acc is None else term + acc
  return acc


def pytorch_order():
  """Context in which our dense convs are summed in PyTorch CPU's order (module docstring)."""

  def interceptor(next_fun, args, kwargs, ctx):
    m = ctx.module
    if ctx.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(m, L.Conv) and m.groups == 1 and m.dtype is None:
      x = args[0]
      mask = args[1] if len(args) > 1 else kwargs.get("mask")
      k, cin = m.kernel_size, x.shape[-1]
      small_1x1 = k == 1 and m.stride == 1 and cin <= MAX_SEQUENTIAL_K
      stem = k > 1 and cin == 3
      if small_1x1 or stem:
        kernel = m.get_variable("params", "kernel")
        if small_1x1:
          y = sequential_1x1(x, kernel)
        else:
          pad = (k - 1) // 2 if m.pad is None else m.pad
          y = sequential_dense(apply_mask(x, mask), kernel, m.stride, pad)
        if m.use_bias:
          y = y + m.get_variable("params", "bias")
        return y
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)
