"""V-39 next to V-39-DCN: inference AND a training step, side by side.

  python benchmarks/dcn_models.py [--size 384x640] [--batch 1] [--iters 3]
      [--config A.py B.py] [--config.key=value ...]

Every measurement runs in a fresh child process (`benchmarks/inference.py --_child`: the
jitted `predict` on a random image; `benchmarks/train_step.py --_child`: the real pmapped
update step on a random batch of 8 instances, the training canvas set to --size), so
compile seconds, the median of --iters timed runs and the peak RSS are its own. Prints
one row per (mode, config) and, per mode, the ratio second config / first config.
Extra `--config.key=value` flags go to every child (e.g.
`--config.model.backbone.dcn_impl=gather_autodiff`: the deformable convs' backward by
autodiff instead of the hand-written one).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = ("configs/centermask_V_39_eSE_FPN_ms_3x.py",
                   "configs/centermask_V_39_eSE_dcn_FPN_ms_3x.py")


def main(argv=None):
  sys.path.insert(0, os.path.dirname(HERE))
  from centermask_jax.config import add_config_argument, parse_command_line
  sys.path.insert(0, HERE)
  from inference import _child_result

  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(ap, multiple=True, default=list(DEFAULT_CONFIGS))
  ap.add_argument("--size", default="384x640", help="canvas HxW (multiples of 32), both modes")
  ap.add_argument("--batch", type=int, default=1, help="images per step, both modes")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
  args, _ = parse_command_line(ap, argv)
  h, w = (int(v) for v in args.size.split("x"))
  print(f"{'mode':5s} {'config':45s} {'canvas':>9s} {'batch':>5s} {'compile_s':>9s} "
        f"{'median_s':>8s} {'peak_RSS_GiB':>12s}", flush=True)
  for mode in args.modes:
    rows = []
    for config in args.config:
      if mode == "infer":
        cmd = [sys.executable, os.path.join(HERE, "inference.py"), "--_child", "--config",
               config, "--size", args.size, "--batch", str(args.batch), "--iters",
               str(args.iters), *args.config_argv]
      else:
        cmd = [sys.executable, os.path.join(HERE, "train_step.py"), "--_child", "--config",
               config, "--per_device_batch", str(args.batch), "--iters", str(args.iters),
               f"--config.input.canvas_train=(({h},{w}),)", *args.config_argv]
      r = _child_result(cmd, f"{mode} {config}")
      if r is None:
        continue
      if mode == "infer":
        row = (r["config"], r["size"], r["compile_s"], r["median_latency_s"],
               r["peak_rss_mib"] / 1024)
      else:
        row = (r["config"], r["canvas"], r["compile_s"], r["step_s"], r["peak_mib"] / 1024)
      rows.append(row)
      print(f"{mode:5s} {row[0]:45s} {row[1]:>9s} {args.batch:5d} {row[2]:9.1f} {row[3]:8.3f} "
            f"{row[4]:12.2f}", flush=True)
    if len(rows) == 2:
      (_, _, c0, t0, m0), (_, _, c1, t1, m1) = rows
      print(f"{mode:5s} {'ratio (second / first)':45s} {'':>9s} {'':>5s} {c1 / c0:9.2f} "
            f"{t1 / t0:8.2f} {m1 / m0:12.2f}", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(HERE))
  from centermask_jax import host_memory, runlog
  host_memory.reexec_with_hugepage_malloc()  # huge pages for XLA's buffers (host_memory)
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
