"""Run a model on images and write overlays + predictions.

  python demo.py --config configs/NAME.py --checkpoint PATH --input IMG [IMG|DIR|GLOB ...] \
      --output DIR [--score-thresh 0.5] [--data_dir D --dataset NAME] [--config.key=value ...]
  python demo.py ... --video-input FILE [--output out.mp4] [--max-frames N]
  python demo.py ... --webcam [INDEX] [--output out.mp4]    (shown in a window without --output)

For every input image: DIR/<stem>.png (coloured masks, boxes, 'class score' labels of the
instances with score >= --score-thresh) and DIR/<stem>.json (those instances: box xyxy in
original pixels, score, mask_score, class, category_id, category name, mask as COCO RLE).
Class names are the checkpoint's (stored with it; COCO for an official 80-class file);
with --dataset they are checked against that prepared dataset (a mismatch is refused)
and fill in names a checkpoint lacks; otherwise class indices.

Video and webcam (OpenCV, the optional extra `video`): every frame is overlaid (with the
running frame rate after the first, compiling, frame) and written to the .mp4 at the
source's frame rate; all frames of a stream share one canvas, so one compilation.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

from centermask_jax.config import add_config_argument, parse_command_line
from centermask_jax.data.categories import COCO_CATEGORIES  # noqa: F401 (re-export)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def expand_inputs(items):
  """Files, directories (their images, sorted) and globs -> sorted unique image paths."""
  out = []
  for item in items:
    if os.path.isdir(item):
      out += [os.path.join(item, f) for f in sorted(os.listdir(item))
              if f.lower().endswith(IMAGE_EXTS)]
    elif os.path.isfile(item):
      out.append(item)
    else:
      hits = sorted(p for p in glob.glob(item, recursive=True)
                    if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTS))
      if not hits:
        raise FileNotFoundError(f"no image matches {item!r}")
      out += hits
  seen, uniq = set(), []
  for p in out:
    a = os.path.abspath(p)
    if a not in seen:
      seen.add(a)
      uniq.append(p)
  return uniq


def load_rgb(path):
  from PIL import Image, ImageOps
  with Image.open(path) as im:
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def predictions_json(path, image, pred, keep, names, cat_ids):
  from centermask_jax.ops.masks import encode_masks
  h, w = image.shape[:2]
  rles = encode_masks(pred["masks"][keep]) if keep.size else []
  inst = []
  for j, i in enumerate(keep):
    c = int(pred["classes"][i])
    inst.append({
        "bbox_xyxy": [float(v) for v in pred["boxes"][i]],
        "score": float(pred["scores"][i]),
        "mask_score": float(pred["mask_scores"][i]),
        "class": c, "category_id": int(cat_ids[c]), "category_name": names[c],
        "segmentation": rles[j]})
  return {"image": os.path.abspath(path), "height": h, "width": w, "instances": inst}


def open_video(source):
  """cv2.VideoCapture of a file path or camera index; error if OpenCV is absent or it fails."""
  try:
    import cv2
  except ImportError:
    raise ValueError("video and webcam input need OpenCV: pip install -e '.[video]'") from None
  cap = cv2.VideoCapture(source)
  if not cap.isOpened():
    raise FileNotFoundError(f"cannot open video source {source!r}")
  return cap


def run_video(predictor, cap, names, score_thresh, output=None, show=False, max_frames=0):
  """Overlays every frame (masks, boxes, labels, frame rate), writes them to `output`
  (mp4) and/or shows them. All frames share one canvas: one compile. -> (frames, fps)."""
  import time

  import cv2

  from centermask_jax.visualize import draw_instances
  fps_in = cap.get(cv2.CAP_PROP_FPS) or 0.0
  fps_in = fps_in if 1.0 <= fps_in <= 240.0 else 30.0
  writer, n, t_steady, n_steady, fps = None, 0, 0.0, 0, 0.0
  while not max_frames or n < max_frames:
    ok, frame_bgr = cap.read()
    if not ok:
      break
    rgb = np.ascontiguousarray(frame_bgr[:, :, ::-1])
    t0 = time.perf_counter()
    pred = predictor(rgb)
    dt = time.perf_counter() - t0
    if n:  # the first frame includes the compilation
      t_steady, n_steady = t_steady + dt, n_steady + 1
    fps = n_steady / t_steady if n_steady else 1.0 / max(dt, 1e-9)
    keep = np.nonzero(pred["scores"] >= score_thresh)[0]
    overlay = draw_instances(rgb, pred["boxes"][keep], pred["classes"][keep],
                             pred["scores"][keep], pred["masks"][keep], class_names=names,
                             score_thresh=score_thresh)
    out_bgr = np.ascontiguousarray(overlay[:, :, ::-1])
    cv2.putText(out_bgr, f"{fps:.1f} fps", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7,
                (255, 255, 255), 2, cv2.LINE_AA)
    if output:
      if writer is None:
        h, w = out_bgr.shape[:2]
        writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*"mp4v"), fps_in, (w, h))
        if not writer.isOpened():
          raise OSError(f"cannot write video {output}")
      writer.write(out_bgr)
    if show:
      cv2.imshow("centermask-jax", out_bgr)
      if cv2.waitKey(1) & 0xFF in (27, ord("q")):
        break
    n += 1
  if writer is not None:
    writer.release()
  cap.release()
  return n, fps


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(p)
  p.add_argument("--checkpoint", required=True, help="checkpoint dir, train workdir or .pth/.pkl")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--input", nargs="+", help="images, directories or globs")
  src.add_argument("--video-input", "--video_input", help="a video file")
  src.add_argument("--webcam", nargs="?", const=0, type=int, default=None,
                   help="camera index (default 0)")
  p.add_argument("--output", default=None,
                 help="images: output directory (required); video/webcam: output .mp4")
  p.add_argument("--max-frames", "--max_frames", type=int, default=0,
                 help="video/webcam: stop after this many frames (0 = all)")
  p.add_argument("--score-thresh", "--score_thresh", type=float, default=0.5)
  p.add_argument("--data_dir", "--data-dir", default=None,
                 help="with --dataset: check the checkpoint's classes against this dataset")
  p.add_argument("--dataset", default=None)
  args, cfg = parse_command_line(p, argv)
  from centermask_jax import runlog
  runlog.quiet_startup()  # before TensorFlow / JAX are imported
  try:
    if args.input is not None:
      if not args.output:
        raise ValueError("--output DIR is required with --input")
      paths = expand_inputs(args.input)
    else:
      cap = open_video(args.video_input if args.video_input is not None else args.webcam)
      show = args.webcam is not None and not args.output
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from PIL import Image

  from centermask_jax import compilation_cache
  compilation_cache.enable(cfg.get("compilation_cache_dir") or None)

  from centermask_jax.checkpoints import classes
  from centermask_jax.checkpoints.io import load_model_variables
  from centermask_jax.models.centermask import CenterMask
  from centermask_jax.predictor import Predictor
  from centermask_jax.visualize import draw_instances

  try:
    names, cat_ids = classes.display_table(args.checkpoint, int(cfg.model.num_classes),
                                           args.data_dir or cfg.data.data_dir, args.dataset)
  except (classes.ClassMismatchError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  model = CenterMask(cfg)
  predictor = Predictor(cfg, load_model_variables(args.checkpoint, model), model)
  if args.input is None:
    n, fps = run_video(predictor, cap, names, args.score_thresh, args.output, show,
                       args.max_frames)
    print(f"{n} frame(s), {fps:.2f} fps after the first"
          + (f" -> {args.output}" if args.output else ""), flush=True)
    return 0 if n else 2
  os.makedirs(args.output, exist_ok=True)
  used = set()
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    base, k = stem, 1
    while base in used:  # same file name from different folders
      base, k = f"{stem}_{k}", k + 1
    used.add(base)
    image = load_rgb(path)
    pred = predictor(image)
    keep = np.nonzero(pred["scores"] >= args.score_thresh)[0]
    overlay = draw_instances(image, pred["boxes"][keep], pred["classes"][keep],
                             pred["scores"][keep], pred["masks"][keep], class_names=names,
                             score_thresh=args.score_thresh)
    Image.fromarray(overlay).save(os.path.join(args.output, base + ".png"))
    with open(os.path.join(args.output, base + ".json"), "w") as f:
      json.dump(predictions_json(path, image, pred, keep, names, cat_ids), f)
    print(f"{path}: {keep.size} instance(s) >= {args.score_thresh} "
          f"-> {os.path.join(args.output, base)}.png/.json", flush=True)
  return 0


if __name__ == "__main__":
  from centermask_jax import cli, host_memory
  host_memory.reexec_with_hugepage_malloc()  # before any work: huge pages for XLA's buffers
  sys.exit(cli.run(main))
