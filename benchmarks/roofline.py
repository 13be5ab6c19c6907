"""Roofline of the vs_reference work: the FLOPs of each (model, mode), the rate each side
runs them at, and the rate issue 11's "1.5x centermask2" would take on this machine.

  python benchmarks/roofline.py [--models v19dw mv2 v39] [--modes ...]
      [--ours vs_reference.json] [--scale S] [--fg-slots 32]

FLOPs are counted from the jaxpr of exactly the program `vs_reference.py` times (predict,
or the train step at the foreground-slot bucket it ran at): 2 x multiply-adds of every
convolution and matmul, sub-programs included (a `lax.scan` body times its length, the
largest `cond` branch); elementwise work is not counted, and depthwise convs are counted in
their `lax` form (same multiply-adds as the shifted rewrite). Nothing is compiled.

Per row it prints: GFLOP; the reference's median on its own machine and the GFLOP/s that
implies there (against that machine's 180 / 152.5 GFLOP/s torch matmul / 3x3 conv of
`../shared/perf/calibrate.py`); the reference scaled to this machine; the time and GFLOP/s
that 1.5x of it takes; with `--ours` (a `vs_reference.py --json` file), our median and
GFLOP/s from the same run and its scale. This machine's peaks are measured in the same
process: torch's (calibrate.py, if torch is installed) and JAX's (the same two ops, 2048^3
matmul and 3x3 128 -> 128 conv on 200x200, median of 20).
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_reference as vr  # noqa: E402

REF_MM_GFLOPS, REF_CONV_GFLOPS = 180.0, 152.5  # calibrate.py's reference machine


def _subjaxprs(params):
  """The jaxprs among an equation's params (a ClosedJaxpr / Jaxpr, or a tuple of them)."""
  from jax.extend import core
  out = []
  for v in params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(item, core.ClosedJaxpr):
        out.append(item.jaxpr)
      elif isinstance(item, core.Jaxpr):
        out.append(item)
  return out


def flops(jaxpr) -> float:
  """2 x multiply-adds of the convolutions and matmuls of a jaxpr, sub-jaxprs included.

  conv_general_dilated: 2 x output size x (kernel size / output features), which holds for
  feature- and batch-grouped convs (kernel gradients); dot_general: 2 x output size x
  contracted size. scan bodies count `length` times, cond the largest branch, while bodies
  once (none in these programs' convs)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_feat = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_feat
    elif name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lc])
    subs = [flops(j) for j in _subjaxprs(eqn.params)]
    if subs:
      if name == "cond":
        total += max(subs)
      else:
        total += sum(subs) * (eqn.params["length"] if name == "scan" else 1)
  return total


def program_flops(key, mode, shared, fg_slots):
  """GFLOP of vs_reference's program for (model, mode), traced with abstract weights."""
  import jax
  import jax.numpy as jnp

  from centermask_jax.config import load_config
  from centermask_jax.models.centermask import CenterMask
  from centermask_jax.ops import kernels
  from centermask_jax.training import optimizer as opt_lib, step as step_lib

  cfg = load_config(os.path.join(vr.REPO, "configs", vr.MODELS[key][0] + ".py"))
  model = CenterMask(cfg)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
  imgs = vr.load_images(cfg, shared)
  sel, padded = vr.mode_batch(cfg, imgs, mode)
  n = len(sel)
  image = jax.ShapeDtypeStruct((n, *padded, 3), jnp.uint8)
  hw = jax.ShapeDtypeStruct((n, 2), jnp.int32)
  backend = jax.default_backend()
  saved = kernels.DEPTHWISE_IMPL.get(backend)
  kernels.DEPTHWISE_IMPL[backend] = "lax"  # counted as convs (same multiply-adds)
  try:
    if mode.startswith("infer"):
      jaxpr = jax.make_jaxpr(model.predict)(variables, image, hw, hw)
    else:
      gt = vr.load_gt(shared, [im[1] for im in imgs])
      batch = {k: jax.ShapeDtypeStruct(np.shape(gt[k]), np.asarray(gt[k]).dtype)
               for k in ("gt_boxes", "gt_classes", "gt_valid", "gt_polys", "gt_poly_len")}
      batch.update(image=image, image_hw=hw, padded_hw=hw)
      cfg.train.mask_loss_norm = "global"  # as vs_reference's train_b2
      tx = opt_lib.make_optimizer(cfg, variables["params"])
      state = jax.eval_shape(lambda v: step_lib.init_state(v["params"], v["frozen_bn"], tx),
                             variables)
      step = functools.partial(step_lib.train_step, model=model, config=cfg, tx=tx,
                               lr_fn=opt_lib.lr_schedule(cfg), axis_name=None,
                               fg_slots=fg_slots)
      jaxpr = jax.make_jaxpr(step)(state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
  finally:
    kernels.DEPTHWISE_IMPL[backend] = saved
  return flops(jaxpr.jaxpr) / 1e9, f"{padded[0]}x{padded[1]}"


def _median_s(fn, reps=20, warm=3):
  for _ in range(warm):
    fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def jax_peaks():
  """JAX's GFLOP/s on calibrate.py's two ops (2048^3 matmul; 3x3 128 -> 128 conv, 200x200)."""
  import jax
  import jax.numpy as jnp
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (2048, 2048))
  b = jax.random.normal(k2, (2048, 2048))
  x = jax.random.normal(k1, (1, 200, 200, 128))
  w = jax.random.normal(k2, (3, 3, 128, 128))
  mm = jax.jit(jnp.matmul)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  t_mm = _median_s(lambda: mm(a, b).block_until_ready())
  t_cv = _median_s(lambda: conv(x, w).block_until_ready())
  return 2 * 2048**3 / t_mm / 1e9, 2 * 128 * 128 * 9 * 200 * 200 / t_cv / 1e9


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", nargs="+", default=list(vr.MODELS), choices=list(vr.MODELS))
  ap.add_argument("--modes", nargs="+", default=list(vr.MODES), choices=list(vr.MODES))
  ap.add_argument("--ours", help="a vs_reference.py --json file: our medians and its scale")
  ap.add_argument("--scale", type=float,
                  help="reference -> this machine (default: --ours's median, else calibrate)")
  ap.add_argument("--fg-slots", type=int, default=32,
                  help="train step's foreground-slot bucket (default: --ours's, else 32)")
  ap.add_argument("--shared", default=os.path.join(os.path.dirname(vr.REPO), "shared"))
  args = ap.parse_args(argv)

  ours = {}
  scale = args.scale
  if args.ours:
    with open(args.ours) as f:
      run = json.load(f)
    ours = {(r["model"], r["mode"]): r for r in run["rows"]}
    scale = scale or run.get("scale_median")
  cal = vr.calibrate(args.shared)
  if cal:
    scale = scale or cal["scale"]
  if scale is None:
    sys.exit("error: no scale: pass --scale or --ours, or install torch for calibrate.py")
  jmm, jcv = jax_peaks()
  print(f"this machine, 2 threads: JAX matmul {jmm:.0f} / 3x3 conv {jcv:.0f} GFLOP/s"
        + (f"; torch {cal['mm2048_gflops']:.0f} / {cal['conv_gflops']:.0f}" if cal else "")
        + f"; reference machine (torch) {REF_MM_GFLOPS:.0f} / {REF_CONV_GFLOPS:.1f}; "
        f"scale {scale:.3f}", flush=True)
  print("| model | mode | padded | GFLOP | reference s (its machine) | its GFLOP/s | reference s "
        "scaled | 1.5x needs s | 1.5x needs GFLOP/s | ours s | our GFLOP/s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for key in args.models:
    for mode in args.modes:
      row = ours.get((key, mode), {})
      gf, padded = program_flops(key, mode, args.shared, row.get("fg_slots") or args.fg_slots)
      ref = vr.REFERENCE[(key, mode)][0]
      need = ref * scale / 1.5
      mine = (f"{row['median_s']:.3f} | {gf / row['median_s']:.0f}" if row else "- | -")
      print(f"| {vr.MODELS[key][2]} | {mode} | {padded} | {gf:.1f} | {ref:.3f} | "
            f"{gf / ref:.0f} | {ref * scale:.3f} | {need:.3f} | {gf / need:.0f} | {mine} |",
            flush=True)


if __name__ == "__main__":
  sys.path.insert(0, vr.REPO)
  from centermask_jax import runlog
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
