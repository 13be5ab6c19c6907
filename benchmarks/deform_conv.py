"""Modulated deformable conv benchmark: the per-point ("naive") formulation vs. the
all-points gather ("gather"), next to a dense 3x3 conv of the same shape.

  python benchmarks/deform_conv.py [--image 800x1344] [--batch 1] [--iters 10]

Shapes are the V-39/57/99-eSE-DCN OSA 3x3 layers (stage3 160 ch at stride 8, stage4 192
at 16, stage5 224 at 32; in = out = stage channels) for the given input image size. For
each it prints compile seconds and the median time of the forward pass and of forward +
backward (gradients w.r.t. input, offset, mask and weight). Random inputs; offsets of
a few pixels. Runs on whatever JAX backend is present.
"""
import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from centermask_jax.ops import deform_conv as dc

LAYERS = (("stage3", 8, 160), ("stage4", 16, 192), ("stage5", 32, 224))


def _timed(fn, args, iters):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times)


def _fns(impl):
  if impl == "dense":
    def fwd(x, off, m, w):
      del off, m
      return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)],
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  else:
    fwd = functools.partial(dc.modulated_deform_conv, padding=1, impl=impl)

  def loss(x, off, m, w):
    return jnp.sum(fwd(x, off, m, w) ** 2)
  return fwd, jax.grad(loss, argnums=(0, 1, 2, 3))


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--image", default="800x1344", help="input image canvas HxW")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--impl", nargs="+", default=["dense", "naive", "gather", "gather_autodiff"])
  ap.add_argument("--layers", nargs="+", default=[n for n, _, _ in LAYERS],
                  choices=[n for n, _, _ in LAYERS])
  args = ap.parse_args()
  ih, iw = (int(v) for v in args.image.split("x"))
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), image {ih}x{iw}, "
        f"batch {args.batch}")
  print(f"{'layer':8s} {'map':>9s} {'ch':>4s} {'impl':>7s} {'fwd_compile_s':>13s} "
        f"{'fwd_ms':>9s} {'bwd_compile_s':>13s} {'fwd+bwd_ms':>10s}")
  for name, stride, ch in LAYERS:
    if name not in args.layers:
      continue
    h, w = -(-ih // stride), -(-iw // stride)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (args.batch, h, w, ch))
    off = jax.random.uniform(keys[1], (args.batch, h, w, 18), minval=-3, maxval=3)
    m = jax.nn.sigmoid(jax.random.normal(keys[2], (args.batch, h, w, 9)))
    wt = jax.random.normal(keys[3], (3, 3, ch, ch)) * 0.05
    for impl in args.impl:
      fwd, grad = _fns(impl)
      cf, tf = _timed(fwd, (x, off, m, wt), args.iters)
      cb, tb = _timed(grad, (x, off, m, wt), args.iters)
      print(f"{name:8s} {h:4d}x{w:<4d} {ch:4d} {impl:>7s} {cf:13.2f} {tf * 1e3:9.2f} "
            f"{cb:13.2f} {tb * 1e3:10.2f}", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax import host_memory, runlog
  host_memory.reexec_with_hugepage_malloc()  # huge pages for XLA's buffers (host_memory)
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
