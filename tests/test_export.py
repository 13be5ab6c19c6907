"""tools/export (StableHLO, ONNX) and the model-free runner `serving` vs the JAX model.

One config (Lite V-19-slim-DW, fixture weights), one canvas (608x928 = the fixture batch's
official padding, so img1 alone reproduces centermask2's final outputs), batch 1.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from centermask_jax.tools import export

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py")
CANVAS = (608, 928)
STEM = "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x_608x928_b1"
N_COCO = 2  # tiny_coco val photos that fit the landscape canvas


@pytest.fixture(scope="module")
def exported(lite_fixture, tmp_path_factory):
  pytest.importorskip("torch")
  out = tmp_path_factory.mktemp("export")
  rc = export.main(["--config", CONFIG, "--checkpoint", str(lite_fixture / "model_random_fp16.pth"),
                    "--out", str(out), "--canvas", "608x928", "--batch", "1"])
  assert rc == 0
  return out


@pytest.fixture(scope="module")
def images(lite_fixture, tiny_coco):
  """Fixture img0 (astronaut), img1 (coffee) and tiny_coco photos that fit the canvas."""
  from centermask_jax.serving import load_rgb
  inp = np.load(lite_fixture / "inputs.npz")
  out = {"img0": inp["img0_orig_rgb_uint8"], "img1": inp["img1_orig_rgb_uint8"]}
  for f in sorted(os.listdir(tiny_coco / "val2017")):
    img = load_rgb(str(tiny_coco / "val2017" / f))
    h, w = img.shape[:2]
    if w >= h and w / h <= 1.5 and len(out) < 2 + N_COCO:
      out[f] = img
  assert len(out) == 2 + N_COCO
  return out


@pytest.fixture(scope="module")
def reference(lite_fixture, images):
  """The JAX model's instances (Predictor's preprocessing and paste on the same canvas)."""
  from centermask_jax.checkpoints.io import load_model_variables
  from centermask_jax.config import load_config
  from centermask_jax.models.centermask import CenterMask
  from centermask_jax.predictor import image_instances, preprocess
  cfg = load_config(CONFIG)
  model = CenterMask(cfg)
  variables = load_model_variables(str(lite_fixture / "model_random_fp16.pth"), model)
  predict = jax.jit(model.predict)
  ref = {}
  for name, img in images.items():
    x, hw, padded = preprocess(img, cfg, canvas=CANVAS)
    o = predict(variables, x[None], hw[None], padded[None])
    ref[name] = image_instances(o["boxes"][0], o["scores"][0], o["classes"][0],
                                o["mask_probs"][0], o["mask_scores"][0], o["valid"][0], hw,
                                img.shape[:2], cfg.model.mask_head.mask_threshold)
  return ref


def assert_same_instances(got, ref, max_mask_px=4, mask_score_atol=1e-4):
  """Identical detection set; boxes 1e-3 px, scores 1e-5, mask scores `mask_score_atol`
  (MaskIoU fc outputs up to ~8 with the random weights; 1e-4 as test_predictor vs the
  fixture); <= max_mask_px differing pixels per mask.
  Returns the measured (max box diff, max score diff, max mask-score diff, max mask px)."""
  assert got["classes"].shape == ref["classes"].shape
  np.testing.assert_array_equal(got["classes"], ref["classes"])
  np.testing.assert_allclose(got["boxes"], ref["boxes"], atol=1e-3, rtol=0)
  np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["mask_scores"], ref["mask_scores"], atol=mask_score_atol,
                             rtol=0)
  assert got["masks"].shape == ref["masks"].shape
  px = int(np.sum(got["masks"] != ref["masks"], axis=(1, 2)).max()) if got["masks"].size else 0
  assert px <= max_mask_px
  return (float(np.abs(got["boxes"] - ref["boxes"]).max(initial=0)),
          float(np.abs(got["scores"] - ref["scores"]).max(initial=0)),
          float(np.abs(got["mask_scores"] - ref["mask_scores"]).max(initial=0)), px)


def test_stablehlo_artefact_and_metadata(exported):
  meta = json.loads((exported / (STEM + ".json")).read_text())
  assert meta["canvas"] == list(CANVAS) and meta["batch"] == 1
  assert meta["artefacts"]["stablehlo"]["platforms"] == ["cpu", "cuda"]
  assert meta["class_names"][0] == "person" and len(meta["class_names"]) == 80
  assert meta["preprocessing"]["min_size_test"] == 600
  assert [o["name"] for o in meta["outputs"]] == list(export.OUTPUTS)
  exp = jax.export.deserialize(bytearray((exported / (STEM + ".stablehlo")).read_bytes()))
  assert [tuple(a.shape) for a in exp.in_avals] == [tuple(i["shape"]) for i in meta["inputs"]]
  assert [tuple(a.shape) for a in exp.out_avals] == [tuple(o["shape"]) for o in meta["outputs"]]


def test_stablehlo_matches_jax_model_and_official(exported, images, reference, lite_fixture):
  from centermask_jax.serving import ExportedModel
  m = ExportedModel.load(str(exported / (STEM + ".stablehlo")))
  for name, img in images.items():
    got = m.predict([img])[0]
    assert got["scores"].size > 0, name
    stats = assert_same_instances(got, reference[name])
    print(f"stablehlo {name}: {got['scores'].size} det, max |box| {stats[0]:.2e} px, |score| "
          f"{stats[1]:.2e}, |mask score| {stats[2]:.2e}, mask px {stats[3]}")
  assert m._call._cache_size() == 1  # every image through one compiled canvas
  # coffee alone pads to the fixture's 608x928: centermask2's final outputs.
  ev = np.load(lite_fixture / "eval_outputs.npz")
  got = m.predict([images["img1"]])[0]
  np.testing.assert_allclose(got["boxes"], ev["img1_final_boxes"], atol=1e-3)
  np.testing.assert_allclose(got["scores"], ev["img1_final_scores"], atol=1e-5)
  np.testing.assert_array_equal(got["classes"], ev["img1_final_classes"])


# Import guard: everything the runtime venv would lack (benchmarks/runtime_venv.sh runs the
# real check: a fresh venv with jax, jaxlib, numpy, Pillow, flatbuffers only).
BLOCKED = ("centermask_jax.models", "centermask_jax.training", "centermask_jax.evaluation",
           "centermask_jax.checkpoints", "centermask_jax.tools", "centermask_jax.config",
           "centermask_jax.parallel", "flax", "optax", "orbax", "ml_collections", "tensorflow",
           "tensorflow_datasets", "torch", "pycocotools", "cv2", "onnx", "onnxruntime",
           "jax2onnx")
GUARD = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Guard(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if any(name == b or name.startswith(b + '.') for b in BLOCKED):
      raise ImportError('import guard: ' + name + ' is not a runtime dependency')
    return None
sys.meta_path.insert(0, Guard())
for b in BLOCKED:  # nothing blocked may already be loaded (e.g. by a sitecustomize)
  assert not any(m == b or m.startswith(b + '.') for m in sys.modules), b
"""


def test_serving_cli_runs_without_model_code(exported, images, lite_fixture, tmp_path):
  """The runner in a subprocess where the model code and the training stack cannot be
  imported (an import of any of them raises): same detections as centermask2."""
  from PIL import Image
  img = tmp_path / "coffee.png"
  Image.fromarray(images["img1"]).save(img)
  out = tmp_path / "pred.json"
  code = GUARD.format(blocked=BLOCKED) + (
      "from centermask_jax import serving\n"
      f"rc = serving.main([{str(exported / (STEM + '.stablehlo'))!r}, '--input', {str(img)!r},"
      f" '--output', {str(out)!r}])\n"
      "sys.exit(rc)\n")
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  pred = json.loads(out.read_text())
  ev = np.load(lite_fixture / "eval_outputs.npz")
  boxes = np.array([i["bbox_xyxy"] for i in pred[0]["instances"]])
  np.testing.assert_allclose(boxes, ev["img1_final_boxes"], atol=1e-3)
  np.testing.assert_allclose([i["score"] for i in pred[0]["instances"]],
                             ev["img1_final_scores"], atol=1e-5)


def test_import_guard_blocks(tmp_path):
  """The guard itself: importing the model module under it fails (so the test above can
  fail when serving starts to need the model code)."""
  code = GUARD.format(blocked=BLOCKED) + "import centermask_jax.models.centermask\n"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0 and "import guard: centermask_jax.models" in r.stderr, r.stderr


def test_export_cli_rejects_bad_canvas(capsys):
  rc = export.main(["--config", CONFIG, "--checkpoint", CONFIG, "--out", "/nonexistent/x",
                    "--canvas", "600x900"])
  assert rc == 2
  assert "error: --canvas '600x900'" in capsys.readouterr().err


# ---- ONNX (optional extra `export`: onnx, onnxruntime, jax2onnx installed with --no-deps) ----

@pytest.fixture(scope="module")
def onnx_exported(lite_fixture, tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("onnxruntime")
  pytest.importorskip("jax2onnx")
  out = tmp_path_factory.mktemp("export_onnx")
  rc = export.main(["--config", CONFIG, "--checkpoint", str(lite_fixture / "model_random_fp16.pth"),
                    "--out", str(out), "--canvas", "608x928", "--batch", "1", "--format", "onnx"])
  assert rc == 0
  return out


def test_onnx_graph_signature(onnx_exported):
  """One self-contained file, inputs/outputs as the JSON signature (the whole inference:
  NMS, masks and MaskIoU inside, no host post-processing beyond the paste)."""
  import onnx
  meta = json.loads((onnx_exported / (STEM + ".json")).read_text())
  info = meta["artefacts"]["onnx"]
  assert info["file"] == STEM + ".onnx" and not (onnx_exported / (STEM + ".onnx.data")).exists()
  m = onnx.load(str(onnx_exported / info["file"]))
  onnx.checker.check_model(m)
  dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
  assert [(v.name, dims(v)) for v in m.graph.input] == [
      (i["name"], i["shape"]) for i in meta["inputs"]]
  assert [(v.name, dims(v)) for v in m.graph.output] == [
      (o["name"], o["shape"]) for o in meta["outputs"]]
  ops = {n.op_type for n in m.graph.node}
  assert {"Conv", "TopK", "Loop"} <= ops, sorted(ops)  # convs, top-k, NMS loop: all inside


def test_onnx_matches_jax_model(onnx_exported, images, reference):
  """The issue's bounds against the JAX model (not against centermask2: onnxruntime's conv
  kernels round differently from XLA's (each conv as accurate, checked against float64)
  and the fixture's random weights amplify that to ~1e-5 relative in the dense maps;
  measured on img1 vs centermask2: scores 1.0e-5 where the JAX model has 1.1e-6)."""
  from centermask_jax.serving import ExportedModel
  m = ExportedModel.load(str(onnx_exported / (STEM + ".onnx")))
  assert m.session is not None
  for name, img in images.items():
    got = m.predict([img])[0]
    assert got["scores"].size > 0, name
    # Mask scores: the MaskIoU head's 6272->1024 fc with the random weights (outputs up to
    # ~8) amplifies the same rounding; the StableHLO artefact of the same XLA program
    # already differs from the jit by 4e-5. Measured: up to 2.2e-4.
    stats = assert_same_instances(got, reference[name], mask_score_atol=5e-4)
    print(f"onnx {name}: {got['scores'].size} det, max |box| {stats[0]:.2e} px, |score| "
          f"{stats[1]:.2e}, |mask score| {stats[2]:.2e}, mask px {stats[3]}")


def test_serving_cli_runs_onnx_without_model_code(onnx_exported, images, reference, tmp_path):
  """The .onnx artefact through the runner under the same import guard, onnxruntime allowed
  (not the converter: onnx, jax2onnx): the JAX model's detections (issue bounds)."""
  from PIL import Image
  img = tmp_path / "coffee.png"
  Image.fromarray(images["img1"]).save(img)
  out = tmp_path / "pred.json"
  blocked = tuple(b for b in BLOCKED if b != "onnxruntime")
  code = GUARD.format(blocked=blocked) + (
      "from centermask_jax import serving\n"
      f"rc = serving.main([{str(onnx_exported / (STEM + '.onnx'))!r}, '--input', {str(img)!r},"
      f" '--output', {str(out)!r}])\n"
      "assert 'onnxruntime' in sys.modules\n"
      "sys.exit(rc)\n")
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  inst = json.loads(out.read_text())[0]["instances"]
  ref = reference["img1"]
  np.testing.assert_array_equal([i["class"] for i in inst], ref["classes"])
  np.testing.assert_allclose([i["bbox_xyxy"] for i in inst], ref["boxes"], atol=1e-3, rtol=0)
  np.testing.assert_allclose([i["score"] for i in inst], ref["scores"], atol=1e-5, rtol=0)
  np.testing.assert_array_equal([i["mask_area"] for i in inst], ref["masks"].sum(axis=(1, 2)))


def test_export_onnx_without_the_extra_is_one_error_line(monkeypatch, capsys, tmp_path):
  """--format onnx without jax2onnx: one error line naming the install, exit 2, nothing
  written (checked before any model is built)."""
  import centermask_jax.tools as tools_pkg
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx -> ImportError
  monkeypatch.delitem(sys.modules, "centermask_jax.tools.export_onnx", raising=False)
  monkeypatch.delattr(tools_pkg, "export_onnx", raising=False)
  out = tmp_path / "out"
  rc = export.main(["--config", CONFIG, "--checkpoint", CONFIG, "--out", str(out),
                    "--format", "onnx", "--canvas", "608x928"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert err[0].startswith("error: ONNX export needs") and "jax2onnx==0.17.1" in err[0]
  assert not out.exists()
