"""demo.py --video-input: a generated clip round-trips (frame count, size), one compilation."""
import pathlib
import sys

import jax
import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # demo.py lives at the repo root
  sys.path.insert(0, str(REPO))
CONFIG = str(REPO / "configs" / "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py")
SMALL = {"input.min_size_test": 96, "input.max_size_test": 128,
         "model.fcos.pre_nms_topk": 100, "model.fcos.post_nms_topk_test": 10,
         "model.fcos.inference_th": 0.005}
FLAGS = [f"--config.{k}={v!r}" for k, v in SMALL.items()]
H, W, FRAMES = 72, 112, 6


@pytest.fixture(scope="module")
def checkpoint(lite_fixture):
  pytest.importorskip("torch")  # reads the fixture's .pth
  return lite_fixture / "model_random_fp16.pth"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """FRAMES frames of a moving bright square on a gradient, 10 fps."""
  path = str(tmp_path_factory.mktemp("clip") / "in.mp4")
  w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (W, H))
  assert w.isOpened()
  base = np.broadcast_to(np.linspace(0, 200, W, dtype=np.uint8)[None, :, None], (H, W, 3))
  for i in range(FRAMES):
    f = base.copy()
    f[20:50, 10 + 10 * i:40 + 10 * i] = (30, 220, 250)
    w.write(f)
  w.release()
  return path


def _compiles(fn):
  """Runs fn() and counts XLA backend compilations during it (persistent cache off, so a
  warm cache cannot hide a per-frame compile)."""
  n = [0]

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      n[0] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    rc = fn()
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
    jax.monitoring.unregister_event_duration_listener(listener)
  return rc, n[0]


def _read(path):
  cap = cv2.VideoCapture(str(path))
  frames = []
  while True:
    ok, f = cap.read()
    if not ok:
      break
    frames.append(f)
  cap.release()
  return frames


def test_video_round_trip_one_compile(checkpoint, clip, tmp_path, capsys):
  import demo
  args = ["--config", CONFIG, "--checkpoint", str(checkpoint), "--video-input", clip,
          "--score-thresh", "0.0"] + FLAGS
  rc1, c1 = _compiles(lambda: demo.main(args + ["--output", str(tmp_path / "one.mp4"),
                                                "--max-frames", "1"]))
  rc, c_all = _compiles(lambda: demo.main(args + ["--output", str(tmp_path / "out.mp4")]))
  assert rc1 == 0 and rc == 0
  # Frames 2..6 compile nothing: the full run compiles no more than the 1-frame run.
  assert c_all <= c1, (c_all, c1)
  frames = _read(tmp_path / "out.mp4")
  assert len(frames) == FRAMES
  assert frames[0].shape == (H, W, 3)
  src = _read(clip)
  assert any(np.abs(a.astype(int) - b.astype(int)).mean() > 1 for a, b in zip(frames, src))
  out = capsys.readouterr().out
  assert f"{FRAMES} frame(s)" in out and "fps" in out


def test_video_missing_file_is_one_error_line(checkpoint, tmp_path, capsys):
  import demo
  rc = demo.main(["--config", CONFIG, "--checkpoint", str(checkpoint), "--video-input",
                  str(tmp_path / "nope.mp4")] + FLAGS)
  assert rc == 2
  assert capsys.readouterr().err.startswith("error: cannot open video source")
