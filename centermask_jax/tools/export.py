"""Exports a model's whole inference (FCOS, NMS, masks, MaskIoU) for serving without this code.

  python -m centermask_jax.tools.export --config configs/NAME.py --checkpoint PATH --out DIR \
      [--format stablehlo onnx] [--batch 1] [--canvas 640x1024 ...] [--platforms cpu cuda] \
      [--config.key=value ...]

One artefact per canvas (Hc x Wc, multiples of 32; default: the config's landscape and
portrait test canvases), weights baked in:

  DIR/<config name>_<Hc>x<Wc>_b<N>.stablehlo   `jax.export` serialisation (run it with
                                               `centermask_jax.serving`)
  DIR/<config name>_<Hc>x<Wc>_b<N>.onnx        the same function as one ONNX graph (needs
                                               the `export` extra and jax2onnx: README;
                                               tools/export_onnx; run it with onnxruntime,
                                               e.g. through `centermask_jax.serving`)
  DIR/<config name>_<Hc>x<Wc>_b<N>.json        signature, config name, class names,
                                               preprocessing constants, platforms

Signature (N = --batch, K = post_nms_topk_test, M = mask resolution):
  in:  images float32 [N, Hc, Wc, 3] ((pixel - mean) / std in the config's channel order,
       zeros outside the resized image), image_hw int32 [N, 2] (resized h, w),
       padded_hw int32 [N, 2] (ceil(image_hw / 32) * 32)
  out: boxes float32 [N, K, 4] (xyxy, resized px), scores float32 [N, K], classes int32
       [N, K], mask_probs float32 [N, K, M, M] (predicted class), mask_scores float32
       [N, K] (MaskIoU-rescored), valid bool [N, K]
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from centermask_jax.config import add_config_argument, parse_command_line

INPUTS = ("images", "image_hw", "padded_hw")
OUTPUTS = ("boxes", "scores", "classes", "mask_probs", "mask_scores", "valid")
FORMATS = ("stablehlo", "onnx")


def inference_fn(model, variables):
  """-> f(images [N,Hc,Wc,3], image_hw [N,2], padded_hw [N,2]) -> tuple in OUTPUTS order,
  with the variables closed over (they become constants of the exported program)."""
  def f(images, image_hw, padded_hw):
    out = model.predict(variables, images, image_hw, padded_hw)
    return tuple(out[k] for k in OUTPUTS)
  return f


def input_specs(batch: int, canvas: Tuple[int, int]):
  return (jax.ShapeDtypeStruct((batch, canvas[0], canvas[1], 3), jnp.float32),
          jax.ShapeDtypeStruct((batch, 2), jnp.int32),
          jax.ShapeDtypeStruct((batch, 2), jnp.int32))


def lowerable_platforms(requested: Sequence[str]):
  """Requested platforms this jaxlib can lower for (cuda lowers without a GPU)."""
  return tuple(p for p in requested if p in ("cpu", "cuda", "rocm", "tpu"))


def export_stablehlo(model, variables, batch: int, canvas: Tuple[int, int],
                     platforms: Sequence[str] = ("cpu", "cuda")):
  """-> (jax.export.Exported, platforms used). Tries all platforms, then each one alone."""
  fn = jax.jit(inference_fn(model, variables))
  specs = input_specs(batch, canvas)
  try:
    return jax.export.export(fn, platforms=tuple(platforms))(*specs), tuple(platforms)
  except Exception as e:  # noqa: BLE001 - a platform this jaxlib cannot lower for
    ok = []
    for p in platforms:
      try:
        jax.export.export(fn, platforms=(p,))(*specs)
        ok.append(p)
      except Exception as e2:  # noqa: BLE001
        print(f"warning: cannot lower for {p}: {str(e2).splitlines()[0]}", file=sys.stderr)
    if not ok:
      raise RuntimeError(f"no platform of {platforms} lowers: {e}") from e
    return jax.export.export(fn, platforms=tuple(ok))(*specs), tuple(ok)


def signature(exp_or_specs, batch: int, canvas, config) -> Dict:
  """Input/output names, shapes and dtypes of the exported function."""
  k = int(config.model.fcos.post_nms_topk_test)
  m = 2 * int(config.model.mask_head.pooler_resolution)
  n, (h, w) = batch, canvas
  return {
      "inputs": [{"name": "images", "shape": [n, h, w, 3], "dtype": "float32"},
                 {"name": "image_hw", "shape": [n, 2], "dtype": "int32"},
                 {"name": "padded_hw", "shape": [n, 2], "dtype": "int32"}],
      "outputs": [{"name": "boxes", "shape": [n, k, 4], "dtype": "float32"},
                  {"name": "scores", "shape": [n, k], "dtype": "float32"},
                  {"name": "classes", "shape": [n, k], "dtype": "int32"},
                  {"name": "mask_probs", "shape": [n, k, m, m], "dtype": "float32"},
                  {"name": "mask_scores", "shape": [n, k], "dtype": "float32"},
                  {"name": "valid", "shape": [n, k], "dtype": "bool"}],
  }


def metadata(config, batch: int, canvas, class_names, category_ids) -> Dict:
  inp = config.input
  return {
      "config_name": config.name,
      "num_classes": int(config.model.num_classes),
      "class_names": list(class_names),
      "category_ids": [int(c) for c in category_ids],
      "batch": int(batch),
      "canvas": [int(canvas[0]), int(canvas[1])],
      "preprocessing": {
          "format": inp.format, "pixel_mean": [float(v) for v in inp.pixel_mean],
          "pixel_std": [float(v) for v in inp.pixel_std],
          "min_size_test": int(inp.min_size_test), "max_size_test": int(inp.max_size_test),
          "size_divisibility": int(inp.size_divisibility), "resize": "PIL bilinear",
      },
      "postprocessing": {"mask_threshold": float(config.model.mask_head.mask_threshold)},
      **signature(None, batch, canvas, config),
      "jax_version": jax.__version__,
  }


def default_canvases(config):
  from centermask_jax.data import transforms
  inp = config.input
  if inp.canvas_test:
    return [tuple(int(v) for v in c) for c in inp.canvas_test]
  return [transforms.canvas_hw(inp.min_size_test, inp.max_size_test, land)
          for land in (True, False)]


def parse_canvas(text: str) -> Tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().replace(",", "x").split("x"))
  except ValueError:
    raise ValueError(f"--canvas {text!r}: expected HxW, e.g. 640x1024") from None
  if h <= 0 or w <= 0 or h % 32 or w % 32:
    raise ValueError(f"--canvas {text!r}: H and W must be positive multiples of 32")
  return h, w


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(p)
  p.add_argument("--checkpoint", required=True, help="checkpoint dir, train workdir or .pth/.pkl")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--format", nargs="+", default=["stablehlo"], choices=FORMATS)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--canvas", nargs="+", default=None, help="HxW canvases (multiples of 32)")
  p.add_argument("--platforms", nargs="+", default=["cpu", "cuda"],
                 help="StableHLO lowering platforms")
  p.add_argument("--data_dir", "--data-dir", default=None,
                 help="with --dataset: class names from this prepared dataset")
  p.add_argument("--dataset", default=None)
  args, cfg = parse_command_line(p, argv)
  try:
    canvases = ([parse_canvas(c) for c in args.canvas] if args.canvas
                else default_canvases(cfg))
    if args.batch < 1:
      raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if not os.path.exists(args.checkpoint):
      raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if "onnx" in args.format:
      from centermask_jax.tools import export_onnx  # noqa: F401 - fail now if the extra is absent
  except (KeyError, FileNotFoundError, TypeError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  from centermask_jax.checkpoints.io import load_model_variables
  from centermask_jax.checkpoints.classes import display_table
  from centermask_jax.models.centermask import CenterMask

  model = CenterMask(cfg)
  variables = load_model_variables(args.checkpoint, model)
  names, cat_ids = display_table(args.checkpoint, int(cfg.model.num_classes),
                                 args.data_dir or cfg.data.data_dir, args.dataset)
  os.makedirs(args.out, exist_ok=True)
  for canvas in canvases:
    stem = os.path.join(args.out, f"{cfg.name or 'model'}_{canvas[0]}x{canvas[1]}_b{args.batch}")
    meta = metadata(cfg, args.batch, canvas, names, cat_ids)
    meta["artefacts"] = {}
    if "stablehlo" in args.format:
      exp, plats = export_stablehlo(model, variables, args.batch, canvas, args.platforms)
      blob = exp.serialize()
      with open(stem + ".stablehlo", "wb") as f:
        f.write(blob)
      meta["artefacts"]["stablehlo"] = {"file": os.path.basename(stem) + ".stablehlo",
                                        "platforms": list(plats), "bytes": len(blob)}
      print(f"{stem}.stablehlo: {len(blob) / 2**20:.1f} MiB, platforms {','.join(plats)}",
            flush=True)
    if "onnx" in args.format:
      from centermask_jax.tools import export_onnx
      t0 = time.time()
      info = export_onnx.export_onnx(inference_fn(model, variables),
                                     input_specs(args.batch, canvas), stem + ".onnx",
                                     INPUTS, OUTPUTS)
      meta["artefacts"]["onnx"] = info
      print(f"{stem}.onnx: {info['bytes'] / 2**20:.1f} MiB, opset {info['opset']} "
            f"({time.time() - t0:.0f} s)", flush=True)
    with open(stem + ".json", "w") as f:
      json.dump(meta, f, indent=1)
    print(f"{stem}.json", flush=True)
  return 0


if __name__ == "__main__":
  from centermask_jax import cli, runlog
  runlog.quiet_startup()
  sys.exit(cli.run(main))
