"""Per-op kernel timings: XLA's conv vs the exact rewrites of `ops/kernels.py`.

  python benchmarks/kernels.py [--iters 5] [--grad]

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


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--grad", action="store_true")
  args = ap.parse_args()
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from centermask_jax.ops import kernels as K

  print(f"backend {jax.default_backend()}; min wall s / min cpu s per call")
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
  main()
