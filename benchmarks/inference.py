"""Inference benchmark: compile seconds, median latency, images/s and peak RSS.

  python benchmarks/inference.py --config configs/centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py \
      --size 608x928 --batch 1 2 [--iters 10]

Each (config, size, batch) runs in a fresh subprocess so peak RSS is its own. Weights
are random (spec init); the timed function is the full jitted `predict` (backbone,
FPN, FCOS + NMS, RoIAlign, mask and MaskIoU heads) on a canvas of the given size.
Runs on whatever JAX backend is present (CPU here, GPU/TPU where available).

  python benchmarks/inference.py --config configs/NAME.py --predictor --batch 1 4 8 \
      [--images 16] [--image-size 480x640]

instead times the batched `Predictor` end to end (preprocessing, predict, detector
post-processing, mask paste) on a list of random uint8 images: images/s per batch size,
after a first (compiling) pass over the same list.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def run_one(cfg, h, w, batch, iters):
  import jax
  import jax.numpy as jnp

  from centermask_jax.models.centermask import CenterMask

  model = CenterMask(cfg)
  variables = jax.device_put(model.init(jax.random.PRNGKey(0)))
  images = jax.random.normal(jax.random.PRNGKey(1), (batch, h, w, 3)) * 50.0
  hw = jnp.array([[h, w]] * batch, jnp.int32)
  predict = jax.jit(model.predict)
  t0 = time.perf_counter()
  compiled = predict.lower(variables, images, hw, hw).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(variables, images, hw, hw))  # warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, images, hw, hw))
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return dict(config=cfg.name, size=f"{h}x{w}", batch=batch, backend=jax.default_backend(),
              device=str(jax.devices()[0].device_kind), compile_s=round(compile_s, 2),
              median_latency_s=round(med, 4), images_per_s=round(batch / med, 2),
              peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def run_predictor(cfg, batch, n_images, h, w):
  import jax
  import numpy as np

  from centermask_jax.models.centermask import CenterMask
  from centermask_jax.predictor import Predictor

  model = CenterMask(cfg)
  pred = Predictor(cfg, model.init(jax.random.PRNGKey(0)), model)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n_images)]
  t0 = time.perf_counter()
  pred(images, batch_size=batch)  # compiles (canvas, batch) and the paste
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  pred(images, batch_size=batch)
  dt = time.perf_counter() - t0
  return dict(config=cfg.name, size=f"{h}x{w}", batch=batch, images=n_images,
              backend=jax.default_backend(), first_pass_s=round(first_s, 2),
              images_per_s=round(n_images / dt, 2),
              peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def main(argv=None):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax.config import add_config_argument, parse_command_line
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(ap, multiple=True)
  ap.add_argument("--size", nargs="+", default=["608x928"], help="canvas HxW (multiples of 32)")
  ap.add_argument("--batch", nargs="+", type=int, default=[1, 2])
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--predictor", action="store_true",
                  help="time the batched Predictor on a list of images instead")
  ap.add_argument("--images", type=int, default=16, help="--predictor: list length")
  ap.add_argument("--image-size", default="480x640", help="--predictor: image HxW")
  ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  args, cfgs = parse_command_line(ap, argv)
  if args.predictor:
    return predictor_main(args, cfgs)
  if args._child:
    h, w = (int(v) for v in args.size[0].split("x"))
    print(json.dumps(run_one(cfgs[0], h, w, args.batch[0], args.iters)))
    return
  print(f"{'config':45s} {'size':>9s} {'batch':>5s} {'compile_s':>9s} {'latency_s':>9s} "
        f"{'img/s':>7s} {'peak_rss_MiB':>12s} backend")
  for config in args.config:
    for size in args.size:
      for batch in args.batch:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--config", config,
               "--size", size, "--batch", str(batch), "--iters", str(args.iters),
               *args.config_argv]
        r = _child_result(cmd, f"{config} {size} batch {batch}")
        if r is None:
          continue
        print(f"{r['config']:45s} {r['size']:>9s} {r['batch']:5d} {r['compile_s']:9.2f} "
              f"{r['median_latency_s']:9.3f} {r['images_per_s']:7.2f} {r['peak_rss_mib']:12.1f} "
              f"{r['backend']} ({r['device']})", flush=True)


def _child_result(cmd, label):
  """Runs one measuring child process; its last stdout line (JSON) as a dict, or None
  after printing `label: FAILED` and the end of its stderr."""
  from centermask_jax import host_memory  # huge pages for the child's XLA buffers
  out = subprocess.run(cmd, capture_output=True, text=True, env=host_memory.child_environ())
  if out.returncode:
    print(f"{label}: FAILED\n{out.stderr[-2000:]}")
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


def predictor_main(args, cfgs):
  h, w = (int(v) for v in args.image_size.split("x"))
  if args._child:
    print(json.dumps(run_predictor(cfgs[0], args.batch[0], args.images, h, w)))
    return
  print(f"{'config':45s} {'image':>9s} {'batch':>5s} {'first_pass_s':>12s} {'img/s':>7s} "
        f"{'peak_rss_MiB':>12s} backend  (Predictor, {args.images} images)")
  for config in args.config:
    for batch in args.batch:
      cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--predictor", "--config",
             config, "--batch", str(batch), "--images", str(args.images), "--image-size",
             args.image_size, *args.config_argv]
      r = _child_result(cmd, f"{config} batch {batch}")
      if r is None:
        continue
      print(f"{r['config']:45s} {r['size']:>9s} {r['batch']:5d} {r['first_pass_s']:12.2f} "
            f"{r['images_per_s']:7.2f} {r['peak_rss_mib']:12.1f} {r['backend']}", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax import runlog
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
