"""End-to-end COCO eval throughput: data pipeline + pmapped inference + mask paste + RLE.

  python benchmarks/eval_throughput.py [--config configs/centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py]
      [--num-images 16] [--size 600] [--inference-th 0.005] [--per-device-batch 1]
      [--data_dir D --dataset NAME] [--config.key=value ...]

Random weights. Without --dataset, the first --num-images images of ../shared/data/tiny_coco
val are prepared into a temporary dir. The class threshold is lowered (0.005) so a random
model returns the full post-NMS top-k (50) detections per image: every image pays for 50
mask pastes and RLE encodings, the worst case. Two passes with one Evaluator: pass 1
includes compilation, pass 2 is the steady-state figure. Prints one JSON line per pass.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare_subset(n, root):
  from centermask_jax.data import prepare
  tiny = REPO.parent / "shared" / "data" / "tiny_coco"
  src = json.loads((tiny / "annotations" / "instances_val2017.json").read_text())
  keep = {im["id"] for im in src["images"][:n]}
  src["images"] = [im for im in src["images"] if im["id"] in keep]
  src["annotations"] = [a for a in src["annotations"] if a["image_id"] in keep]
  js = os.path.join(root, "val.json")
  with open(js, "w") as f:
    json.dump(src, f)
  data_dir = os.path.join(root, "tfds")
  prepare.build_dataset("bench_val", [("val", js, str(tiny / "val2017"))], data_dir,
                        quiet=True)
  return data_dir, "bench_val"


def main(argv=None):
  from centermask_jax.config import add_config_argument, parse_command_line
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(ap, default=str(
      REPO / "configs" / "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py"))
  ap.add_argument("--num-images", type=int, default=16)
  ap.add_argument("--size", type=int, default=600, help="min_size_test")
  ap.add_argument("--max-size", type=int, default=1000, help="max_size_test")
  ap.add_argument("--inference-th", type=float, default=0.005)
  ap.add_argument("--per-device-batch", type=int, default=1)
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--dataset", default=None)
  ap.add_argument("--passes", type=int, default=2)
  args, cfg = parse_command_line(ap, argv)

  import jax

  from centermask_jax.evaluation.evaluator import Evaluator
  from centermask_jax.models.centermask import CenterMask

  cfg.input.min_size_test = args.size
  cfg.input.max_size_test = args.max_size
  cfg.model.fcos.inference_th = args.inference_th
  with tempfile.TemporaryDirectory() as tmp:
    if args.dataset:
      data_dir, name = args.data_dir, args.dataset
    else:
      data_dir, name = prepare_subset(args.num_images, tmp)
    variables = CenterMask(cfg).init(jax.random.PRNGKey(0))
    ev = Evaluator(cfg)
    for p in range(args.passes):
      metrics = ev(variables, data_dir, name, os.path.join(tmp, f"out{p}"),
                   per_device_batch=args.per_device_batch, verbose=False, progress=False)
      s = ev.last_stats
      print(json.dumps({
          "config": cfg.name, "pass": p + 1, "includes_compile": p == 0,
          "size": f"{args.size}/{args.max_size}", "backend": jax.default_backend(),
          "devices": len(ev.devices), "per_device_batch": args.per_device_batch,
          "images": s["images"], "detections": s["detections"],
          "seconds": round(s["seconds"], 2), "images_per_s": round(s["images_per_s"], 3),
          "segm_AP": round(metrics["segm"]["AP"], 3)}), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax import host_memory, runlog
  host_memory.reexec_with_hugepage_malloc()  # huge pages for XLA's buffers (host_memory)
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
