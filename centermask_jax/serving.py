"""Runs an exported StableHLO or ONNX artefact (tools/export) without the model code.

  python -m centermask_jax.serving ARTEFACT.{stablehlo,onnx} [ARTEFACT2 ...] \
      --input IMG [IMG ...] [--output preds.json] [--score-thresh 0.0]

Needs jax, jaxlib, numpy, Pillow and flatbuffers (jax.export's deserialiser) only, no model
code (benchmarks/runtime_venv.sh checks it in a fresh venv): the artefact (`jax.export`
serialisation, weights baked in) and its JSON (signature, class names, preprocessing
constants) hold everything. Images are preprocessed exactly like `Predictor` (official
resize, normalisation, zero padding on the artefact's canvas); detections are scaled to
original pixels and masks pasted there (detectron2's detector_postprocess + aligned paste).
With several artefacts (e.g. the landscape and portrait canvases), each image runs on the
smallest canvas that holds it. An `.onnx` artefact runs through onnxruntime (CPU) instead
(the `export` extra), with the same pre- and post-processing.
"""
import argparse
import json
import os
import sys
import types
from typing import Dict, List, Sequence

import jax
import numpy as np

from centermask_jax.ops.normalize import normalize_images
from centermask_jax.predictor import image_instances, preprocess

INPUTS = ("images", "image_hw", "padded_hw")
OUTPUTS = ("boxes", "scores", "classes", "mask_probs", "mask_scores", "valid")


def _input_config(meta: Dict):
  """JSON preprocessing constants -> the `config.input` fields `preprocess` reads."""
  p = meta["preprocessing"]
  return types.SimpleNamespace(input=types.SimpleNamespace(
      format=p["format"], pixel_mean=tuple(p["pixel_mean"]), pixel_std=tuple(p["pixel_std"]),
      min_size_test=p["min_size_test"], max_size_test=p["max_size_test"],
      size_divisibility=p["size_divisibility"]))


class ExportedModel:
  """One artefact: m = ExportedModel.load(path); outs = m.run(images, image_hw, padded_hw).
  `.stablehlo` runs through jax (`jax.export`), `.onnx` through onnxruntime (CPU)."""

  def __init__(self, exported, meta: Dict, path: str = "", session=None):
    self.exported = exported
    self.session = session
    self.meta = meta
    self.path = path
    self.batch = int(meta["batch"])
    self.canvas = tuple(int(v) for v in meta["canvas"])
    self.config = _input_config(meta)
    self._call = jax.jit(exported.call) if exported is not None else None

  @classmethod
  def load(cls, path: str) -> "ExportedModel":
    """path: DIR/NAME.stablehlo or DIR/NAME.onnx (its NAME.json beside it)."""
    meta_path = os.path.splitext(path)[0] + ".json"
    for f in (path, meta_path):
      if not os.path.exists(f):
        raise FileNotFoundError(f"missing exported file {f}")
    with open(meta_path) as f:
      meta = json.load(f)
    if path.endswith(".onnx"):
      return cls(None, meta, path, session=onnx_session(path))
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    plat = jax.default_backend()
    plat = "cuda" if plat == "gpu" else plat
    if plat not in exported.platforms:
      raise ValueError(f"{path} was lowered for {', '.join(exported.platforms)}, this "
                       f"process runs on {plat}")
    return cls(exported, meta, path)

  def run(self, images, image_hw, padded_hw) -> Dict[str, np.ndarray]:
    """images [N, Hc, Wc, 3] f32, image_hw / padded_hw [N, 2] i32 -> padded outputs (numpy)."""
    args = (np.asarray(images, np.float32), np.asarray(image_hw, np.int32),
            np.asarray(padded_hw, np.int32))
    if self.session is not None:
      outs = self.session.run(list(OUTPUTS), dict(zip(INPUTS, args)))
    else:
      outs = self._call(*args)
    return {k: np.asarray(v) for k, v in zip(OUTPUTS, outs)}

  def predict(self, images_rgb: Sequence[np.ndarray]) -> List[Dict[str, np.ndarray]]:
    """RGB uint8 images (each must fit the canvas) -> per image: boxes [k, 4] (original
    px), scores, classes, mask_scores [k], masks bool [k, H0, W0]; score-descending."""
    results = []
    thr = self.meta["postprocessing"]["mask_threshold"]
    for start in range(0, len(images_rgb), self.batch):
      chunk = list(images_rgb[start:start + self.batch])
      x = np.zeros((self.batch, *self.canvas, 3), np.float32)
      hw = np.full((self.batch, 2), 32, np.int32)  # dummy rows: an empty 32x32 image
      padded = np.full((self.batch, 2), 32, np.int32)
      inp = self.config.input
      for i, img in enumerate(chunk):
        pixels, hw[i], padded[i] = preprocess(img, self.config, canvas=self.canvas)
        x[i] = np.asarray(normalize_images(pixels[None], hw[i][None], inp.pixel_mean,
                                           inp.pixel_std))[0]
      out = self.run(x, hw, padded)
      for i, img in enumerate(chunk):
        res = image_instances(out["boxes"][i], out["scores"][i], out["classes"][i],
                              out["mask_probs"][i], out["mask_scores"][i], out["valid"][i],
                              hw[i], img.shape[:2], thr)
        res.pop("src")
        results.append(res)
    return results


def onnx_session(path: str):
  """onnxruntime CPU session for an exported .onnx (needs the `export` extra)."""
  try:
    import onnxruntime as ort
  except ImportError as e:
    raise ImportError(f"{path}: running .onnx needs onnxruntime (pip install -e '.[export]')"
                      ) from e
  opts = ort.SessionOptions()
  opts.log_severity_level = 3  # errors only (its unused-initializer notes are noise)
  return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class Runner:
  """Several artefacts of one model (e.g. landscape + portrait canvases)."""

  def __init__(self, paths: Sequence[str]):
    self.models = sorted((ExportedModel.load(p) for p in paths),
                         key=lambda m: m.canvas[0] * m.canvas[1])
    self.meta = self.models[0].meta

  def __call__(self, image_rgb: np.ndarray) -> Dict[str, np.ndarray]:
    for m in self.models:
      try:
        return m.predict([image_rgb])[0]
      except ValueError as e:  # raised by preprocess before anything runs
        if "does not fit" not in str(e):
          raise
    raise ValueError(f"image {image_rgb.shape[1]}x{image_rgb.shape[0]} fits none of the "
                     f"canvases {[m.canvas for m in self.models]}")


def load_rgb(path: str) -> np.ndarray:
  from PIL import Image, ImageOps
  with Image.open(path) as im:
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("artefacts", nargs="+", help="exported .stablehlo or .onnx files")
  p.add_argument("--input", required=True, nargs="+", help="image files")
  p.add_argument("--output", default=None, help="write the detections as JSON here")
  p.add_argument("--score-thresh", "--score_thresh", type=float, default=0.0)
  args = p.parse_args(argv)
  try:
    runner = Runner(args.artefacts)
    images = [(f, load_rgb(f)) for f in args.input]
  except (FileNotFoundError, ValueError, OSError, ImportError) as e:  # ImportError: no flatbuffers
    print(f"error: {e}", file=sys.stderr)
    return 2
  names = runner.meta["class_names"]
  report = []
  for f, img in images:
    try:
      r = runner(img)
    except ValueError as e:
      print(f"error: {f}: {e}", file=sys.stderr)
      return 2
    keep = np.nonzero(r["scores"] >= args.score_thresh)[0]
    report.append({"image": f, "height": img.shape[0], "width": img.shape[1], "instances": [
        {"bbox_xyxy": [float(v) for v in r["boxes"][i]], "score": float(r["scores"][i]),
         "mask_score": float(r["mask_scores"][i]), "class": int(r["classes"][i]),
         "category_name": names[int(r["classes"][i])],
         "mask_area": int(r["masks"][i].sum())} for i in keep]})
    print(f"{f}: {keep.size} instance(s) >= {args.score_thresh}", flush=True)
  if args.output:
    with open(args.output, "w") as fh:
      json.dump(report, fh)
  return 0


if __name__ == "__main__":
  from centermask_jax import runlog
  runlog.quiet_startup()
  sys.exit(main())
