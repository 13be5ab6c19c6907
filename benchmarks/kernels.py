"""Per-op kernel timings: XLA's conv vs the exact rewrites of `ops/kernels.py`.

  python benchmarks/kernels.py [--iters 5] [--grad] [--only SECTION]

Shapes are the biggest of their kind in Lite MobileNetV2 / V-19-slim-DW at the reference's
864x800 batch-2 input. Prints min wall and min process-CPU seconds per call of each
variant (forward, and with --grad forward + backward w.r.t. input and kernel) and the
max abs difference to the lax conv (relative to max |lax|).
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, N, H, W, C, stride)
DEPTHWISE = [
    ("mv2 features.1 dw", 2, 432, 400, 32, 1),
    ("mv2 features.2 dw s2", 2, 432, 400, 96, 2),
    ("mv2 features.3 dw", 2, 216, 200, 144, 1),
    ("mv2 features.6 dw", 2, 108, 100, 192, 1),
    ("mv2 features.12 dw", 2, 54, 50, 576, 1),
    ("v19dw stem_2 dw", 2, 432, 400, 64, 1),
    ("v19dw stage2 dw", 2, 216, 200, 64, 1),
]


def bench(fn, args, iters):
  import jax
  jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(iters):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return min(wall), min(cpu)


def bench_nms(iters):
  """FCOS-sized class-aware NMS: 2 images x 5000 candidates (2800 valid, 80 classes,
  boxes of 2-8 strides), full walk vs stopping at the top-50 / top-100 survivors."""
  import jax
  import numpy as np
  from centermask_jax.ops.nms import class_aware_nms
  rng = np.random.default_rng(0)
  n, m = 2, 5000
  xy = rng.uniform(0, 800, (n, m, 2))
  wh = rng.uniform(16, 300, (n, m, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  scores = rng.uniform(0.05, 0.4, (n, m)).astype(np.float32)
  classes = rng.integers(0, 80, (n, m)).astype(np.int32)
  valid = np.broadcast_to(np.arange(m)[None] < 2800, (n, m))
  full = None
  for k in (None, 50, 100):
    f = jax.jit(lambda *a, k=k: class_aware_nms(*a, 0.6, max_keep=k))
    order, keep = f(boxes, scores, classes, valid)
    if full is None:
      full = [np.asarray(order)[i][np.asarray(keep)[i]] for i in range(n)]
      note = f"{sum(len(x) for x in full)} kept"
    else:
      got = [np.asarray(order)[i][np.asarray(keep)[i]][:k] for i in range(n)]
      note = "first k equal" if all(np.array_equal(g, r[:k]) for g, r in zip(got, full)) \
          else "MISMATCH"
    wt, ct = bench(f, (boxes, scores, classes, valid), iters)
    print(f"nms {n}x{m} max_keep={k}: {wt:.4f}/{ct:.4f}  ({note})", flush=True)


def bench_deconv(iters):
  """SAG-Mask deconv (ConvTranspose2d k=2 s=2) on 100 RoIs: XLA's transposed conv vs the
  model's form (one contraction to 4*Cout + depth-to-space, `mask_head.Deconv2x2`)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  for r, c in ((100, 128), (100, 256)):
    x = jnp.asarray(rng.normal(size=(r, 14, 14, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2, c, c)) / c, jnp.float32)

    def d2s(x, k):
      n, h, w, _ = x.shape
      return jnp.einsum("nijc,abcd->niajbd", x, k).reshape(n, 2 * h, 2 * w, -1)

    def convt(x, k):  # out[2i+a, 2j+b] = x[i, j] @ k[a, b]: lax wants the flipped kernel
      return jax.lax.conv_transpose(x, k[::-1, ::-1], (2, 2), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = None
    row = [f"deconv {r}x14x14x{c}->28x28x{c}"]
    for name, fn in (("conv_transpose", convt), ("einsum+d2s", d2s)):
      f = jax.jit(fn)
      out = f(x, k)
      ref = out if ref is None else ref
      err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
      wt, ct = bench(f, (x, k), iters)
      g = jax.jit(jax.grad(lambda x, k, fn=fn: jnp.sum(jnp.tanh(fn(x, k))), (0, 1)))
      gw, gc = bench(g, (x, k), iters)
      row.append(f"{name} fwd {wt:.4f}/{ct:.4f} fwd+bwd {gw:.4f}/{gc:.4f} (rel err {err:.1e})")
    print("  ".join(row), flush=True)


def bench_bn_fold(iters):
  """conv -> FrozenBN -> ReLU vs the BN scale folded into the kernel (inference)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from centermask_jax.ops import kernels as K
  rng = np.random.default_rng(0)
  for n, h, w, ci, co, kk in ((2, 216, 200, 24, 144, 1), (2, 108, 100, 128, 128, 3)):
    x = jnp.asarray(rng.normal(size=(n, h, w, ci)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kk, kk, ci, co)), jnp.float32)
    sc = jnp.asarray(rng.uniform(0.5, 1.5, co), jnp.float32)
    sh = jnp.asarray(rng.normal(size=co), jnp.float32)
    plain = jax.jit(lambda x, k, sc, sh: jax.nn.relu(K.conv2d(x, k, 1, kk // 2) * sc + sh))
    folded = jax.jit(lambda x, k, sc, sh: jax.nn.relu(K.conv2d(x, k * sc, 1, kk // 2) + sh))
    a, b = plain(x, k, sc, sh), folded(x, k, sc, sh)
    err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    t1 = bench(plain, (x, k, sc, sh), iters)
    t2 = bench(folded, (x, k, sc, sh), iters)
    print(f"conv{kk}x{kk} {n}x{h}x{w}x{ci}->{co} +FrozenBN+ReLU: plain {t1[0]:.4f}/{t1[1]:.4f}"
          f"  folded {t2[0]:.4f}/{t2[1]:.4f} (rel err {err:.1e})", flush=True)


def bench_depthwise_dk(iters):
  """Depthwise 3x3 kernel gradient alone: one reduction per tap, sum(tap * g, (0, 1, 2))
  (XLA:CPU writes each tap product out first), vs `kernels._depthwise_dk` (block partial
  sums as one fused add chain per tap, then one reduction)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from centermask_jax.ops import kernels as K

  def per_tap(xp, g, s):
    ho, wo = g.shape[1:3]
    return jnp.stack([jnp.sum(K._tap(xp, i, j, s, ho, wo) * g, axis=(0, 1, 2))
                      for i in range(3) for j in range(3)])
  for label, n, h, w, c, s in DEPTHWISE:
    rng = np.random.default_rng(0)
    xp = jnp.asarray(rng.normal(size=(n, h + 2, w + 2, c)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(n, (h - 1) // s + 1, (w - 1) // s + 1, c)), jnp.float32)
    row = [f"dk {label:24s} {n}x{h}x{w}x{c} s{s}"]
    ref = None
    for name, fn in (("per-tap", per_tap), ("blocked", lambda xp, g, s: K._depthwise_dk(
        xp, g, s, 3, 3))):
      f = jax.jit(fn, static_argnums=2)
      out = f(xp, g, s)
      ref = out if ref is None else ref
      err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
      wt, ct = bench(f, (xp, g, s), iters)
      row.append(f"{name} {wt:.4f}/{ct:.4f}" + (f" (rel err {err:.1e})" if name != "per-tap"
                                                else ""))
    print("  ".join(row), flush=True)


# (label, N, H, W, Cin, Cout, k, stride)
DENSE = [
    ("fcos tower P3 3x3", 2, 108, 100, 128, 128, 3, 1),
    ("mask_fcn 3x3 (118 RoIs/img)", 236, 14, 14, 128, 128, 3, 1),
    ("maskiou_fcn s2", 236, 14, 14, 129, 128, 3, 2),
    ("mask predictor 1x1", 236, 28, 28, 128, 80, 1, 1),
    ("mv2 features.3 expand 1x1", 2, 216, 200, 24, 144, 1, 1),
    ("v19dw stem_1 3x3 s2", 2, 864, 800, 3, 64, 3, 2),
    ("v39 stem_2 3x3", 2, 560, 544, 64, 64, 3, 1),
    ("v39 stem_3 3x3 s2", 2, 560, 544, 64, 128, 3, 2),
    ("v39 stage2 OSA 3x3", 2, 280, 272, 128, 128, 3, 1),
    ("v39 fcos tower P3", 2, 140, 136, 256, 256, 3, 1),
]


def bench_dense_grad(iters):
  """Dense conv forward + backward: XLA's conv gradients vs the matmul gradients."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from centermask_jax.ops import kernels as K
  rng = np.random.default_rng(0)
  for label, n, h, w, ci, co, k, s in DENSE:
    x = jnp.asarray(rng.normal(size=(n, h, w, ci)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(k, k, ci, co)) / np.sqrt(k * k * ci), jnp.float32)
    row = [f"{label:28s} {n}x{h}x{w}x{ci}->{co} k{k} s{s}"]
    ref = None
    for impl in ("lax", "dot"):
      g = jax.jit(jax.grad(lambda x, kk, impl=impl: jnp.sum(jnp.tanh(
          K.conv2d(x, kk, s, k // 2, impl=impl))), (0, 1)))
      out = g(x, kern)
      ref = out if ref is None else ref
      err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(out, ref))
      wt, ct = bench(g, (x, kern), iters)
      row.append(f"{impl} fwd+bwd {wt:.4f}/{ct:.4f}" + (f" (rel err {err:.1e})"
                                                         if impl != "lax" else ""))
    print("  ".join(row), flush=True)


# (label, N, H, W, Cin, Cout): the convs `conv2d_narrow` takes at the reference's sizes
NARROW = [
    ("lite bbox_pred P3", 2, 108, 100, 128, 4),
    ("lite ctrness P3", 2, 108, 100, 128, 1),
    ("lite bbox_pred P4", 2, 54, 50, 128, 4),
    ("v39 bbox_pred P3", 2, 140, 136, 256, 4),
    ("v39 ctrness P3", 2, 140, 136, 256, 1),
]


def bench_narrow(iters):
  """3x3 stride-1 convs to few channels: XLA's conv vs `conv2d_narrow`, forward and
  forward + backward."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from centermask_jax.ops import kernels as K
  rng = np.random.default_rng(0)
  for label, n, h, w, ci, co in NARROW:
    x = jnp.asarray(rng.normal(size=(n, h, w, ci)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(3, 3, ci, co)) / np.sqrt(9 * ci), jnp.float32)
    row = [f"{label:20s} {n}x{h}x{w}x{ci}->{co}"]
    ref = None
    for impl in ("lax", "narrow"):
      f = jax.jit(lambda x, kk, impl=impl: K.conv2d(x, kk, 1, 1, impl=impl))
      g = jax.jit(jax.grad(lambda x, kk, impl=impl: jnp.sum(jnp.tanh(
          K.conv2d(x, kk, 1, 1, impl=impl))), (0, 1)))
      out = (f(x, kern),) + tuple(g(x, kern))
      ref = out if ref is None else ref
      err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(out, ref))
      (wf, cf), (wg, cg) = bench(f, (x, kern), iters), bench(g, (x, kern), iters)
      row.append(f"{impl} fwd {wf:.4f}/{cf:.4f} fwd+bwd {wg:.4f}/{cg:.4f}"
                 + (f" (rel err {err:.1e})" if impl != "lax" else ""))
    print("  ".join(row), flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--grad", action="store_true")
  ap.add_argument("--only", choices=("depthwise", "dk", "nms", "deconv", "bn", "dense",
                                     "narrow"),
                  help="run one section")
  args = ap.parse_args()
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from centermask_jax.ops import kernels as K

  print(f"backend {jax.default_backend()}; min wall s / min cpu s per call")
  if args.only in (None, "nms"):
    bench_nms(args.iters)
  if args.only in (None, "deconv"):
    bench_deconv(args.iters)
  if args.only in (None, "bn"):
    bench_bn_fold(args.iters)
  if args.only in (None, "dense"):
    bench_dense_grad(args.iters)
  if args.only in (None, "narrow"):
    bench_narrow(args.iters)
  if args.only in (None, "dk"):
    bench_depthwise_dk(args.iters)
  if args.only not in (None, "depthwise"):
    return
  for label, n, h, w, c, s in DEPTHWISE:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 1, c)) / 3, jnp.float32)
    row = [f"{label:24s} {n}x{h}x{w}x{c} s{s}"]
    ref = None
    for impl in ("lax", "shifted"):
      f = jax.jit(lambda x, k, impl=impl: K.conv2d(x, k, s, 1, c, impl=impl))
      out = f(x, k)
      if ref is None:
        ref = out
      err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
      wt, ct = bench(f, (x, k), args.iters)
      row.append(f"{impl} fwd {wt:.4f}/{ct:.4f}" + (f" (rel err {err:.1e})" if impl != "lax"
                                                     else ""))
      if args.grad:
        g = jax.jit(jax.grad(lambda x, k, impl=impl: jnp.sum(
            jnp.sin(K.conv2d(x, k, s, 1, c, impl=impl))), argnums=(0, 1)))
        wt, ct = bench(g, (x, k), args.iters)
        row.append(f"{impl} fwd+bwd {wt:.4f}/{ct:.4f}")
    print("  ".join(row), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax import host_memory, runlog
  host_memory.reexec_with_hugepage_malloc()  # huge pages for XLA's buffers (host_memory)
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
