"""`Predictor`: one RGB image in, instances out (like detectron2's DefaultPredictor).

Official test-time preprocessing (channel order, ResizeShortestEdge with PIL bilinear; the
normalisation runs on the device in `CenterMask.normalize`), the image padded to a static
canvas per aspect-ratio group (so one
compile serves every image of that group), official padding = ceil(resized / 32) * 32.
`preprocess` and `image_instances` do not need the model modules (the StableHLO runner
`centermask_jax.serving` uses them); `CenterMask` is imported only to build a default model.
"""
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from centermask_jax import host_memory
from centermask_jax.data import transforms
from centermask_jax.ops import masks as mask_ops
from centermask_jax.ops import padding, postprocess


def preprocess(image_rgb: np.ndarray, config, canvas=None):
  """uint8 RGB [H0, W0, 3] -> (uint8 [Hc, Wc, 3] resized pixels in the model's channel
  order, zeros outside the image, image_hw, padded_hw); the model normalises them on the
  device (`CenterMask.normalize`).

  Uses config.input only. `canvas` (Hc, Wc): a fixed canvas (ValueError if the padded image
  does not fit); default: the config's canvas of the image's aspect-ratio group.
  """
  if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
    raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image_rgb.dtype} "
                     f"{image_rgb.shape}")
  inp = config.input
  img = image_rgb[:, :, ::-1] if inp.format == "BGR" else image_rgb
  h0, w0 = img.shape[:2]
  hw = transforms.get_output_shape(h0, w0, inp.min_size_test, inp.max_size_test)
  img = transforms.resize_uint8(np.ascontiguousarray(img), hw)
  padded = tuple(int(padding.official_padded_hw(v, inp.size_divisibility)) for v in hw)
  if canvas is None:
    canvas = transforms.canvas_hw(inp.min_size_test, inp.max_size_test, hw[1] >= hw[0])
    canvas = (max(canvas[0], padded[0]), max(canvas[1], padded[1]))
  elif padded[0] > canvas[0] or padded[1] > canvas[1]:
    raise ValueError(f"image {h0}x{w0} (padded {padded[0]}x{padded[1]}) does not fit the "
                     f"canvas {canvas[0]}x{canvas[1]}")
  x = np.zeros((*canvas, 3), np.uint8)
  x[:hw[0], :hw[1]] = img
  return x, np.asarray(hw, np.int32), np.asarray(padded, np.int32)


class Predictor:
  """predictor = Predictor(config, variables); out = predictor(image_rgb_uint8);
  outs = predictor([img, ...], batch_size=4) (batched per canvas bucket)."""

  def __init__(self, config, variables, model=None):
    if model is None:
      from centermask_jax.models.centermask import CenterMask
      model = CenterMask(config)
    self.config = config
    self.model = model
    self.variables = jax.device_put(variables)
    self._predict = jax.jit(self.model.predict)
    self._compiled = set()  # (batch size, canvas shape) programs compiled so far

  def __call__(self, image_rgb, batch_size: Optional[int] = None):
    """One RGB uint8 image [H0, W0, 3] -> dict: boxes [K, 4] (original xyxy px), scores,
    classes, masks bool [K, H0, W0], mask_scores; K = valid detections, score-descending.
    A list of images -> a list of such dicts (in order), run `predict_batch`."""
    if isinstance(image_rgb, (list, tuple)):
      return self.predict_batch(image_rgb, batch_size or 4)
    return self.predict_batch([image_rgb], 1)[0]

  def predict_batch(self, images_rgb: Sequence[np.ndarray], batch_size: int = 4):
    """RGB uint8 images -> list of instance dicts (as __call__), in input order.

    Images are grouped by canvas bucket and run `batch_size` at a time; a short last
    batch is filled with empty 32x32 dummy images, so each (canvas, batch_size) compiles
    once."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prep = [preprocess(img, self.config) for img in images_rgb]
    groups: Dict[tuple, List[int]] = {}
    for i, (x, _, _) in enumerate(prep):
      groups.setdefault(x.shape, []).append(i)
    thr = self.config.model.mask_head.mask_threshold
    results: List[Optional[Dict[str, np.ndarray]]] = [None] * len(prep)
    for shape, idx in groups.items():
      for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        x = np.zeros((batch_size, *shape), prep[chunk[0]][0].dtype)
        hw = np.full((batch_size, 2), 32, np.int32)
        padded = np.full((batch_size, 2), 32, np.int32)
        for j, i in enumerate(chunk):
          x[j], hw[j], padded[j] = prep[i]
        out = jax.device_get(self._predict(self.variables, x, hw, padded))
        host_memory.release_after_compile(self._compiled, (batch_size, shape))
        for j, i in enumerate(chunk):
          res = image_instances(out["boxes"][j], out["scores"][j], out["classes"][j],
                                out["mask_probs"][j], out["mask_scores"][j], out["valid"][j],
                                hw[j], images_rgb[i].shape[:2], thr)
          res.pop("src")
          results[i] = res
    return results


def image_instances(boxes, scores, classes, mask_probs, mask_scores, valid, image_hw, orig_hw,
                    mask_threshold=0.5) -> Dict[str, np.ndarray]:
  """One image's padded detections (resized px) -> instances at original resolution.

  boxes [K, 4], scores / classes / mask_scores / valid [K], mask_probs [K, M, M],
  image_hw (resized) and orig_hw (H0, W0) -> numpy dict of the kept rows: boxes [k, 4]
  (scaled + clipped), scores, classes, mask_scores, masks bool [k, H0, W0] and src
  (indices into K); detector_postprocess + aligned paste (spec §c.6, §d.7).
  """
  h0, w0 = int(orig_hw[0]), int(orig_hw[1])
  # Fixed shapes whatever the image size and detection count (compiled once per K): the
  # box scaling on all K rows, the paste in fixed tiles (`paste_masks_tiled`).
  b, ok = postprocess.detector_postprocess(
      np.asarray(boxes, np.float32)[None], np.asarray(valid, bool)[None],
      np.asarray(image_hw, np.int32)[None], np.asarray([[h0, w0]], np.int32))
  keep = np.nonzero(np.asarray(ok[0]))[0]
  b = np.asarray(b[0])
  masks = mask_ops.paste_masks_tiled(np.asarray(mask_probs, np.float32), b, (h0, w0),
                                     mask_threshold, rows=keep)
  return {"boxes": b[keep], "scores": np.asarray(scores)[keep],
          "classes": np.asarray(classes)[keep], "masks": masks,
          "mask_scores": np.asarray(mask_scores)[keep], "src": keep}
