"""Train-step benchmark: compile seconds, step time, images/s and peak memory.

  python benchmarks/train_step.py [--config configs/A.py configs/B.py] [--per_device_batch 2]
      [--iters 5] [--config.key=value ...]

Defaults: CenterMask-Lite V-19-slim-DW at 600 px and CenterMask V-39 at 800 px, batch 2 per
device on every local device. Each config runs in a fresh subprocess (peak memory is its
own). The timed function is the real pmapped update step (`training.step`: forward, FCOS
targets and losses, train proposals + NMS, RoI matching, pycocotools mask targets, mask
and MaskIoU losses, backward, the config's optimiser) on the config's landscape training
canvas, with random weights and a random unit-scale batch with 8 box/polygon
instances per image. Peak memory: process RSS on CPU, the allocator's peak on GPU/TPU.

`--memory-top N` also prints where the step's memory peak goes: XLA's buffer assignment of
the compiled step (dumped to a temporary directory) gives its temporary buffer size and the
buffers live at its peak, summed by the JAX op that made them (the N largest: forward
activations kept for the backward appear as `jvp(...)`, backward ones as `transpose(...)`).
"""
import argparse
import glob
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

DUMP_ENV, TOP_ENV = "CENTERMASK_JAX_BENCH_DUMP", "CENTERMASK_JAX_BENCH_TOP"
DEFAULT_CONFIGS = ("configs/centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py",
                   "configs/centermask_V_39_eSE_FPN_ms_3x.py")


def random_batch(config, d, b, canvas, rng, instances=8):
  """A [D, B, ...] batch in the data contract: random image, `instances` box+polygon GT."""
  import numpy as np
  h, w = canvas
  g = int(config.data.max_instances)
  p, v = int(config.data.max_polygon_parts), int(config.data.max_polygon_vertices)
  shape = (d, b)
  x0 = rng.uniform(0, w * 0.7, shape + (instances,))
  y0 = rng.uniform(0, h * 0.7, shape + (instances,))
  bw = rng.uniform(16, w * 0.3, shape + (instances,))
  bh = rng.uniform(16, h * 0.3, shape + (instances,))
  boxes = np.zeros(shape + (g, 4), np.float32)
  boxes[..., :instances, :] = np.stack([x0, y0, x0 + bw, y0 + bh], -1)
  polys = np.zeros(shape + (g, p, v, 2), np.float32)
  b_ = boxes[..., :instances, :]
  corners = np.stack([b_[..., [0, 1]], b_[..., [2, 1]], b_[..., [2, 3]], b_[..., [0, 3]]], -2)
  polys[..., :instances, 0, :4, :] = corners
  poly_len = np.zeros(shape + (g, p), np.int32)
  poly_len[..., :instances, 0] = 4
  valid = np.zeros(shape + (g,), bool)
  valid[..., :instances] = True
  hw = np.broadcast_to(np.array([h, w], np.int32), shape + (2,)).copy()
  return {
      # unit scale: random (not ImageNet) weights overflow on raw 0-255-scale pixels
      "image": rng.normal(0, 1, shape + (h, w, 3)).astype(np.float32),
      "image_hw": hw, "padded_hw": hw, "orig_hw": hw,
      "image_id": np.arange(d * b, dtype=np.int32).reshape(shape),
      "is_real": np.ones(shape, bool),
      "gt_boxes": boxes, "gt_classes": rng.integers(0, config.model.num_classes, shape + (g,)
                                                    ).astype(np.int32),
      "gt_valid": valid, "gt_polys": polys, "gt_poly_len": poly_len,
  }


def peak_memory_mib(device):
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host RSS"


def run_one(cfg, per_device_batch, iters):
  import jax
  import numpy as np

  from centermask_jax import host_memory, parallel
  from centermask_jax.data import transforms
  from centermask_jax.models.centermask import CenterMask
  from centermask_jax.training import optimizer as opt_lib, step as step_lib

  devices = jax.local_devices()
  d, b = len(devices), per_device_batch
  sizes = cfg.input.min_size_train
  canvas = transforms.canvas_hw(max(sizes), cfg.input.max_size_train, True,
                                override=tuple(cfg.input.canvas_train) and cfg.input.canvas_train[0])
  model = CenterMask(cfg)
  variables = model.init(jax.random.PRNGKey(0), (128, 128))
  tx = opt_lib.make_optimizer(cfg, variables["params"])
  state = parallel.replicate(
      step_lib.init_state(variables["params"], variables["frozen_bn"], tx), devices)
  p_step = step_lib.make_train_step(model, cfg, tx, opt_lib.lr_schedule(cfg), devices=devices)
  rng = np.random.default_rng(0)
  batches = [random_batch(cfg, d, b, canvas, rng) for _ in range(2)]
  key = jax.random.PRNGKey(1)
  t0 = time.perf_counter()
  state, m = p_step(state, batches[0], key)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  host_memory.release_host_memory()  # as the trainer does after compiling
  times = []
  for i in range(iters):
    t0 = time.perf_counter()
    state, m = p_step(state, batches[i % 2], key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  mem, mem_kind = peak_memory_mib(devices[0])
  out = {}
  if os.environ.get(DUMP_ENV):
    peak, rows = hlo_memory_peak(os.environ[DUMP_ENV], top=int(os.environ[TOP_ENV]))
    out = dict(hlo_peak_mib=round(peak / 2**20, 1),
               hlo_top=[(round(b / 2**20, 1), n) for b, n in rows])
  return dict(out, config=cfg.name, canvas=f"{canvas[0]}x{canvas[1]}", devices=d,
              per_device_batch=b, backend=jax.default_backend(),
              device=str(devices[0].device_kind), compile_s=round(first - med, 2),
              step_s=round(med, 3), images_per_s=round(d * b / med, 2),
              peak_mib=round(mem, 1), peak_kind=mem_kind,
              loss=round(parallel.first_device_metrics(m)["total_loss"], 4))


def hlo_memory_peak(dump_dir, top):
  """-> (peak bytes, [(bytes, op path)] top entries) of the dumped module with the largest
  peak (XLA's `*-live-range.txt`: 'Stack trace breakdown for peak usage')."""
  best = (0, [])
  for path in glob.glob(os.path.join(dump_dir, "*-live-range.txt")):
    text = open(path).read()
    m = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", text)
    if not m:
      continue
    peak = int(m.group(1).replace(" ", ""))
    if peak <= best[0]:
      continue
    rows = []
    for line in text[m.end():].splitlines():
      e = re.match(r"^ {6}[├└]── (.+?) \([\d.]+%, total: ([\d ]+) bytes", line)
      if e:
        name = re.sub(r"^jit\([^)]*\)/", "", e.group(1))
        rows.append((int(e.group(2).replace(" ", "")), name))
    best = (peak, sorted(rows, reverse=True)[:top])
  return best


def main(argv=None):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax.config import add_config_argument, parse_command_line
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(ap, multiple=True, default=list(DEFAULT_CONFIGS))
  ap.add_argument("--per_device_batch", type=int, default=2)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--memory-top", type=int, default=0, metavar="N",
                  help="also print the N largest buffers live at the step's memory peak")
  ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  args, cfgs = parse_command_line(ap, argv)
  if args._child:
    print(json.dumps(run_one(cfgs[0], args.per_device_batch, args.iters)))
    return
  print(f"{'config':45s} {'canvas':>9s} {'dev x b':>7s} {'compile_s':>9s} {'step_s':>7s} "
        f"{'img/s':>6s} {'peak_MiB':>9s} backend")
  for config in args.config:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--config", config,
           "--per_device_batch", str(args.per_device_batch), "--iters", str(args.iters),
           *args.config_argv]
    from centermask_jax import host_memory  # huge pages for the child's XLA buffers
    env = host_memory.child_environ()
    tmp = None
    if args.memory_top:
      tmp = tempfile.TemporaryDirectory(prefix="centermask-jax-hlo-")
      env[DUMP_ENV], env[TOP_ENV] = tmp.name, str(args.memory_top)
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={tmp.name}".strip()
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:  # the dump (tens of MB per program) also goes on an interrupt
      if tmp is not None:
        tmp.cleanup()
    if out.returncode:
      print(f"{config}: FAILED\n{out.stderr[-3000:]}", flush=True)
      continue
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{r['config']:45s} {r['canvas']:>9s} {r['devices']:>3d} x {r['per_device_batch']:<1d} "
          f"{r['compile_s']:9.1f} {r['step_s']:7.2f} {r['images_per_s']:6.2f} "
          f"{r['peak_mib']:9.0f} {r['backend']} ({r['device']}, {r['peak_kind']}; "
          f"loss {r['loss']})", flush=True)
    if "hlo_peak_mib" in r:
      print(f"  XLA buffers live at the step's peak: {r['hlo_peak_mib']:.0f} MiB; largest, "
            "by the op that made them:")
      for mib, name in r["hlo_top"]:
        print(f"  {mib:9.1f} MiB  {name}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax import runlog
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
