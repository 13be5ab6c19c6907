"""Train input pipeline throughput (images/s) at Lite (580/600, max 1000) and full
(640..800, max 1333) sizes, and the time to the first batch when resuming at step 0 and at
`--resume-step` (default 10^6; the cost must not grow with the step).

  python benchmarks/input_pipeline.py [--data-dir DIR --name NAME] [--batches 40]

Without --data-dir it builds ../shared/data/tiny_coco (real COCO JPEGs) into a temp dir,
or the synthetic dataset if tiny_coco is absent.
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

TINY = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco"


def main():
  from centermask_jax import config as cfg_lib
  from centermask_jax.data import pipeline, prepare
  p = argparse.ArgumentParser()
  p.add_argument("--data-dir")
  p.add_argument("--name", default="tiny")
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--per-device-batch", type=int, default=8)
  p.add_argument("--resume-step", type=int, default=10 ** 6)
  a = p.parse_args()
  data_dir, name = a.data_dir, a.name
  if data_dir is None:
    data_dir = tempfile.mkdtemp()
    if TINY.exists():
      prepare.build_dataset("tiny", [
          ("train", str(TINY / "annotations/instances_train2017.json"), str(TINY / "train2017"))],
          data_dir, quiet=True)
      name = "tiny"
    else:
      prepare.prepare_synthetic(data_dir, seed=0, quiet=True)
      name = "synthetic"
  print(f"dataset={name} cpus={os.cpu_count()} batch={a.devices}x{a.per_device_batch}")
  for label, make in (("lite", lambda c: cfg_lib.lite(c)), ("full", lambda c: c)):
    c = make(cfg_lib.base_config())
    it = pipeline.make_train_iterator(c, data_dir, name, 0, a.devices, a.per_device_batch, 0, 1)
    for _ in range(3):  # warm-up: graph build, autotune
      next(it)
    t = time.perf_counter()
    for _ in range(a.batches):
      b = next(it)
    dt = time.perf_counter() - t
    n = a.batches * a.devices * a.per_device_batch
    print(f"{label}: short={tuple(c.input.min_size_train)} max={c.input.max_size_train} "
          f"canvas={b['image'].shape[2:4]} images/s={n / dt:.1f}")
    for step in (0, a.resume_step):
      t = time.perf_counter()
      it.set_state({"step": step})
      next(it)
      print(f"{label}: resume at step {step}: first batch after {time.perf_counter() - t:.2f} s")
    del it  # a live tf.data iterator at interpreter exit can hang it


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax import host_memory, runlog
  host_memory.reexec_with_hugepage_malloc()  # huge pages for XLA's buffers (host_memory)
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
